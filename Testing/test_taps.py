"""Feature taps and the teacher/student pair: hooks, frozen teacher, where gradients flow."""

import pytest
import torch

from ReCoKDLib.losses.recokd import ReCoKDLoss
from ReCoKDLib.losses.registry import build_kd_loss
from ReCoKDLib.networks import build_unet, derive_student_config, encoder_tap_names, preset
from ReCoKDLib.taps import DistillationPair, FeatureAdapter, FeatureTaps, TapError


def _pair():
    torch.manual_seed(0)
    t_cfg = preset("tiny", num_classes=3)
    s_cfg = derive_student_config(t_cfg, reduction=2, min_channels=4)
    teacher, student = build_unet(t_cfg), build_unet(s_cfg)
    taps = encoder_tap_names(t_cfg)
    return DistillationPair(teacher, student, taps, encoder_tap_names(s_cfg), input_shape=(1, 16, 16, 16))


def test_taps_capture_and_remove_hooks_cleanly():
    model = build_unet(preset("tiny"))
    names = encoder_tap_names(preset("tiny"))
    x = torch.randn(1, 1, 16, 16, 16)
    with FeatureTaps(model, names) as taps:
        model.eval()
        model(x)
        feats = taps.collect()
    assert [f.shape[1] for f in feats] == [8, 16]
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(TapError, match="no module named"):
        FeatureTaps(model, ["nope"])


def test_adapter_projects_and_resizes_and_exposes_its_pointwise_map():
    adapter = FeatureAdapter(4, 8)
    x = torch.randn(1, 4, 3, 3, 3)
    assert adapter(x, (6, 6, 6)).shape == (1, 8, 6, 6, 6)
    weight, bias = adapter.pointwise_projection()
    assert torch.allclose(adapter(x), torch.einsum("oc,bcdhw->bodhw", weight, x) + bias[:, None, None, None], atol=1e-6)
    assert FeatureAdapter(4, 4).pointwise_projection() is None


@pytest.mark.parametrize("name", ["recokd", "ms_sard", "ms_ca"])
def test_gradients_reach_student_adapters_and_context_blocks_never_the_teacher(name):
    pair = _pair()
    pair.train()
    assert not pair.teacher.training
    loss = build_kd_loss(name, teacher_channels=pair.teacher_channels, student_channels=pair.student_channels, num_classes=3)
    x = torch.randn(2, 1, 16, 16, 16)
    y = torch.randint(0, 3, (2, 1, 16, 16, 16))
    _, batch = pair(x, labels=y)
    assert all(not t.requires_grad for t in batch.teacher_features)
    assert batch.student_adapters is not None
    out = loss(batch)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pair.student.parameters())
    for adapter in pair.adapters:
        assert adapter.proj.weight.grad is not None and adapter.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in pair.teacher.parameters())
    if name != "ms_sard":
        for block in (*loss.student_context, *loss.teacher_context):
            assert block.channel_add[-1].weight.grad.abs().sum() > 0  # zero-initialised last conv learns first


def test_context_mask_convs_learn_once_the_context_branch_is_active():
    pair = _pair()
    loss = ReCoKDLoss(teacher_channels=pair.teacher_channels, num_classes=3)
    with torch.no_grad():
        for block in (*loss.student_context, *loss.teacher_context):
            block.channel_add[-1].weight.normal_(0, 0.1)
    _, batch = pair(torch.randn(1, 1, 16, 16, 16), labels=torch.randint(0, 3, (1, 1, 16, 16, 16)))
    loss(batch).loss.backward()
    for block in (*loss.student_context, *loss.teacher_context):
        assert block.conv_mask.weight.grad.abs().sum() > 0


def test_teacher_runs_without_grad_and_not_in_inference_mode():
    pair = _pair()
    _, batch = pair(torch.randn(1, 1, 16, 16, 16))
    assert all(not t.is_inference() for t in batch.teacher_features)
    assert batch.teacher_logits.shape == (1, 3, 16, 16, 16)


def test_removed_taps_leave_plain_models():
    pair = _pair()
    pair.remove_taps()
    assert all(not m._forward_hooks for m in (*pair.teacher.modules(), *pair.student.modules()))
