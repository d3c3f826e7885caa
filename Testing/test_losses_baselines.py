"""Baseline KD losses: hand-computed values, invariances, option checks and gradients (CPU, seconds)."""

from __future__ import annotations

import math

import pytest
import torch

from ReCoKDLib.losses.base import KDBatch, KDConfigError
from ReCoKDLib.losses.baselines import (
    CIRKDLoss,
    CWDLoss,
    EMKDLoss,
    FitNetLoss,
    IFVDLoss,
    LevelSelection,
    LogitKDLoss,
    class_centre_similarity,
    cross_image_relation_kd,
    importance_map_distillation,
    label_membership,
    pixel_region_kd,
    region_affinity_distillation,
)


def two_class_labels(batch: int = 1) -> torch.Tensor:
    """(B, 1, 4, 4, 4): class 1 in the first two depth slices (32 voxels), class 0 elsewhere."""
    labels = torch.zeros(batch, 1, 4, 4, 4, dtype=torch.long)
    labels[:, :, :2] = 1
    return labels


def two_class_features(labels: torch.Tensor, class1_vectors: list[tuple[float, float]]) -> torch.Tensor:
    """(B, 2, 4, 4, 4): class-0 voxels are (1, 0); class-1 voxels cycle through ``class1_vectors``."""
    feats = torch.zeros(labels.shape[0], 2, *labels.shape[2:])
    feats[:, 0] = 1.0
    cls1 = labels[:, 0] == 1
    idx = cls1.nonzero()
    for n, (b, d, h, w) in enumerate(idx.tolist()):
        feats[b, :, d, h, w] = torch.tensor(class1_vectors[n % len(class1_vectors)])
    return feats


def batch_of(teacher, student, **kw) -> KDBatch:
    teacher = [teacher] if isinstance(teacher, torch.Tensor) else teacher
    student = [student] if isinstance(student, torch.Tensor) else student
    kw.setdefault("raw_student_features", list(student))
    return KDBatch(teacher_features=list(teacher), student_features=list(student), **kw)


def manual_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def softmax(values: list[float]) -> list[float]:
    e = [math.exp(v) for v in values]
    return [x / sum(e) for x in e]


# ------------------------------------------------------------------------------------------- logit KD


def test_logit_kd_matches_manual_kl_on_two_voxels():
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # (K=2, voxels=2)
    s = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    batch = KDBatch(teacher_logits=t.view(1, 2, 1, 1, 2), student_logits=s.view(1, 2, 1, 1, 2))
    temperature = 2.0
    expected = 0.0
    for v in range(2):
        pt = softmax([t[0, v].item() / temperature, t[1, v].item() / temperature])
        ps = softmax([s[0, v].item() / temperature, s[1, v].item() / temperature])
        expected += manual_kl(pt, ps) * temperature**2 / 2
    out = LogitKDLoss(temperature=temperature)(batch, return_maps=True)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.maps["logits/kl"].shape == (1, 1, 1, 1, 2)
    assert out.maps["logits/kl"].mean().item() == pytest.approx(expected, rel=1e-5)


def test_logit_kd_zero_for_equal_logits_and_needs_logits():
    logits = torch.randn(2, 3, 2, 3, 4)
    out = LogitKDLoss()(KDBatch(teacher_logits=logits, student_logits=logits.clone()))
    assert abs(out.loss.item()) < 1e-6
    with pytest.raises(KDConfigError, match="logits"):
        LogitKDLoss()(KDBatch(teacher_features=[logits], student_features=[logits]))


# --------------------------------------------------------------------------------------------- FitNet


def test_fitnet_is_mse_per_level_with_uniform_or_explicit_weights():
    t0, s0 = torch.zeros(1, 2, 2, 2, 2), torch.ones(1, 2, 2, 2, 2)  # MSE 1
    t1, s1 = torch.zeros(1, 3, 1, 1, 2), torch.full((1, 3, 1, 1, 2), 2.0)  # MSE 4
    batch = batch_of([t0, t1], [s0, s1])
    assert FitNetLoss()(batch).loss.item() == pytest.approx(2.5)
    assert FitNetLoss(levels=[-1])(batch).loss.item() == pytest.approx(4.0)
    assert FitNetLoss(level_weights=[1.0, 0.5])(batch).loss.item() == pytest.approx(3.0)
    out = FitNetLoss()(batch, return_maps=True)
    assert set(out.terms) == {"0/mse", "1/mse"}
    assert torch.allclose(out.maps["1/discrepancy"], torch.full((1, 1, 1, 1, 2), 4.0))


