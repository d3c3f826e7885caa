"""Inspection maps come from the loss code itself and resample to the image grid."""

import pytest
import torch

from ReCoKDLib.inspection import InspectionError, compute_maps, resample_to_image
from ReCoKDLib.losses.base import KDBatch
from ReCoKDLib.losses.recokd import ReCoKDLoss, spatial_attention
from ReCoKDLib.networks import build_unet, derive_student_config, encoder_tap_names, preset
from ReCoKDLib.taps import DistillationPair


def test_recokd_returns_every_map_per_level_and_class():
    torch.manual_seed(0)
    t = [torch.randn(1, 4, 4, 4, 4), torch.randn(1, 8, 2, 2, 2)]
    s = [f + 0.1 * torch.randn_like(f) for f in t]
    y = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    y[0, 0, :2, :2, :2] = 1
    out = ReCoKDLoss(teacher_channels=[4, 8], num_classes=2)(KDBatch(t, s, labels=y), return_maps=True)
    for level, size in ((0, (4, 4, 4)), (1, (2, 2, 2))):
        for name in ("fg_mask", "bg_mask", "teacher_spatial_attention", "student_spatial_attention",
                     "teacher_affinity", "student_affinity", "discrepancy", "class_mask/0", "class_mask/1"):
            key = f"{level}/{name}"
            assert out.maps[key].shape == (1, *size), key
            assert not out.maps[key].requires_grad
    assert torch.allclose(out.maps["0/teacher_spatial_attention"], spatial_attention(t[0]))
    assert float(out.maps["0/fg_mask"].sum()) == pytest.approx(1.0)
    assert float(out.maps["0/teacher_affinity"].sum()) == pytest.approx(1.0)
    assert torch.allclose(out.maps["0/discrepancy"], ((s[0] - t[0]) ** 2).mean(1))
    assert not ReCoKDLoss(teacher_channels=[4, 8])(KDBatch(t, s, labels=y)).maps


def test_resample_to_image_shapes_and_modes():
    m = torch.arange(8.0).view(2, 2, 2)
    up = resample_to_image(m, (4, 4, 4), mode="nearest")
    assert up.shape == (4, 4, 4) and set(up.unique().tolist()) == set(range(8))
    assert resample_to_image(m[None], (4, 6, 8)).shape == (1, 4, 6, 8)
    assert resample_to_image(m[None, None], (3, 3, 3)).shape == (1, 1, 3, 3, 3)
    with pytest.raises(InspectionError, match="resampling mode"):
        resample_to_image(m, (4, 4, 4), mode="cubic")
    with pytest.raises(InspectionError, match="a map must be"):
        resample_to_image(torch.zeros(2, 3, 4, 4, 4), (4, 4, 4))


def test_compute_maps_on_a_pair_without_grad_and_restores_modes():
    torch.manual_seed(1)
    t_cfg = preset("tiny", num_classes=3)
    s_cfg = derive_student_config(t_cfg, reduction=2, min_channels=4)
    pair = DistillationPair(build_unet(t_cfg), build_unet(s_cfg), encoder_tap_names(t_cfg), encoder_tap_names(s_cfg), (1, 16, 16, 16))
    loss = ReCoKDLoss(teacher_channels=pair.teacher_channels, num_classes=3)
    pair.train()
    maps = compute_maps(pair, loss, torch.randn(1, 1, 16, 16, 16), image_grid=True)  # teacher pseudo-labels
    assert pair.student.training and loss.training
    assert maps["1/teacher_affinity"].shape == (1, 16, 16, 16)
    assert maps["0/fg_mask"].shape == (1, 16, 16, 16)
    assert all(not v.requires_grad for v in maps.values())
    assert "terms/fg" in maps and maps["loss"].dim() == 0


def _saved_pair(tmp_path):
    """Tiny teacher and student model files, the student's card naming its taps and KD method."""
    from ReCoKDLib.checkpoint import ModelCard, save_model
    from ReCoKDLib.networks import build_unet, derive_student_config, encoder_tap_names, preset

    t_cfg = preset("tiny", num_classes=3)
    s_cfg = derive_student_config(t_cfg, reduction=2, min_channels=4)
    torch.manual_seed(0)
    paths = {}
    for role, cfg in (("teacher", t_cfg), ("student", s_cfg)):
        kd = {"methods": {"recokd": {"weight": 1.0}}, "teacher_taps": encoder_tap_names(t_cfg),
              "student_taps": encoder_tap_names(s_cfg)} if role == "student" else {}
        card = ModelCard(architecture={"kind": "dynunet", "config": cfg.to_dict()},
                         classes=["background", "a", "b"], spacing=[1.0, 1.0, 1.0],
                         normalization={"scheme": "zscore"}, patch_size=[16, 16, 16], role=role,
                         tap_names=encoder_tap_names(cfg), kd=kd)
        (tmp_path / role).mkdir()
        paths[role] = save_model(tmp_path / role / "model_last.pt", build_unet(cfg).state_dict(), card)
    return paths


def test_inspect_volume_uses_the_trained_kd_modules_and_the_input_grid(tmp_path):
    import numpy as np

    from ReCoKDLib.checkpoint import CheckpointError
    from ReCoKDLib.data.io import Geometry
    from ReCoKDLib.inspection import inspect_volume, load_trained_kd_state
    from ReCoKDLib.losses.registry import build_combined_kd_loss
    from ReCoKDLib.taps import DistillationPair
    from ReCoKDLib.teachers import load_model

    paths = _saved_pair(tmp_path)
    teacher, student = load_model(paths["teacher"]), load_model(paths["student"])
    assert load_trained_kd_state(paths["student"]) is None  # no run folder: fresh modules

    # What `recokd distill` leaves beside the student: checkpoint.pt with the trained modules.
    pair = DistillationPair(teacher.network, student.network, student.card.kd["teacher_taps"],
                            student.card.kd["student_taps"], (1, 16, 16, 16))
    kd = build_combined_kd_loss({"recokd": {"weight": 1.0}}, teacher_channels=pair.teacher_channels,
                                student_channels=pair.student_channels, num_classes=3)
    with torch.no_grad():
        for p in kd.parameters():
            p.normal_()
    torch.save({"job": "distill", "aux": {"adapters": pair.adapters.state_dict(), "kd_loss": kd.state_dict()}},
               paths["student"].parent / "checkpoint.pt")
    pair.remove_taps()
    state = load_trained_kd_state(paths["student"])
    assert set(state) == {"adapters", "kd_loss"}

    rng = np.random.default_rng(0)
    image = rng.normal(size=(12, 20, 18)).astype(np.float32)
    labels = np.zeros(image.shape, np.int64)
    labels[3:8, 4:12, 5:11] = 1
    geometry = Geometry(spacing=(1.0, 1.0, 1.0), origin=(5.0, -3.0, 2.0))
    trained = inspect_volume(teacher, student, image, geometry, labels, kd_state=state)
    fresh = inspect_volume(teacher, student, image, geometry, labels)
    assert trained and all(v.shape == image.shape for v in trained.values())
    # masks come from the labels, whatever the modules; affinities from the trained context blocks
    np.testing.assert_array_equal(trained["0/class_mask/1"] > 0, labels == 1)
    np.testing.assert_array_equal(trained["0/fg_mask"], fresh["0/fg_mask"])
    assert not np.allclose(trained["0/student_affinity"], fresh["0/student_affinity"])

    (paths["student"].parent / "checkpoint.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError):
        load_trained_kd_state(paths["student"])
