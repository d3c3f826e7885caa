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
