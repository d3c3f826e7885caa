"""DICOM SEG output: a label map computed on a DICOM series, as a Segmentation object that a PACS
and DICOM viewers take back (highdicom, the ``dicom`` extra).

:func:`write_dicom_seg` writes one binary Segmentation instance that references every slice of the
source series (same Study, Frame of Reference, per-frame source image references), with one segment
per class present in the label map: its label is the class name, its colour the model card's
class colour, its coded terminology a SNOMED CT concept (:func:`segment_terminology`).

Terminology, as DICOM SEG wants it (Segmented Property Category / Type, CID 7150 / 7151):

* class names ReCoKD ships (the CT organs of the sample data, the brain of HD-BET, the subcortical
  structures) map to their SNOMED CT anatomical-structure concepts, with a Left/Right modifier for
  ``*_left`` / ``*_right`` names. ``portal_vein_and_splenic_vein`` is coded as *Portal vein* (no
  single concept covers both; the label keeps the full name); ``autochthon_*`` as *Erector spinae
  muscle*.
* other names are looked up in DICOM's anatomical-structure context group (CID 7151) by their
  words (``inferior_vena_cava`` -> *Inferior vena cava*);
* a name found nowhere is coded as the generic category and type *Tissue* (SCT 85756007), and the
  segment label keeps the model's class name, so nothing is claimed that the model did not say.

The label map must lie on the series' own grid (:func:`ReCoKDLib.data.io.read_image` of the folder
gives it; ``recokd segment`` and ``recokd serve`` keep it): array slice ``k`` is file ``k`` of
:func:`ReCoKDLib.data.io.dicom_series_files`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ReCoKDLib.checkpoint import atomic_output
from ReCoKDLib.data.io import Geometry, dicom_series_files, grid_differences

__all__ = ["DicomSegError", "DicomSegResult", "SegmentTerminology", "segment_terminology", "read_series_datasets",
           "complete_identifiers", "series_geometry", "write_dicom_seg", "require_highdicom", "check_dicom_seg_source"]

#: ReCoKD class names (without a _left/_right suffix) -> keyword of pydicom's CID 7151 codes
_KNOWN_NAMES = {
    "portal_vein_and_splenic_vein": "PortalVein",
    "autochthon": "ErectorSpinaeMuscle",
    "vertebrae_t11": "T11Vertebra",
    "vertebrae_t12": "T12Vertebra",
    "caudate": "CaudateNucleus",
    "pallidum": "GlobusPallidus",
}
_SIDES = {"left": "Left", "right": "Right"}


class DicomSegError(ValueError):
    """A DICOM SEG cannot be written: no DICOM source series, a label map off its grid, highdicom missing."""


def require_highdicom():
    """The ``highdicom`` module, or a :class:`DicomSegError` saying how to install it."""
    try:
        import highdicom
    except ImportError as exc:
        raise DicomSegError(f"DICOM SEG output needs highdicom ({exc}); install it with: pip install 'recokd[dicom]'") \
            from None
    return highdicom


@dataclass(frozen=True)
class SegmentTerminology:
    """Coded terminology of one segment: ``category`` and ``type`` (``pydicom.sr.coding.Code``),
    ``laterality`` (a Left/Right code or None) and ``known`` (False: the generic *Tissue* fallback)."""

    category: object
    type: object
    laterality: object | None
    known: bool


def _camel(words: Sequence[str]) -> str:
    return "".join(w[:1].upper() + w[1:] for w in words if w)


def segment_terminology(class_name: str) -> SegmentTerminology:
    """SNOMED CT category/type (and laterality) of a class name (see the module docstring)."""
    from pydicom.sr.codedict import codes

    words = [w for w in re.split(r"[\s_\-]+", str(class_name).strip().lower()) if w]
    side = next((_SIDES[w] for w in (words[-1:] + words[:1]) if w in _SIDES), None) if len(words) > 1 else None
    core = [w for w in words if w not in _SIDES] if side else words
    keyword = _KNOWN_NAMES.get("_".join(core)) or _camel(core)
    anatomy = codes.cid7151
    if keyword and keyword in dir(anatomy):
        laterality = getattr(codes.cid244, side) if side else None
        return SegmentTerminology(codes.cid7150.AnatomicalStructure, getattr(anatomy, keyword), laterality, True)
    return SegmentTerminology(codes.cid7150.Tissue, codes.SCT.Tissue, None, False)


def check_dicom_seg_source(image_path: str | os.PathLike) -> None:
    """Fail early (before inference) when a DICOM SEG cannot be written for ``image_path``.

    Raises:
        DicomSegError: highdicom missing, or ``image_path`` is not a folder holding a DICOM series.
    """
    require_highdicom()
    path = Path(image_path)
    if not path.is_dir():
        raise DicomSegError(f"a DICOM SEG references the DICOM series it was computed on, and {path} is not a DICOM "
                            "series folder; give the series folder as the image, or drop the DICOM SEG output")
    try:
        dicom_series_files(path)
    except ValueError as exc:
        raise DicomSegError(str(exc)) from None


def read_series_datasets(folder: str | os.PathLike) -> list:
    """The headers (no pixel data) of the DICOM series in ``folder``, in array slice order.

    Raises:
        DicomSegError: not a folder of single-frame DICOM images.
    """
    import pydicom

    folder = Path(folder)
    if not folder.is_dir():
        raise DicomSegError(f"a DICOM SEG references its source series: {folder} is not a DICOM series folder "
                            "(segment a DICOM folder to write one)")
    try:
        files = dicom_series_files(folder)
    except ValueError as exc:
        raise DicomSegError(str(exc)) from None
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    if any(int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise DicomSegError(f"{folder} holds multi-frame DICOM images; DICOM SEG output supports series of "
                            "single-frame slices")
    return datasets


def complete_identifiers(datasets: Sequence) -> list[str]:
    """Fill identifiers an anonymiser emptied, in place; returns what was filled, for the user.

    SOP Class / Instance UIDs come from each file's meta header (the same values by the standard).
    An empty Study or Series Instance UID cannot be recovered: a UID derived from the series'
    instances stands in (the same for every run on that series), and a PACS will file the SEG as
    a study of its own.

    Raises:
        DicomSegError: a slice has no SOP Instance UID anywhere (nothing to reference).
    """
    from pydicom.uid import generate_uid

    notes: list[str] = []
    for ds in datasets:
        meta = getattr(ds, "file_meta", None)
        for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                      ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not str(ds.get(keyword, "") or "") and meta is not None and str(meta.get(meta_keyword, "") or ""):
                setattr(ds, keyword, meta.get(meta_keyword))
                note = f"{keyword} taken from the files' meta headers (empty in the data sets)"
                notes += [] if note in notes else [note]
        if not str(ds.get("SOPInstanceUID", "") or ""):
            raise DicomSegError("a slice of the series has no SOP Instance UID, so a DICOM SEG cannot reference it")
    instances = [str(ds.SOPInstanceUID) for ds in datasets]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        values = {str(ds.get(keyword, "") or "") for ds in datasets}
        if values == {""}:
            uid = generate_uid(entropy_srcs=[keyword, *instances])
            for ds in datasets:
                setattr(ds, keyword, uid)
            notes.append(f"the source series has no {keyword} (anonymised?): the SEG uses {uid}, derived from its "
                         "instances, so a PACS files it apart from the images")
    return notes


def series_geometry(datasets: Sequence) -> Geometry:
    """The voxel grid of a sorted single-frame series (LPS, as :class:`~ReCoKDLib.data.io.Geometry`)."""
    first = datasets[0]
    row_dir, col_dir = (np.asarray(first.ImageOrientationPatient[:3], float),
                        np.asarray(first.ImageOrientationPatient[3:], float))
    normal = np.cross(row_dir, col_dir)
    origin = np.asarray(first.ImagePositionPatient, float)
    if len(datasets) > 1:
        step = np.asarray(datasets[1].ImagePositionPatient, float) - origin
        slice_spacing = float(np.linalg.norm(step))
        normal = step / slice_spacing if slice_spacing > 0 else normal
    else:
        slice_spacing = float(getattr(first, "SpacingBetweenSlices", 0) or getattr(first, "SliceThickness", 1) or 1)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)  # between rows, between columns
    direction = np.stack([row_dir, col_dir, normal], axis=1)  # columns: i (along a row), j, k
    return Geometry((col_spacing, row_spacing, slice_spacing), tuple(origin), tuple(direction.ravel()))


@dataclass(frozen=True)
class DicomSegResult:
    """What :func:`write_dicom_seg` wrote: ``path``, the ``segments`` (class names, in segment-number
    order) and ``notes`` about the source series the user should know (see :func:`complete_identifiers`)."""

    path: Path
    segments: tuple
    notes: tuple


def _rgb255(color: Sequence[float]) -> tuple[int, int, int]:
    values = [float(c) for c in list(color)[:3]]
    scale = 255.0 if max(values, default=0.0) <= 1.0 else 1.0
    return tuple(int(round(min(255.0, max(0.0, v * scale)))) for v in values)


def write_dicom_seg(labels: np.ndarray, geometry: Geometry, series_folder: str | os.PathLike,
                    class_names: Sequence[str], path: str | os.PathLike, colors: Sequence[Sequence[float]] | None = None,
                    algorithm: str = "ReCoKD model", description: str = "ReCoKD segmentation") -> DicomSegResult:
    """Write ``labels`` as a DICOM SEG object referencing the series in ``series_folder``.

    Args:
        labels: ``(D, H, W)`` class ids on the series' grid (``geometry``).
        class_names: names by class id (``[0]`` the background, never a segment).
        colors: RGB by class id, in [0, 1] (model cards) or 0..255; default: a tab20 table.
        algorithm: the algorithm's name in the SEG (the model's title).

    Returns:
        a :class:`DicomSegResult`; the file is written atomically (a failure leaves nothing at ``path``).

    Raises:
        DicomSegError: no highdicom, not a DICOM folder, labels off the series' grid, no segment.
    """
    hd = require_highdicom()
    from pydicom.sr.codedict import codes

    from ReCoKDLib import __version__

    labels = np.asarray(labels)
    datasets = read_series_datasets(series_folder)
    expected = (len(datasets), int(datasets[0].Rows), int(datasets[0].Columns))
    differences = grid_differences(series_geometry(datasets), geometry, expected, labels.shape, tol=1e-3)
    if differences:
        raise DicomSegError(f"the label map is not on the grid of the DICOM series in {series_folder}: "
                            + "; ".join(differences))
    present = [int(v) for v in np.unique(labels) if v > 0]
    unknown = [v for v in present if v >= len(class_names)]
    if unknown:
        raise DicomSegError(f"label values {unknown} have no class name ({len(class_names)} classes)")
    if not present:
        raise DicomSegError("the segmentation is empty: no class was found, so there is no segment to write")
    notes = complete_identifiers(datasets)
    if colors is None or len(colors) < len(class_names):
        from matplotlib import colormaps

        colors = [(0, 0, 0)] + [colormaps["tab20"](i % 20)[:3] for i in range(len(class_names) - 1)]
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm[:64], family=codes.cid7162.ArtificialIntelligence, version=f"ReCoKD {__version__}")
    segments, numbered = [], np.zeros(labels.shape, np.uint16)
    for number, value in enumerate(present, start=1):
        name, terms = str(class_names[value]), segment_terminology(class_names[value])
        segment = hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64], segmented_property_category=terms.category,
            segmented_property_type=terms.type, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification, tracking_id=name[:64], tracking_uid=hd.UID(),
            display_color=hd.color.CIELabColor.from_rgb(*_rgb255(colors[value])))
        if terms.laterality is not None:
            segment.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept.from_code(terms.laterality)]
        segments.append(segment)
        numbered[labels == value] = number
    first = datasets[0]
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=numbered, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(),
        series_number=int(getattr(first, "SeriesNumber", 0) or 0) + 1000, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="ReCoKD", manufacturer_model_name=algorithm[:64],
        software_versions=f"ReCoKD {__version__}", device_serial_number="none", series_description=description[:64],
        content_label="RECOKD", content_description=description[:64])
    path = Path(path)
    with atomic_output(path, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    return DicomSegResult(path, tuple(str(class_names[v]) for v in present), tuple(notes))
