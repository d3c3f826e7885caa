"""nnU-Net v2 raw layout: reading, validation errors, datasets from plain file pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ReCoKDLib.data.io import Geometry, write_image
from ReCoKDLib.data.layout import DatasetLayoutError, RawDataset, write_dataset_json

GEO = Geometry((1.5, 1.5, 3.0), (-10.0, 20.0, 5.0))
NAMES = ["background", "liver", "spleen"]


def _make(root, cases=("a", "b"), channels=("CT", "PET"), test=("t",), label_value=2):
    root.mkdir(parents=True, exist_ok=True)
    write_dataset_json(root, list(channels), NAMES, len(cases), ".nii.gz", description="unit test")
    for split, ids in (("Tr", cases), ("Ts", test)):
        for case in ids:
            for c in range(len(channels)):
                write_image(np.full((4, 5, 6), c, np.int16), GEO, root / f"images{split}" / f"{case}_{c:04d}.nii.gz")
            label = np.zeros((4, 5, 6), np.uint8)
            label[1, 1:3, 2:4] = 1
            label[2, 2, 2] = label_value
            if split == "Tr":
                write_image(label, GEO, root / f"labels{split}" / f"{case}.nii.gz")
    return root


def test_open_lists_cases_and_classes(tmp_path):
    ds = RawDataset.open(_make(tmp_path / "Dataset001_X"))
    assert ds.class_names == NAMES and ds.num_classes == 3 and ds.num_channels == 2
    train = ds.training_cases()
    assert [c.case_id for c in train] == ["a", "b"]
    assert [p.name for p in train[0].image_paths] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    assert train[0].label_path.name == "a.nii.gz"
    assert [(c.case_id, c.label_path) for c in ds.test_cases()] == [("t", None)]
    ds.validate(check_labels=True)
    image, label, geometry = ds.load_case(train[0])
    assert image.shape == (2, 4, 5, 6) and image.dtype == np.float32 and label.shape == (4, 5, 6)
    assert geometry == GEO or np.allclose(geometry.origin, GEO.origin)
    assert json.loads((tmp_path / "Dataset001_X" / "dataset.json").read_text())["description"] == "unit test"


def test_missing_dataset_json(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(DatasetLayoutError, match="no dataset.json"):
        RawDataset.open(tmp_path)
    with pytest.raises(DatasetLayoutError, match="not found"):
        RawDataset.open(tmp_path / "nope")


def test_missing_channel_file(tmp_path):
    root = _make(tmp_path / "D")
    (root / "imagesTr" / "b_0001.nii.gz").unlink()
    with pytest.raises(DatasetLayoutError, match=r"'b'.*b_0001\.nii\.gz"):
        RawDataset.open(root)


def test_missing_label_and_count_mismatch(tmp_path):
    root = _make(tmp_path / "D")
    (root / "labelsTr" / "a.nii.gz").unlink()
    with pytest.raises(DatasetLayoutError, match="no label file"):
        RawDataset.open(root)
    root2 = _make(tmp_path / "E")
    data = json.loads((root2 / "dataset.json").read_text())
    data["numTraining"] = 5
    (root2 / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(DatasetLayoutError, match="numTraining=5"):
        RawDataset.open(root2)


def test_label_values_outside_declared_labels(tmp_path):
    ds = RawDataset.open(_make(tmp_path / "D", label_value=7))
    ds.validate(check_labels=False, check_geometry=False)  # files exist
    with pytest.raises(DatasetLayoutError, match=r"label values \[7\] are not declared"):
        ds.validate(check_labels=True)


def test_label_on_other_grid(tmp_path):
    root = _make(tmp_path / "D")
    write_image(np.zeros((4, 5, 6), np.uint8), Geometry((1.5, 1.5, 3.0), (0.0, 0.0, 0.0)), root / "labelsTr" / "a.nii.gz")
    with pytest.raises(DatasetLayoutError, match=r"'a'.*origin"):
        RawDataset.open(root).validate()


@pytest.mark.parametrize("labels, match", [
    ({"background": 0, "liver": 2}, "consecutive"),
    ({"background": 0, "liver": 1, "both": [1, 2]}, "region"),
    ({"background": 0}, "at least one class"),
    ({"background": 0, "liver": "1"}, "integer"),
])
def test_bad_label_declarations(tmp_path, labels, match):
    root = _make(tmp_path / "D")
    data = json.loads((root / "dataset.json").read_text())
    data["labels"] = labels
    (root / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(DatasetLayoutError, match=match):
        RawDataset.open(root)


def test_from_pairs(tmp_path):
    root = _make(tmp_path / "D")
    pairs = [([root / "imagesTr" / "a_0000.nii.gz", root / "imagesTr" / "a_0001.nii.gz"], root / "labelsTr" / "a.nii.gz")]
    ds = RawDataset.from_pairs(pairs, NAMES, channel_names=["CT", "PET"],
                               test_pairs=[([root / "imagesTs" / "t_0000.nii.gz", root / "imagesTs" / "t_0001.nii.gz"], None)])
    assert ds.root is None and ds.class_names == NAMES and ds.file_ending == ".nii.gz"
    assert [c.case_id for c in ds.training_cases()] == ["case_000"] and ds.test_cases()[0].label_path is None
    ds.validate()
    with pytest.raises(DatasetLayoutError, match="file not found"):
        RawDataset.from_pairs([(tmp_path / "x.nii.gz", tmp_path / "y.nii.gz")], NAMES)
    with pytest.raises(DatasetLayoutError, match="1 image file"):
        RawDataset.from_pairs([(root / "imagesTr" / "a_0000.nii.gz", root / "labelsTr" / "a.nii.gz")], NAMES,
                              channel_names=["CT", "PET"])
    with pytest.raises(DatasetLayoutError, match="background"):
        RawDataset.from_pairs(pairs, ["background"])
