"""Segmentation: sliding window, mirroring, exact output geometry, regions of interest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ReCoKDLib.checkpoint import ModelCard, save_model
from ReCoKDLib.data.io import Geometry, ImageDimensionError, read_image, write_image
from ReCoKDLib.infer import (
    ROI,
    InferenceError,
    predict_logits,
    segment_array,
    segment_file,
    segment_volume,
    window_aligned_box,
    window_starts,
)
from ReCoKDLib.networks import build_unet, preset
from ReCoKDLib.progress import Reporter
from ReCoKDLib.teachers import load_model


def _oblique(spacing=(1.2, 1.1, 1.7), origin=(3.0, 4.0, -5.0), angle=0.4) -> Geometry:
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]]) @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return Geometry(spacing, origin, tuple(rotation.ravel()))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny 3-class U-Net with random weights; spacing differs from the images' (resampling on)."""
    torch.manual_seed(0)
    config = preset("tiny", num_classes=3)
    card = ModelCard(architecture={"kind": "dynunet", "config": config.to_dict()}, classes=["bg", "a", "b"],
                     spacing=[2.0, 1.5, 1.5], normalization={"scheme": "zscore"}, patch_size=[16, 16, 16])
    path = save_model(tmp_path_factory.mktemp("m") / "tiny.pt", build_unet(config).state_dict(), card)
    return load_model(path)


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(1)
    return rng.normal(0, 1, (48, 56, 52)).astype(np.float32), _oblique()


@pytest.mark.parametrize("size,patch,overlap", [(50, 16, 0.5), (16, 16, 0.5), (10, 16, 0.25), (37, 16, 0.25), (64, 32, 0.5), (33, 16, 0.9)])
def test_window_starts_match_monai(size, patch, overlap):
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    padded = max(size, patch)
    interval = _get_scan_interval((padded,), (patch,), 1, (overlap,))
    expected = sorted({s[0].start for s in dense_patch_slices((padded,), (patch,), interval)})
    assert window_starts(size, patch, overlap) == expected


def test_predict_logits_shapes_and_mirroring():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1).eval()
    x = torch.randn(1, 12, 16, 20)
    with torch.no_grad():
        plain = net(x[None])[0]
        flipped = torch.flip(net(torch.flip(x[None], [2, 4])), [2, 4])[0]
    # one window covering the volume: Gaussian blending returns the network output itself
    torch.testing.assert_close(predict_logits(net, x, (12, 16, 20)), plain, atol=1e-5, rtol=1e-5)
    # mirroring averages the logits over all flips of the given axes: {}, {0}, {2}, {0, 2}
    with torch.no_grad():
        f0 = torch.flip(net(torch.flip(x[None], [2])), [2])[0]
        f2 = torch.flip(net(torch.flip(x[None], [4])), [4])[0]
    mirrored = predict_logits(net, x, (12, 16, 20), mirror_axes=(0, 2))
    torch.testing.assert_close(mirrored, (plain + f0 + f2 + flipped) / 4, atol=1e-5, rtol=1e-5)
    out = predict_logits(net, torch.randn(1, 30, 9, 40), (16, 16, 16), overlap=0.25, sw_batch_size=2)
    assert out.shape == (2, 30, 9, 40) and out.dtype == torch.float32 and out.device.type == "cpu"
    with pytest.raises(InferenceError, match=r"\(C, D, H, W\)"):
        predict_logits(net, torch.randn(30, 9, 40), (16, 16, 16))
    with pytest.raises(InferenceError, match="mirror axes"):
        predict_logits(net, x, (12, 16, 20), mirror_axes=(3,))


def test_segment_file_keeps_exact_geometry(model, volume, tmp_path):
    """Oblique direction, non-unit anisotropic spacing: the label map lies on the input grid."""
    image, geometry = volume
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        source = write_image(image, geometry, tmp_path / f"image{suffix}")
        _, read_geometry = read_image(source)
        out = tmp_path / f"seg{suffix}"
        probs = tmp_path / f"probs{suffix}"
        result = segment_file(model, source, out, overlap=0.25, device="cpu", probabilities_path=probs)
        labels, label_geometry = read_image(out)
        assert labels.shape == image.shape and labels.dtype == np.uint8
        np.testing.assert_allclose(label_geometry.spacing, read_geometry.spacing, rtol=1e-6)
        np.testing.assert_allclose(label_geometry.origin, read_geometry.origin, atol=1e-4)
        np.testing.assert_allclose(label_geometry.direction, read_geometry.direction, atol=1e-6)
        np.testing.assert_array_equal(labels, result.labels)
        p, p_geometry = read_image(probs)
        assert p.shape == (3,) + image.shape
        np.testing.assert_allclose(p.sum(axis=0), 1.0, atol=1e-4)
        np.testing.assert_array_equal(np.argmax(p, axis=0), labels)
    assert set(np.unique(result.labels)) <= {0, 1, 2} and len(np.unique(result.labels)) > 1


