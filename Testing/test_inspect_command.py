"""``recokd inspect`` on a tiny real CT crop: volumes on the image's exact grid, PNGs, a page whose
pictures exist, and clear errors before anything is written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ReCoKDLib.cli import main
from ReCoKDLib.data.io import read_image, same_grid


def _save_pair(folder: Path, classes: list[str], student_classes: list[str] | None = None) -> dict[str, Path]:
    """A tiny teacher and a ReCo-KD student (3 mm CT cards) saved as ReCoKD model files."""
    from ReCoKDLib.checkpoint import ModelCard, save_model
    from ReCoKDLib.networks import build_unet, derive_student_config, encoder_tap_names, preset

    t_cfg = preset("tiny", num_classes=len(classes))
    s_cfg = derive_student_config(preset("tiny", num_classes=len(student_classes or classes)), reduction=2,
                                  min_channels=4)
    torch.manual_seed(0)
    paths = {}
    for role, cfg, names in (("teacher", t_cfg, classes), ("student", s_cfg, student_classes or classes)):
        kd = {"methods": {"recokd": {"weight": 1.0}}, "teacher_taps": encoder_tap_names(t_cfg),
              "student_taps": encoder_tap_names(s_cfg)} if role == "student" else {}
        card = ModelCard(architecture={"kind": "dynunet", "config": cfg.to_dict()}, classes=names,
                         spacing=[3.0, 3.0, 3.0], normalization={"scheme": "ct", "mean": 40.0, "std": 150.0,
                                                                 "clip": [-200.0, 300.0]},
                         patch_size=[16, 32, 32], role=role, tap_names=encoder_tap_names(cfg), kd=kd)
        (folder / role).mkdir(parents=True, exist_ok=True)
        paths[role] = save_model(folder / role / "model_last.pt", build_unet(cfg).state_dict(), card)
    return paths


@pytest.fixture(scope="module")
def tiny_case(tiny_ct_case, ct_dataset):
    """The real crop (32x64x64) with 3 classes: background, liver, everything else labelled."""
    return tiny_ct_case, ["background", "liver", "other"]


@pytest.fixture(scope="module")
def crop_labels(tiny_case, tmp_path_factory):
    from ReCoKDLib.data.io import write_image

    case, _ = tiny_case
    label, geometry = read_image(case.label_path, allow_channels=False)
    three = np.where(label == 1, 1, np.where(label > 1, 2, 0)).astype(np.uint8)
    return write_image(three, geometry, tmp_path_factory.mktemp("labels") / "labels3.nii.gz")


@pytest.fixture(scope="module")
def inspected(tiny_case, crop_labels, tmp_path_factory):
    pytest.importorskip("trame_slicer", reason="the pictures need the render extra")
    case, classes = tiny_case
    root = tmp_path_factory.mktemp("inspect")
    models = _save_pair(root / "models", classes)
    out = root / "out"
    code = main(["inspect", "--image", str(case.image_paths[0]), "--teacher", str(models["teacher"]),
                 "--student", str(models["student"]), "--labels", str(crop_labels), "--out", str(out),
                 "--levels", "0", "1", "--device", "cpu", "--size", "96", "--progress", "none"])
    assert code == 0
    return case, classes, out


def test_inspect_writes_every_map_on_the_exact_image_grid(inspected, crop_labels):
    case, classes, out = inspected
    image, geometry = read_image(case.image_paths[0], allow_channels=False)
    labels, _ = read_image(crop_labels, allow_channels=False)
    manifest = json.loads((out / "inspection.json").read_text())
    assert manifest["levels"] == [0, 1]
    volumes = [out / manifest["segmentation"]] + [out / m["volume"] for m in manifest["maps"]]
    for path in volumes:
        array, g = read_image(path, allow_channels=False)
        assert same_grid(g, geometry, array.shape, image.shape), path
    for level in (0, 1):
        kinds = {(m["kind"], m["name"]) for m in manifest["maps"] if m["level"] == level}
        assert {("affinity", r) for r in ("teacher", "student", "difference")} <= kinds
        assert {("region", "liver"), ("region", "other"), ("region", "foreground")} <= kinds
    # a class's region mask is its labelled voxels, holding its class-balanced weight
    liver = next(m for m in manifest["maps"] if m["level"] == 0 and m["name"] == "liver")
    mask, _ = read_image(out / liver["volume"], allow_channels=False)
    np.testing.assert_array_equal(mask > 0, labels == 1)
    assert liver["weight"] == pytest.approx(float(mask.max())) and 0 < liver["weight"] < 1
    assert liver["voxels"] == int((labels == 1).sum())
    # the difference map is teacher - student, voxel by voxel
    get = {m["name"]: read_image(out / m["volume"], allow_channels=False)[0]
           for m in manifest["maps"] if m["level"] == 1 and m["kind"] == "affinity"}
    np.testing.assert_allclose(get["difference"], get["teacher"] - get["student"], atol=1e-7)
    assert get["teacher"].max() > 0


def test_inspect_page_references_existing_pictures_and_volumes(inspected):
    _, _, out = inspected
    page = (out / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    links = re.findall(r"<a href='([^']+)'", page)
    assert len(sources) >= 1 + 2 * (3 + 3)  # segmentation views + per level: 3 affinities, >= 3 masks
    assert links
    for ref in sources + links:
        assert not re.match(r"[a-z]+:", ref) and not ref.startswith("/"), ref  # relative, no network
        assert (out / ref).is_file(), ref
    assert all((out / s).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for s in sources)
    assert "Level 0" in page and "Level 1" in page and "weight per voxel" in page


def test_inspect_overlay_pictures_differ_by_map(inspected):
    _, _, out = inspected
    teacher = (out / "png" / "level0_affinity_teacher.png").read_bytes()
    liver = (out / "png" / "level0_region_01_liver.png").read_bytes()
    assert teacher != liver


def test_inspect_rejects_bad_input_before_writing(tiny_case, crop_labels, tmp_path, capsys):
    case, classes = tiny_case
    models = _save_pair(tmp_path / "models", classes)
    odd = _save_pair(tmp_path / "odd", classes, student_classes=classes + ["extra"])
    image = str(case.image_paths[0])
    base = ["inspect", "--image", image, "--no-png", "--progress", "none", "--device", "cpu"]
    cases = [
        (["--teacher", str(models["teacher"]), "--student", str(tmp_path / "nope.pt")], "student not found"),
        (["--teacher", str(odd["teacher"]), "--student", str(odd["student"])], "has 3 classes"),
        (["--teacher", str(models["teacher"]), "--student", str(models["student"]), "--labels",
          str(case.label_path)], "the models have 3 classes"),
        (["--teacher", str(models["teacher"]), "--student", str(models["student"]), "--levels", "7"],
         r"level\(s\) \[7\] do not exist"),
    ]
    for n, (extra, message) in enumerate(cases):
        out = tmp_path / f"out{n}"
        assert main(base + extra + ["--out", str(out)]) == 2
        assert re.search(message, capsys.readouterr().err), message
        assert not out.exists()


def test_inspect_roi_keeps_the_grid_and_zeroes_outside(tiny_case, tmp_path):
    case, classes = tiny_case
    models = _save_pair(tmp_path / "models", classes)
    out = tmp_path / "out"
    code = main(["inspect", "--image", str(case.image_paths[0]), "--teacher", str(models["teacher"]),
                 "--student", str(models["student"]), "--out", str(out), "--levels", "0", "--format", "nii.gz",
                 "--roi", "8", "8", "4", "40", "40", "20", "--no-png", "--progress", "none", "--device", "cpu"])
    assert code == 0
    image, geometry = read_image(case.image_paths[0], allow_channels=False)
    manifest = json.loads((out / "inspection.json").read_text())
    teacher = next(m for m in manifest["maps"] if m["name"] == "teacher")
    assert teacher["volume"].endswith(".nii.gz") and teacher["png"] is None
    array, g = read_image(out / teacher["volume"], allow_channels=False)
    assert same_grid(g, geometry, array.shape, image.shape)
    inside = np.zeros(image.shape, bool)
    inside[4:20, 8:40, 8:40] = True  # (k, j, i) of the ijk box
    assert not np.any(array[~inside]) and np.any(array[inside])


def test_segment_png_writes_slicer_views_of_the_result(tiny_case, tmp_path):
    pytest.importorskip("trame_slicer", reason="the pictures need the render extra")
    case, classes = tiny_case
    models = _save_pair(tmp_path / "models", classes)
    out, pngs = tmp_path / "seg.nii.gz", tmp_path / "png"
    code = main(["segment", str(models["student"]), str(case.image_paths[0]), str(out), "--png", str(pngs),
                 "--device", "cpu", "--progress", "none"])
    assert code == 0 and out.is_file()
    names = sorted(p.name for p in pngs.iterdir())
    assert names == ["seg_3d.png", "seg_axial.png", "seg_coronal.png", "seg_sagittal.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs.iterdir())


def test_evaluation_report_pictures_come_from_the_slicer_renderer(tiny_case, crop_labels):
    pytest.importorskip("trame_slicer", reason="the pictures need the render extra")
    from ReCoKDLib.data.io import read_image
    from ReCoKDLib.evaluate import _slicer_overlay
    from ReCoKDLib.mrml.views import render_overlay_png

    case, classes = tiny_case
    image, geometry = read_image(case.image_paths[0], allow_channels=False)
    label, _ = read_image(crop_labels, allow_channels=False)
    prediction = np.roll(label, 2, axis=2)
    png = _slicer_overlay(image, label, prediction, geometry, classes, cache=[])
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png == render_overlay_png(image, geometry, prediction, label, classes)  # deterministic