# ------------------------------------------------------------------------------------------------ CWD


def test_cwd_on_two_channels_by_hand():
    # channel c is a distribution over 2 voxels: softmax(F_c / T)
    t = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    s = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    temperature = 1.0
    expected = sum(manual_kl(softmax(t[c].tolist()), softmax(s[c].tolist())) for c in range(2)) / (1 * 2)
    batch = batch_of(t.view(1, 2, 1, 1, 2), s.view(1, 2, 1, 1, 2))
    out = CWDLoss(temperature=temperature)(batch, return_maps=True)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.maps["0/cwd"].sum().item() == pytest.approx(expected, rel=1e-5)
    # T = 2: the distributions soften and the loss is multiplied by T^2
    expected_t2 = 4 * sum(manual_kl(softmax((t[c] / 2).tolist()), softmax((s[c] / 2).tolist())) for c in range(2)) / 2
    assert CWDLoss(temperature=2.0)(batch).loss.item() == pytest.approx(expected_t2, rel=1e-5)
    # normalised by B * C: repeating the sample or the channels changes nothing
    twice = batch_of(t.view(1, 2, 1, 1, 2).repeat(2, 2, 1, 1, 1), s.view(1, 2, 1, 1, 2).repeat(2, 2, 1, 1, 1))
    assert CWDLoss(temperature=temperature)(twice).loss.item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------- IFVD


def test_ifvd_two_class_map_by_hand_and_ignored_voxels_excluded():
    labels = two_class_labels()
    teacher = two_class_features(labels, [(0.0, 1.0)])  # every voxel equals its centre: cos 1
    student = two_class_features(labels, [(0.0, 1.0), (1.0, 0.0)])  # class-1 centre (.5, .5): cos 1/sqrt2
    batch = batch_of(teacher, student, labels=labels, num_classes=2)
    out = IFVDLoss()(batch, return_maps=True)
    per_voxel = (1 - 1 / math.sqrt(2)) ** 2
    assert out.loss.item() == pytest.approx(32 * per_voxel / 64, rel=1e-5)
    assert torch.allclose(out.maps["0/similarity_teacher"], torch.ones(1, 1, 4, 4, 4), atol=1e-6)
    # 16 class-0 voxels ignored: they leave the mean instead of counting as zeros
    ignored = labels.clone()
    ignored[:, :, 3] = -1
    out = IFVDLoss()(batch_of(teacher, student, labels=ignored, num_classes=2))
    assert out.loss.item() == pytest.approx(32 * per_voxel / 48, rel=1e-5)


def test_ifvd_zero_when_equal_and_needs_labels():
    feats = torch.randn(2, 4, 4, 4, 4)
    labels = torch.randint(0, 3, (2, 1, 8, 8, 8))  # labels at twice the feature size: nearest-resized
    assert IFVDLoss()(batch_of(feats, feats.clone(), labels=labels, num_classes=3)).loss.item() < 1e-10
    with pytest.raises(KDConfigError, match="labels"):
        IFVDLoss()(batch_of(feats, feats.clone()))


def test_class_centre_similarity_with_region_labels():
    regions = torch.zeros(1, 2, 4, 4, 4)
    regions[:, 0, :2] = 1  # region A: first two slices
    regions[:, 1, :1] = 1  # region B inside A
    membership = label_membership(regions, (4, 4, 4), num_classes=3, regions=True)
    assert membership.shape == (1, 3, 4, 4, 4)
    assert membership[:, 0].sum() == 32 and membership[:, 1].sum() == 32 and membership[:, 2].sum() == 16
    feats = torch.randn(1, 3, 4, 4, 4)
    sim, valid = class_centre_similarity(feats, membership)
    assert valid.all() and sim.shape == (1, 1, 4, 4, 4)
    assert (sim.abs() <= 1 + 1e-6).all()


# ----------------------------------------------------------------------------------------------- EMKD


def test_rad_two_classes_by_hand_and_absent_classes_skipped():
    labels = two_class_labels(batch=2)
    labels[1] = 0  # sample 1 has no class 1: its pair is skipped
    teacher = two_class_features(labels, [(0.0, 1.0)])  # region means (1,0), (0,1): cos 0
    student = two_class_features(labels, [(1.0, 1.0)])  # region means (1,0), (1,1): cos 1/sqrt2
    membership = label_membership(labels, (4, 4, 4), num_classes=2)
    loss, _ = region_affinity_distillation(student, teacher, membership)
    assert loss.item() == pytest.approx(0.5, rel=1e-5)
    # a third class that never occurs changes nothing and gives no NaN
    loss3, _ = region_affinity_distillation(student, teacher, label_membership(labels, (4, 4, 4), num_classes=3))
    assert torch.isfinite(loss3) and loss3.item() == pytest.approx(0.5, rel=1e-5)
    # a single present class: no pair at all -> 0, not NaN
    only_bg = torch.zeros_like(labels)
    loss0, _ = region_affinity_distillation(student, teacher, label_membership(only_bg, (4, 4, 4), num_classes=3))
    assert loss0.item() == 0.0


