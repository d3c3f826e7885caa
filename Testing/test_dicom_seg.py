"""DICOM SEG output on the real S3 DICOM series (TotalSegmentator's ``example_ct_dicom``, 20 slices).

``recokd segment MODEL <series folder> out.nii.gz --dicom-seg out.dcm`` writes both; the SEG, read
back with highdicom, must hold the NIfTI's voxels on the same physical grid, reference every slice
of the source series, and carry the class names, colours and SNOMED CT codes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ReCoKDLib.data.dicom_seg import DicomSegError, segment_terminology, write_dicom_seg
from ReCoKDLib.data.io import dicom_series_files, read_image

highdicom = pytest.importorskip("highdicom")

ROOT = Path(__file__).resolve().parents[1]
CT_CLASSES = ["background", "liver", "spleen", "kidney_left", "unheard_of_structure"]


def _on_grid(volume, geometry, shape) -> np.ndarray:
    """A highdicom ``Volume`` resampled by index permutation onto ``geometry``'s ``(D, H, W)`` grid;
    fails unless both grids are the same voxels (integer permutation and offset of indices)."""
    # (s, r, c, 1) of the SEG volume -> (i, j, k, 1) of our grid
    mapping = np.linalg.inv(geometry.ijk_to_lps()) @ np.asarray(volume.affine, float)
    linear, offset = mapping[:3, :3], mapping[:3, 3]
    assert np.allclose(linear, np.round(linear), atol=1e-4) and np.allclose(offset, np.round(offset), atol=1e-3), \
        mapping
    linear, offset = np.round(linear).astype(int), np.round(offset).astype(int)
    assert sorted(np.abs(linear).sum(axis=0)) == [1, 1, 1] and sorted(np.abs(linear).sum(axis=1)) == [1, 1, 1]
    out = np.zeros(shape, volume.array.dtype)
    s, r, c = np.indices(volume.array.shape).reshape(3, -1)
    i, j, k = linear @ np.stack([s, r, c]) + offset[:, None]
    inside = (k >= 0) & (k < shape[0]) & (j >= 0) & (j < shape[1]) & (i >= 0) & (i < shape[2])
    out[k[inside], j[inside], i[inside]] = volume.array.reshape(-1)[inside]
    assert inside.all(), "the SEG reaches outside the source grid"
    return out


def test_class_names_get_snomed_codes_and_unknown_names_the_generic_tissue_code():
    expected = {
        "liver": ("91723000", "10200004", None), "spleen": ("91723000", "78961009", None),
        "inferior_vena_cava": ("91723000", "64131007", None), "vertebrae_T12": ("91723000", "23215003", None),
        "autochthon_left": ("91723000", "44947003", "7771000"), "brain": ("91723000", "12738006", None),
        "portal_vein_and_splenic_vein": ("91723000", "32764006", None),
        "hippocampus_right": ("91723000", "5366008", "24028007"),
        "unheard_of_structure": ("85756007", "85756007", None),
    }
    for name, (category, kind, side) in expected.items():
        terms = segment_terminology(name)
        assert (terms.category.value, terms.type.value, terms.laterality.value if terms.laterality else None) == \
            (category, kind, side), name
        assert terms.known == (name != "unheard_of_structure")


@pytest.mark.slow
def test_segment_writes_a_dicom_seg_that_matches_the_nifti(tmp_path, s3_dicom_folder):
    import pydicom

    from test_web_serve import _save_model

    colors = [[0, 0, 0], [0.9, 0.4, 0.3], [0.2, 0.6, 0.9], [0.9, 0.8, 0.1], [0.5, 0.5, 0.5]]
    model = _save_model(tmp_path / "ct.pt", classes=CT_CLASSES, colors=colors)
    out, seg_path = tmp_path / "s3_seg.nii.gz", tmp_path / "s3_seg.dcm"
    result = subprocess.run(
        [sys.executable, "-m", "ReCoKDLib", "segment", str(model), str(s3_dicom_folder), str(out),
         "--dicom-seg", str(seg_path), "--device", "cpu", "--progress", "bar"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    labels, geometry = read_image(out)
    present = [int(v) for v in np.unique(labels) if v]
    assert present, "the test model must find at least one class"

    seg = highdicom.seg.segread(seg_path)
    numbers_to_class = {int(d.SegmentNumber): CT_CLASSES.index(d.SegmentLabel) for d in seg.SegmentSequence}
    assert sorted(numbers_to_class.values()) == present
    combined = _on_grid(seg.get_volume(combine_segments=True), geometry, labels.shape)
    as_classes = np.zeros_like(labels)
    for number, class_id in numbers_to_class.items():
        as_classes[combined == number] = class_id
    np.testing.assert_array_equal(as_classes, labels)

    # it references the source series: same frame of reference, every slice by its SOP instance UID
    files = dicom_series_files(s3_dicom_folder)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    referenced = {item.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
                  for item in series.ReferencedInstanceSequence}
    assert referenced == {str(ds.file_meta.MediaStorageSOPInstanceUID) for ds in sources}
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    # the series' UIDs were emptied by its anonymiser: the CLI says so
    assert "DICOM SEG" in result.stderr and "StudyInstanceUID" in result.stderr
    for segment in seg.SegmentSequence:
        class_id = CT_CLASSES.index(segment.SegmentLabel)
        terms = segment_terminology(segment.SegmentLabel)
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == terms.type.value
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == terms.category.value
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        lab = highdicom.color.CIELabColor.from_rgb(*[round(255 * c) for c in colors[class_id]])
        assert list(segment.RecommendedDisplayCIELabValue) == list(lab.value), segment.SegmentLabel
        if segment.SegmentLabel == "kidney_left":
            modifier = segment.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
            assert modifier.CodeMeaning == "Left"


def test_dicom_seg_needs_a_dicom_series_and_its_grid(tmp_path, s3_dicom_folder):
    image, geometry = read_image(s3_dicom_folder)
    labels = np.zeros(image.shape, np.uint8)
    labels[3:7, 100:200, 150:260] = 1
    written = write_dicom_seg(labels, geometry, s3_dicom_folder, ["background", "liver"], tmp_path / "ok.dcm")
    assert written.segments == ("liver",) and written.path.is_file()
    with pytest.raises(DicomSegError, match="not on the grid of the DICOM series"):
        write_dicom_seg(labels[:, ::2, ::2], geometry, s3_dicom_folder, ["background", "liver"], tmp_path / "x.dcm")
    with pytest.raises(DicomSegError, match="empty"):
        write_dicom_seg(np.zeros_like(labels), geometry, s3_dicom_folder, ["background", "liver"], tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()
    # the CLI refuses before any inference: a NIfTI input has no series to reference
    nifti = tmp_path / "ct.nii.gz"
    from ReCoKDLib.data.io import write_image

    write_image(image[:4, :64, :64], geometry, nifti)
    result = subprocess.run(
        [sys.executable, "-m", "ReCoKDLib", "segment", str(tmp_path / "no_model.pt"), str(nifti),
         str(tmp_path / "o.nii.gz"), "--dicom-seg", str(tmp_path / "o.dcm"), "--progress", "none"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "is not a DICOM series folder" in result.stderr, result.stderr
