"""Feature taps and the teacher/student pair: hooks, frozen teacher, where gradients flow, lazy adapters."""

import pytest
import torch

from ReCoKDLib.losses.base import KDBatch, KDConfigError, LazyFeatures
from ReCoKDLib.losses.recokd import ReCoKDLoss
from ReCoKDLib.losses.registry import build_kd_loss
from ReCoKDLib.networks import build_unet, derive_student_config, encoder_tap_names, preset
from ReCoKDLib.taps import DistillationPair, FeatureAdapter, FeatureTaps, TapError, lazy_adapted_features


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


def _count_adapter_calls(pair):
    calls = []
    for level, adapter in enumerate(pair.adapters):
        adapter.register_forward_pre_hook(lambda _m, _a, level=level: calls.append(level))
    return calls


@pytest.mark.parametrize("name", ["recokd", "ms_sard", "ms_ca"])
def test_recokd_inside_the_pair_never_builds_the_adapted_features(name):
    pair = _pair()
    calls = _count_adapter_calls(pair)
    loss = build_kd_loss(name, teacher_channels=pair.teacher_channels, student_channels=pair.student_channels, num_classes=3)
    _, batch = pair(torch.randn(2, 1, 16, 16, 16), labels=torch.randint(0, 3, (2, 1, 16, 16, 16)))
    assert isinstance(batch.student_features, LazyFeatures)
    out = loss(batch)
    out.loss.backward()
    assert calls == [] and batch.student_features.materialised_levels == []
    assert all(a.proj.weight.grad.abs().sum() > 0 for a in pair.adapters)  # folded, still trained
    # inspection maps come from the same folded passes
    loss(batch, return_maps=True)
    assert calls == [] and batch.student_features.materialised_levels == []


def test_lazy_student_features_equal_the_eager_adapter_outputs_and_their_gradients():
    pair = _pair()
    calls = _count_adapter_calls(pair)
    x, y = torch.randn(2, 1, 16, 16, 16), torch.randint(0, 3, (2, 1, 16, 16, 16))
    _, batch = pair(x, labels=y)
    eager = [a(f, t.shape[2:]) for a, f, t in zip(pair.adapters, batch.raw_student_features, batch.teacher_features)]
    calls.clear()
    batch.check_features("test")  # shapes only
    assert calls == [] and batch.student_features.materialised_levels == []
    assert [tuple(batch.student_features.shape(i)) for i in range(2)] == [tuple(e.shape) for e in eager]
    lazy = list(batch.student_features)
    assert calls == [0, 1] and all(torch.equal(a, b) for a, b in zip(lazy, eager))
    assert batch.student_features[0] is lazy[0] and batch.student_features[-1] is lazy[1] and calls == [0, 1]  # cached
    # a method that reads student_features gets the same value and the same gradients as with a plain list
    fitnet = build_kd_loss("fitnet", teacher_channels=pair.teacher_channels, student_channels=pair.student_channels)
    params = list(pair.adapters.parameters())
    lazy_loss = fitnet(batch).loss
    eager_loss = fitnet(KDBatch(teacher_features=batch.teacher_features, student_features=eager)).loss
    assert torch.equal(lazy_loss, eager_loss)
    for g_lazy, g_eager in zip(torch.autograd.grad(lazy_loss, params), torch.autograd.grad(eager_loss, params)):
        assert torch.equal(g_lazy, g_eager)


def test_lazy_features_keep_the_grad_mode_they_were_made_under():
    adapter = FeatureAdapter(2, 4)
    raw, teacher = torch.randn(1, 2, 2, 3, 3, requires_grad=True), torch.randn(1, 4, 4, 6, 6)
    feats = lazy_adapted_features([adapter], [raw], [teacher])
    with torch.no_grad():  # e.g. first read by an inspection pass
        level = feats[0]
    assert level.shape == (1, 4, 4, 6, 6) and level.requires_grad
    with torch.no_grad():
        frozen = lazy_adapted_features([adapter], [raw], [teacher])
    assert not frozen[0].requires_grad
    assert feats[0:1] == [level] and len(feats) == 1
    with pytest.raises(IndexError, match="out of range"):
        feats[1]
    with pytest.raises(TapError, match="adapter maps 2 -> 4"):
        lazy_adapted_features([adapter], [raw], [torch.randn(1, 3, 4, 6, 6)])


def test_lazy_features_check_what_they_build_and_batches_check_shapes_without_building():
    built = []
    bad = LazyFeatures(lambda level: built.append(level) or torch.zeros(1, 2, 3, 3, 3), [(1, 2, 4, 4, 4)])
    batch = KDBatch(teacher_features=[torch.zeros(1, 2, 3, 3, 3)], student_features=bad)
    with pytest.raises(KDConfigError, match="level 0 teacher features"):
        batch.check_features("test")
    assert built == []
    with pytest.raises(KDConfigError, match="declared"):
        bad[0]