def test_imd_by_hand():
    teacher = torch.tensor([1.0, 1.0]).view(1, 1, 1, 1, 2)  # F^4 mean (1, 1) -> (1/sqrt2, 1/sqrt2)
    student = torch.tensor([1.0, 0.0]).view(1, 1, 1, 1, 2)  # -> (1, 0)
    loss, diff2 = importance_map_distillation(student, teacher, exponent=4)
    expected = (1 - 1 / math.sqrt(2)) ** 2 + 0.5
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert diff2.shape == (1, 1, 1, 1, 2)


def test_emkd_combines_pmd_imd_rad_over_low_and_high_levels():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 1, 8, 8, 8))
    teacher = [torch.randn(2, 4, 8, 8, 8), torch.randn(2, 6, 4, 4, 4), torch.randn(2, 8, 2, 2, 2)]
    raw = [torch.randn(2, 2, 8, 8, 8), torch.randn(2, 3, 4, 4, 4), torch.randn(2, 4, 2, 2, 2)]
    logits_t, logits_s = torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 8, 8, 8)
    batch = KDBatch(teacher_features=teacher, student_features=[t + 0.1 for t in teacher], raw_student_features=raw,
                    teacher_logits=logits_t, student_logits=logits_s, labels=labels, num_classes=3)
    out = EMKDLoss()(batch)
    assert set(out.terms) == {"pmd", "0/imd", "0/rad", "2/imd", "2/rad"}  # low and high level only
    expected = 0.1 * out.terms["pmd"] + 0.9 * sum(out.terms[f"{l}/imd"] + out.terms[f"{l}/rad"] for l in (0, 2))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the parts are the functional cores on the student's own (raw) features
    imd, _ = importance_map_distillation(raw[2], teacher[2])
    rad, _ = region_affinity_distillation(raw[2], teacher[2], label_membership(labels, (2, 2, 2), 3))
    assert out.terms["2/imd"].item() == pytest.approx(imd.item(), rel=1e-5)
    assert out.terms["2/rad"].item() == pytest.approx(rad.item(), rel=1e-5)
    assert set(EMKDLoss(levels=[1])(batch).terms) == {"pmd", "1/imd", "1/rad"}


def test_emkd_zero_when_equal():
    feats = [torch.randn(2, 4, 4, 4, 4), torch.randn(2, 4, 2, 2, 2)]
    logits = torch.randn(2, 3, 4, 4, 4)
    batch = KDBatch(teacher_features=feats, student_features=[f.clone() for f in feats], teacher_logits=logits,
                    student_logits=logits.clone(), labels=torch.randint(0, 3, (2, 1, 4, 4, 4)), num_classes=3)
    assert EMKDLoss(student_features="adapted")(batch).loss.item() < 1e-6
    with pytest.raises(KDConfigError, match="raw"):
        EMKDLoss()(batch)  # the default reads raw student features, which this batch lacks


# ---------------------------------------------------------------------------------------------- CIRKD


def test_cross_image_relation_by_hand_on_one_image():
    tau = 0.1
    teacher = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(1, 2, 1, 1, 2)  # both voxels (1,0): rows uniform
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 1, 2)  # orthogonal voxels: sim [[1,0],[0,1]]
    q = softmax([1 / tau, 0.0])
    expected = manual_kl([0.5, 0.5], q)  # both rows alike, averaged over rows
    loss, per_voxel = cross_image_relation_kd(student, teacher, tau)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert per_voxel.shape == (1, 1, 1, 1, 2)