def test_roi_equals_full_inference_inside(model, volume):
    image, geometry = volume
    full = segment_volume(model, image, geometry, overlap=0.5, device="cpu", return_probabilities=True, window="patch")
    for roi in (ROI((5, 6, 7), (20, 25, 18)), ROI((30, 40, 30), (52, 56, 48)), ROI((0, 0, 0), (2, 3, 4))):
        part = segment_volume(model, image, geometry, roi=roi, overlap=0.5, device="cpu", return_probabilities=True)
        region = part.info["computed_region"]
        assert np.prod([b - a for a, b in region]) < np.prod(full.info["preprocessed_shape"])  # less was computed
        inside = tuple(slice(a, b) for a, b in part.roi_box)
        np.testing.assert_array_equal(part.labels[inside], full.labels[inside])
        np.testing.assert_allclose(part.probabilities[(slice(None),) + inside],
                                   full.probabilities[(slice(None),) + inside], atol=1e-6)
        outside = np.ones(image.shape, bool)
        outside[inside] = False
        assert not part.labels[outside].any() and np.all(part.probabilities[0][outside] == 1.0)


def test_roi_in_world_coordinates(model, volume):
    image, geometry = volume
    lps = geometry.index_to_physical([[10, 12, 14], [30, 31, 32]])
    ras = lps * np.array([-1.0, -1.0, 1.0])
    box_ras = ROI(tuple(ras[0]), tuple(ras[1]), "ras").voxel_box(geometry, image.shape)
    box_lps = ROI(tuple(lps[0]), tuple(lps[1]), "lps").voxel_box(geometry, image.shape)
    assert box_ras == box_lps
    # the box holds both corner voxels (k, j, i order) and lies inside the image
    (k0, k1), (j0, j1), (i0, i1) = box_ras
    assert k0 <= 14 < 32 < k1 and j0 <= 12 < 31 < j1 and i0 <= 10 < 30 < i1
    assert k1 <= image.shape[0] and j1 <= image.shape[1] and i1 <= image.shape[2]
    axis_aligned = Geometry((2.0, 1.0, 1.5), (10.0, 20.0, 30.0))
    roi = ROI((-11.0, -22.0, 33.0), (-15.0, -25.0, 36.0), "ras")  # RAS -> LPS (11, 22, 33)-(15, 25, 36)
    assert roi.voxel_box(axis_aligned, (10, 10, 10)) == ((2, 5), (2, 6), (1, 3))
    with pytest.raises(InferenceError, match="holds no voxel"):
        ROI((100, 100, 100), (120, 120, 120)).voxel_box(geometry, image.shape)
    with pytest.raises(InferenceError, match="6 numbers"):
        ROI.parse([1, 2, 3])


def test_segment_array_uses_ijk_to_ras(model, volume):
    image, geometry = volume
    expected = segment_volume(model, image, geometry, overlap=0.25, device="cpu").labels
    labels = segment_array(model, image, geometry.ijk_to_ras(), overlap=0.25, device="cpu")
    np.testing.assert_array_equal(labels, expected)


def test_window_aligned_box_reproduces_window_grid():
    shape, patch = (70, 40, 16), (16, 16, 16)
    box = window_aligned_box(shape, ((20, 30), (0, 5), (3, 4)), patch, 0.5)
    assert box == ((8, 40), (0, 16), (0, 16))
    for (a, b), size, p in zip(box, shape, patch):
        inner = [s + a for s in window_starts(b - a, p, 0.5)]
        assert set(inner) <= set(window_starts(size, p, 0.5))


def test_progress_and_bad_input(model, volume):
    image, geometry = volume
    events = []
    segment_volume(model, image[:20, :20, :20], geometry, device="cpu", mirror=True, reporter=Reporter(events.append))
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and all(e["stage"] == "segment" for e in events)
    assert progress[-1]["step"] == progress[-1]["total"]
    with pytest.raises(InferenceError, match="1 image channel"):
        segment_volume(model, np.stack([image, image]), geometry, device="cpu")
    with pytest.raises(ImageDimensionError, match="2D"):
        segment_volume(model, image[0], geometry, device="cpu")
    with pytest.raises(InferenceError, match="unknown device"):
        segment_volume(model, image, geometry, device="tpu")


