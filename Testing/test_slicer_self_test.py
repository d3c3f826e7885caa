"""``ReCoKDTest``'s data, built without the network (the extensions build server has none):
the synthetic dataset is a valid nnU-Net raw dataset the library reads, and the small teacher is a
model file the library loads and distils from."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import slicer_stubs

ROOT = Path(__file__).resolve().parents[1]
SELF_TEST = ROOT / "ReCoKD" / "ReCoKDModule" / "selfTest.py"


@pytest.fixture()
def self_test(monkeypatch):
    keep = slicer_stubs.loaded_modules()
    slicer_stubs.install(monkeypatch, slicer_stubs.stub_modules())
    yield slicer_stubs.import_module_code("selfTest")
    slicer_stubs.forget_module_code(keep)


def test_the_self_test_downloads_nothing():
    tree = ast.parse(SELF_TEST.read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not {"downloadSample", "urlopen", "requests", "fetch"} & names
    assert not [s for s in strings if "http" in s or s == "fetch"]
    shell = (ROOT / "ReCoKD" / "ReCoKD.py").read_text()
    assert "runSelfTest(self)" in shell


def test_synthetic_dataset_is_a_dataset_the_library_reads(self_test, tmp_path):
    from ReCoKDLib.data.layout import RawDataset

    folder = self_test.writeSyntheticDataset(tmp_path / "Dataset900_Synthetic")
    dataset = RawDataset.open(folder)
    assert dataset.class_names == self_test.CLASSES and len(dataset.training_cases()) == 3
    image, labels = self_test.syntheticCase(0)
    assert image.shape == labels.shape == self_test.SHAPE
    assert set(np.unique(labels)) == {0, 1, 2}
    assert image[labels == 2].mean() > image[labels == 0].mean() + 100  # organs stand out


def test_small_teacher_loads_with_the_datasets_classes(self_test, tmp_path):
    pytest.importorskip("torch")
    from ReCoKDLib.checkpoint import read_model_card
    from ReCoKDLib.teachers import load_model

    path = self_test.writeTinyTeacher(tmp_path / "teacher.pt")
    card = read_model_card(path)
    assert card.classes == self_test.CLASSES and card.tap_names
    assert load_model(str(path), "cpu").card.classes == self_test.CLASSES