def test_cross_image_relation_uses_every_pair_of_images():
    torch.manual_seed(1)
    s, t = torch.randn(3, 4, 2, 2, 2), torch.randn(3, 4, 2, 2, 2)
    loss, _ = cross_image_relation_kd(s, t, 0.5)

    def pair(i: int, j: int) -> float:
        def rel(x):
            a = torch.nn.functional.normalize(x[i].flatten(1), dim=0).T
            b = torch.nn.functional.normalize(x[j].flatten(1), dim=0).T
            return torch.log_softmax(a @ b.T / 0.5, dim=1)

        lp_s, lp_t = rel(s), rel(t)
        return (lp_t.exp() * (lp_t - lp_s)).sum(1).mean().item()

    expected = sum(pair(i, j) for i in range(3) for j in range(3)) / 9
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # image 1's student features influence the loss of image 0's rows (no single-image shortcut)
    s2 = s.clone()
    s2[1] += torch.randn_like(s2[1])
    _, m1 = cross_image_relation_kd(s, t, 0.5)
    _, m2 = cross_image_relation_kd(s2, t, 0.5)
    assert not torch.allclose(m1[0], m2[0])


def test_pixel_region_kd_zero_when_equal():
    x = torch.randn(2, 4, 2, 2, 2)
    memory = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    loss, per_voxel = pixel_region_kd(x, x.clone(), memory, 0.1, 1.0)
    assert abs(loss.item()) < 1e-6 and per_voxel.shape == (2, 1, 2, 2, 2)


def _cirkd_batch(labels: torch.Tensor) -> KDBatch:
    teacher = [torch.randn(2, 6, 8, 8, 8), torch.randn(2, 8, 4, 4, 4)]
    raw = [torch.randn(2, 3, 8, 8, 8, requires_grad=True), torch.randn(2, 4, 4, 4, 4, requires_grad=True)]
    return KDBatch(teacher_features=teacher, student_features=[t.clone() for t in teacher],
                   raw_student_features=raw, labels=labels, num_classes=3)


def test_cirkd_memory_bank_projector_and_gradients():
    torch.manual_seed(2)
    labels = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    labels[0, :, :4] = 1
    labels[1, :, :, :4] = 2
    loss = CIRKDLoss(teacher_channels=[6, 8], student_channels=[3, 4], num_classes=3, pool_size=4, memory_size=3)
    batch = _cirkd_batch(labels)
    out = loss(batch, return_maps=True)
    assert set(out.terms) == {"0/pixel", "0/region", "1/pixel", "1/region"}
    # sample 0 has classes {0, 1}, sample 1 {0, 2}: two background means and one each for 1 and 2
    assert loss.region_count_0.tolist() == [2, 1, 1] and loss.memory(0).shape == (4, 6)
    assert torch.allclose(loss.memory(0).norm(dim=1), torch.ones(4))
    assert out.maps["0/pixel_relation"].shape == (2, 1, 4, 4, 4)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.projectors.parameters() if p.requires_grad)
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in batch.raw_student_features)
    # the queue is a ring: memory_size bounds it; eval mode does not enqueue
    loss(batch)
    assert loss.region_count_0.tolist() == [3, 2, 2]
    loss.eval()
    loss(batch)
    assert loss.region_count_0.tolist() == [3, 2, 2]
    assert "region_memory_0" in loss.state_dict()


def test_cirkd_empty_memory_in_eval_gives_pixel_term_only():
    loss = CIRKDLoss(teacher_channels=[6, 8], student_channels=[3, 4], num_classes=3, pool_size=4).eval()
    out = loss(_cirkd_batch(torch.randint(0, 3, (2, 1, 8, 8, 8))))
    assert set(out.terms) == {"0/pixel", "1/pixel"} and torch.isfinite(out.loss)


# ---------------------------------------------------------------------------- options, levels, gradients


@pytest.mark.parametrize(
    "cls, kwargs, option",
    [
        (LogitKDLoss, {"temperature": 0}, "temperature"),
        (LogitKDLoss, {"temperature": float("nan")}, "temperature"),
        (CWDLoss, {"temperature": -1.0}, "temperature"),
        (FitNetLoss, {"level_weights": [1.0, -0.5]}, "level_weights"),
        (FitNetLoss, {"levels": [0, 1], "level_weights": [1.0]}, "level_weights"),
        (FitNetLoss, {"levels": []}, "levels"),
        (IFVDLoss, {"student_features": "student"}, "student_features"),
        (EMKDLoss, {"exponent": 0}, "exponent"),
        (EMKDLoss, {"pmd_weight": -0.1}, "pmd_weight"),
        (EMKDLoss, {"pmd_weight": 0, "imd_weight": 0, "rad_weight": 0}, "all 0"),
        (CIRKDLoss, {"teacher_channels": [4], "student_channels": [2], "pool_size": 0}, "pool_size"),
        (CIRKDLoss, {"teacher_channels": [4], "student_channels": [2], "memory_size": 0}, "memory_size"),
        (CIRKDLoss, {"teacher_channels": [4], "student_channels": [2], "projector_norm": "group"}, "projector_norm"),
        (CIRKDLoss, {"teacher_channels": [4], "student_channels": [2], "temperature": 0}, "temperature"),
        (CIRKDLoss, {}, "teacher_channels"),
    ],
)
def test_bad_options_are_rejected_naming_the_option(cls, kwargs, option):
    with pytest.raises(KDConfigError, match=option):
        cls(**kwargs)