def test_cli_segment(model, volume, tmp_path, capsys):
    from ReCoKDLib.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "--help"])
    assert exit_info.value.code == 0 and "--roi-space" in capsys.readouterr().out
    image, geometry = volume
    source = write_image(image[:24, :28, :26], geometry, tmp_path / "ct.nrrd")
    out = tmp_path / "seg.nrrd"
    code = main(["segment", model.source, str(source), str(out), "--roi", "2", "3", "4", "20", "25", "22",
                 "--device", "cpu", "--overlap", "0.25", "--probabilities", str(tmp_path / "p.nrrd"), "--progress", "json"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1]["event"] == "done" and lines[-1]["path"] == str(out)
    labels, out_geometry = read_image(out)
    assert labels.shape == (24, 28, 26) and not labels[:4].any() and not labels[:, :, :2].any()
    np.testing.assert_allclose(out_geometry.direction, geometry.direction, atol=1e-6)
    assert (tmp_path / "p.nrrd").is_file()
    # bad input: exit code 2 and a clear message, nothing written
    assert main(["segment", str(tmp_path / "missing.pt"), str(source), str(tmp_path / "x.nrrd"), "--progress", "none"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["segment", model.source, str(source), str(tmp_path / "x.nrrd"), "--overlap", "1.5", "--progress", "none"]) == 2
    assert main(["segment", model.source, str(source), str(tmp_path / "x.nrrd"), "--roi", "90", "90", "90", "99", "99", "99",
                 "--progress", "none"]) == 2
    assert "holds no voxel" in capsys.readouterr().err
    assert not (tmp_path / "x.nrrd").exists()


def test_one_window_over_the_volume_equals_monais_sliding_window_and_softmax_in_place_equals_torchs():
    """A window that holds the whole volume skips MONAI's accumulation (its output, weight and count
    maps): the same padding (monai/inferers/utils.py: ``diff // 2`` before), the same logits."""
    from monai.inferers import sliding_window_inference

    from ReCoKDLib.infer import softmax_

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.InstanceNorm3d(3)).eval()
    for shape, window in (((11, 13, 20), (16, 16, 24)), ((12, 16, 20), (12, 16, 20)), ((5, 16, 7), (8, 16, 8))):
        x = torch.randn(1, *shape)
        for cval in (0.0, -2.5):  # padding changes the instance-norm statistics: the pad must match MONAI's
            ours = predict_logits(net, x, window, cval=cval)
            with torch.no_grad():
                monai = sliding_window_inference(x[None], window, 1, net, overlap=0.5, mode="gaussian", cval=cval)[0]
            assert ours.shape == (3, *shape)
            torch.testing.assert_close(ours, monai, atol=1e-5, rtol=1e-5)
    logits = torch.randn(4, 5, 6, 7) * 30
    expected = torch.softmax(logits, dim=0)
    assert softmax_(logits) is logits
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-5)


def test_predict_logits_restores_training_mode():
    net = build_unet(preset("tiny", num_classes=2)).train()
    out = predict_logits(net, torch.randn(1, 16, 16, 16), (16, 16, 16))
    assert out.shape == (2, 16, 16, 16) and net.training


def test_segment_real_ct_crop_keeps_its_grid(tiny_ct_case, tmp_path):
    """A real CT crop (NIfTI, 3 mm): the label map is written on exactly the image's grid."""
    torch.manual_seed(0)
    config = preset("tiny", num_classes=3)
    card = ModelCard(architecture={"kind": "dynunet", "config": config.to_dict()}, classes=["bg", "a", "b"],
                     spacing=[4.0, 4.0, 4.0], patch_size=[16, 16, 16],
                     normalization={"scheme": "ct", "clip": [-100.0, 240.0], "mean": 90.0, "std": 50.0})
    path = save_model(tmp_path / "m.pt", build_unet(config).state_dict(), card)
    image, geometry = read_image(tiny_ct_case.image_paths[0])
    out = tmp_path / "seg.nii.gz"
    segment_file(path, tiny_ct_case.image_paths[0], out, device="cpu", overlap=0.25)
    labels, out_geometry = read_image(out)
    assert labels.shape == image.shape
    np.testing.assert_allclose(out_geometry.spacing, geometry.spacing, rtol=1e-6)
    np.testing.assert_allclose(out_geometry.origin, geometry.origin, atol=1e-4)
    np.testing.assert_allclose(out_geometry.direction, geometry.direction, atol=1e-6)


def test_segment_file_refuses_unknown_output_format_before_running(model, volume, tmp_path):
    from ReCoKDLib.data.io import ImageReadError

    image, geometry = volume
    source = write_image(image[:8, :8, :8], geometry, tmp_path / "ct.mha")
    events = []
    with pytest.raises(ImageReadError, match="cannot write"):
        segment_file(model, source, tmp_path / "seg.txt", reporter=Reporter(events.append))
    assert events == []  # refused before any work