def test_levels_that_do_not_exist_are_rejected_at_forward():
    batch = batch_of([torch.zeros(1, 2, 2, 2, 2)], [torch.zeros(1, 2, 2, 2, 2)])
    with pytest.raises(KDConfigError, match=r"levels \[3\]"):
        FitNetLoss(levels=[3])(batch)
    assert LevelSelection([0, -1], None, "x").resolve(1) == [(0, 1.0)]  # duplicates merge


def _feature_batch(requires_grad: bool = True) -> KDBatch:
    torch.manual_seed(3)
    teacher = [torch.randn(2, 4, 8, 8, 8), torch.randn(2, 6, 4, 4, 4)]
    student = [torch.randn(2, 4, 8, 8, 8, requires_grad=requires_grad), torch.randn(2, 6, 4, 4, 4, requires_grad=requires_grad)]
    return KDBatch(teacher_features=teacher, student_features=student, raw_student_features=student,
                   teacher_logits=torch.randn(2, 3, 8, 8, 8), student_logits=torch.randn(2, 3, 8, 8, 8, requires_grad=True),
                   labels=torch.randint(0, 3, (2, 1, 8, 8, 8)), num_classes=3)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FitNetLoss(),
        lambda: CWDLoss(),
        lambda: IFVDLoss(),
        lambda: EMKDLoss(),
        lambda: CIRKDLoss(teacher_channels=[4, 6], student_channels=[4, 6], num_classes=3, pool_size=4),
    ],
    ids=["fitnet", "cwd", "ifvd", "emkd", "cirkd"],
)
def test_gradients_reach_student_features_and_are_finite(make):
    batch = _feature_batch()
    out = make()(batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for f in batch.student_features:
        assert f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0
    assert all(not v.requires_grad for v in out.terms.values())


def test_equal_features_give_zero_for_feature_methods():
    feats = _feature_batch(requires_grad=False)
    same = KDBatch(teacher_features=feats.teacher_features, student_features=[f.clone() for f in feats.teacher_features],
                   raw_student_features=[f.clone() for f in feats.teacher_features], labels=feats.labels, num_classes=3)
    for loss in (FitNetLoss(), CWDLoss(), IFVDLoss(), EMKDLoss(pmd_weight=0)):
        assert abs(loss(same).loss.item()) < 1e-6, type(loss).__name__


# ------------------------------------------------------------------------------------------ dtype, device


def _all_losses():
    from ReCoKDLib.losses.mskd import FeatureFilteringLoss, MSKDLoss, RegionGraphLoss

    return {
        "logit": LogitKDLoss(),
        "fitnet": FitNetLoss(),
        "cwd": CWDLoss(),
        "ifvd": IFVDLoss(),
        "emkd": EMKDLoss(),
        "cirkd": CIRKDLoss(teacher_channels=[4, 6], student_channels=[4, 6], num_classes=3, pool_size=4).eval(),
        "ffd": FeatureFilteringLoss(),
        "rgd": RegionGraphLoss(),
        "rgd_pool": RegionGraphLoss(node="pool"),
        "mskd": MSKDLoss(),
    }


def test_bfloat16_autocast_is_close_to_float32():
    batch = _feature_batch(requires_grad=False)
    for name, loss in _all_losses().items():
        reference = loss(batch).loss.item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = loss(batch).loss.float().item()
        assert low == pytest.approx(reference, rel=5e-2, abs=1e-3), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    batch = _feature_batch(requires_grad=False)
    moved = KDBatch(
        teacher_features=[t.cuda() for t in batch.teacher_features],
        student_features=[s.cuda() for s in batch.student_features],
        raw_student_features=[s.cuda() for s in batch.student_features],
        teacher_logits=batch.teacher_logits.cuda(), student_logits=batch.student_logits.detach().cuda(),
        labels=batch.labels.cuda(), num_classes=3,
    )
    for name, loss in _all_losses().items():
        reference = loss(batch).loss.item()
        on_gpu = loss.cuda()(moved).loss.item()
        assert on_gpu == pytest.approx(reference, rel=1e-4, abs=1e-6), name
