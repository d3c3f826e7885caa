"""MSKD (ReCoKD's interpretation): FMM, filter, FFD, RGD and their combination (CPU, seconds)."""

from __future__ import annotations

import math

import pytest
import torch

from ReCoKDLib.losses.base import KDBatch, KDConfigError
from ReCoKDLib.losses.baselines import label_membership
from ReCoKDLib.losses.mskd import (
    FeatureFilteringLoss,
    MSKDLoss,
    RegionGraphLoss,
    feature_filter,
    feature_filtering_distillation,
    feature_mapping,
    graph_distillation,
    pooled_nodes,
)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def two_class_case(batch: int = 1):
    """Labels (B,1,4,4,4) with class 1 in two slices; teacher class means (1,0),(0,1); student (1,0),(1,1)."""
    labels = torch.zeros(batch, 1, 4, 4, 4, dtype=torch.long)
    labels[:, :, :2] = 1
    teacher = torch.zeros(batch, 2, 4, 4, 4)
    teacher[:, 0] = 1.0
    student = teacher.clone()
    inside = (labels[:, 0] == 1).unsqueeze(1)
    teacher = torch.where(inside, torch.tensor([0.0, 1.0]).view(1, 2, 1, 1, 1), teacher)
    student = torch.where(inside, torch.tensor([1.0, 1.0]).view(1, 2, 1, 1, 1), student)
    return labels, teacher, student


def batch_of(teacher, student, **kw) -> KDBatch:
    teacher = [teacher] if isinstance(teacher, torch.Tensor) else list(teacher)
    student = [student] if isinstance(student, torch.Tensor) else list(student)
    kw.setdefault("raw_student_features", student)
    return KDBatch(teacher_features=teacher, student_features=student, **kw)


# ------------------------------------------------------------------------------------------------ FFD


def test_feature_mapping_by_hand():
    # channel 0: (1, 3), GAP 2; channel 1: (-1, 0) -> ReLU 0, GAP 0; weights softmax(2, 0)
    feats = torch.tensor([[1.0, 3.0], [-1.0, 0.0]]).view(1, 2, 1, 1, 2)
    w0 = math.exp(2) / (math.exp(2) + 1)
    m = feature_mapping(feats)
    assert m.shape == (1, 1, 1, 1, 2)
    assert m.flatten().tolist() == pytest.approx([w0 * 1, w0 * 3], rel=1e-6)


def test_feature_mapping_does_not_depend_on_width():
    feats = torch.rand(2, 3, 2, 2, 2)
    assert torch.allclose(feature_mapping(feats), feature_mapping(torch.cat([feats, feats], dim=1)), atol=1e-6)


def test_feature_filter_by_hand():
    m_t = torch.tensor([0.0, 2.0]).view(1, 1, 1, 1, 2)
    u = [0.5, sigmoid(2.0)]  # p_f >= 0.5 everywhere: the foreground branch
    g = [x**0.6 for x in u]
    w = feature_filter(m_t, gamma=0.6, threshold=0.5)
    assert w.flatten().tolist() == pytest.approx([x / (sum(g) / 2) for x in g], rel=1e-6)
    # threshold 0.6 filters the uncertain voxel (p_f = p_b = 0.5) out; the other carries all the weight
    assert feature_filter(m_t, gamma=0.6, threshold=0.6).flatten().tolist() == pytest.approx([0.0, 2.0], rel=1e-6)
    # a negative map value: background branch p_b = 1 - sigmoid(-3) = sigmoid(3)
    w = feature_filter(torch.tensor([-3.0, 3.0]).view(1, 1, 1, 1, 2), gamma=1.0, threshold=0.5)
    assert w.flatten().tolist() == pytest.approx([1.0, 1.0], rel=1e-6)


def test_ffd_loss_by_hand_and_zero_when_equal():
    teacher = torch.tensor([[0.0, 2.0]]).view(1, 1, 1, 1, 2)  # one channel: FMM map = ReLU(F)
    student = torch.tensor([[1.0, 2.0]]).view(1, 1, 1, 1, 2)
    g = [0.5**0.6, sigmoid(2.0) ** 0.6]
    expected = (g[0] / (sum(g) / 2)) * 1.0 / 2  # only voxel 0 differs, by 1
    loss, maps = feature_filtering_distillation(student, teacher)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert set(maps) == {"filter", "fmm_teacher", "fmm_student", "discrepancy"}
    feats = torch.randn(2, 4, 4, 4, 4)
    assert FeatureFilteringLoss()(batch_of(feats, feats.clone())).loss.item() < 1e-10


def test_ffd_reads_raw_students_of_other_width_and_size():
    teacher = torch.randn(2, 8, 8, 8, 8)
    raw = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    batch = KDBatch(teacher_features=[teacher], student_features=[torch.randn(2, 8, 8, 8, 8)], raw_student_features=[raw])
    out = FeatureFilteringLoss()(batch, return_maps=True)
    assert out.maps["0/fmm_student"].shape == (2, 1, 8, 8, 8)
    out.loss.backward()
    assert raw.grad is not None and raw.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ RGD


def test_rgd_prototype_graph_by_hand():
    labels, teacher, student = two_class_case()
    out = RegionGraphLoss()(batch_of(teacher, student, labels=labels, num_classes=2), return_maps=True)
    # unit nodes: teacher (1,0),(0,1); student (1,0),(1,1)/sqrt2
    node = (0.0 + (1 / math.sqrt(2)) ** 2 + (1 / math.sqrt(2) - 1) ** 2) / 2
    edge = (1 / math.sqrt(2)) ** 2  # both off-diagonal entries: cos 1/sqrt2 vs 0
    assert out.terms["0/node"].item() == pytest.approx(node, rel=1e-5)
    assert out.terms["0/edge"].item() == pytest.approx(edge, rel=1e-5)
    assert out.loss.item() == pytest.approx(node + edge, rel=1e-5)
    # node maps painted on the voxels of each class
    disc = out.maps["0/discrepancy"]
    assert disc.shape == (1, 1, 4, 4, 4)
    assert disc[0, 0, 3].unique().tolist() == pytest.approx([0.0], abs=1e-6)
    assert disc[0, 0, 0].unique().tolist() == pytest.approx([2 * node], rel=1e-5)


def test_rgd_absent_classes_no_nan_and_invariant():
    labels, teacher, student = two_class_case(batch=2)
    labels[1] = 0  # sample 1: background only, no edge
    two = RegionGraphLoss()(batch_of(teacher, student, labels=labels, num_classes=2))
    five = RegionGraphLoss()(batch_of(teacher, student, labels=labels, num_classes=5))
    assert torch.isfinite(five.loss)
    assert five.loss.item() == pytest.approx(two.loss.item(), rel=1e-6)
    assert five.terms["0/edge"].item() == pytest.approx(0.5, rel=1e-5)


def test_rgd_pool_nodes_are_bounded_and_zero_when_equal():
    feats = torch.randn(2, 4, 32, 32, 16)
    nodes, grid = pooled_nodes(feats, pool=2, max_nodes=512)
    assert math.prod(grid) <= 512 and nodes.shape == (2, math.prod(grid), 4)
    nodes, grid = pooled_nodes(torch.randn(1, 3, 4, 4, 4), pool=2, max_nodes=512)
    assert grid == (2, 2, 2)
    loss = RegionGraphLoss(node="pool")
    small = torch.randn(2, 4, 8, 8, 8)
    assert loss(batch_of(small, small.clone())).loss.item() < 1e-10
    out = loss(batch_of(small, torch.randn(2, 4, 8, 8, 8)), return_maps=True)
    assert out.maps["0/edge_discrepancy"].shape == (2, 1, 8, 8, 8)


def test_graph_distillation_edges_only_for_different_widths():
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = graph_distillation(torch.randn(1, 3, 2), torch.randn(1, 3, 5), mask)
    assert "node" not in out and torch.isfinite(out["edge"])
    labels = torch.randint(0, 3, (2, 1, 4, 4, 4))
    batch = KDBatch(teacher_features=[torch.randn(2, 6, 4, 4, 4)], student_features=[torch.randn(2, 6, 4, 4, 4)],
                    raw_student_features=[torch.randn(2, 2, 4, 4, 4)], labels=labels, num_classes=3)
    with pytest.raises(KDConfigError, match="node_weight=0"):
        RegionGraphLoss(student_features="raw")(batch)
    out = RegionGraphLoss(student_features="raw", node_weight=0)(batch)
    assert set(out.terms) == {"0/edge"}


def test_rgd_prototype_needs_labels():
    feats = torch.randn(1, 2, 4, 4, 4)
    with pytest.raises(KDConfigError, match="labels"):
        RegionGraphLoss()(batch_of(feats, feats))


# ----------------------------------------------------------------------------------------------- MSKD


def test_mskd_is_the_weighted_sum_of_its_parts():
    torch.manual_seed(0)
    teacher = [torch.randn(2, 4, 8, 8, 8), torch.randn(2, 6, 4, 4, 4)]
    student = [torch.randn(2, 4, 8, 8, 8, requires_grad=True), torch.randn(2, 6, 4, 4, 4, requires_grad=True)]
    labels = torch.randint(0, 3, (2, 1, 8, 8, 8))
    batch = batch_of(teacher, student, labels=labels, num_classes=3)
    ffd = FeatureFilteringLoss()(batch).loss
    rgd = RegionGraphLoss()(batch).loss
    mskd = MSKDLoss(ffd_weight=2.0, rgd_weight=0.5)
    out = mskd(batch, return_maps=True)
    assert out.loss.item() == pytest.approx(2.0 * ffd.item() + 0.5 * rgd.item(), rel=1e-5)
    assert out.terms["ffd"].item() == pytest.approx(2.0 * ffd.item(), rel=1e-5)
    assert {"0/ffd_filter", "0/rgd_edge_discrepancy", "0/discrepancy", "1/ffd_fmm_teacher"} <= set(out.maps)
    assert str(mskd) == "2*ffd + 0.5*rgd"
    out.loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert set(MSKDLoss(rgd_weight=0)(batch).terms) == {"ffd", "ffd/0/ffd", "ffd/1/ffd"}


def test_mskd_zero_when_equal():
    feats = [torch.randn(2, 4, 8, 8, 8), torch.randn(2, 6, 4, 4, 4)]
    batch = batch_of(feats, [f.clone() for f in feats], labels=torch.randint(0, 3, (2, 1, 8, 8, 8)), num_classes=3)
    assert abs(MSKDLoss()(batch).loss.item()) < 1e-6
    assert abs(MSKDLoss(node="pool")(batch).loss.item()) < 1e-6


@pytest.mark.parametrize(
    "cls, kwargs, option",
    [
        (FeatureFilteringLoss, {"gamma": 0}, "gamma"),
        (FeatureFilteringLoss, {"threshold": 1.0}, "threshold"),
        (FeatureFilteringLoss, {"student_features": "teacher"}, "student_features"),
        (RegionGraphLoss, {"node": "voxel"}, "node"),
        (RegionGraphLoss, {"pool": 0}, "pool"),
        (RegionGraphLoss, {"max_nodes": 2.5}, "max_nodes"),
        (RegionGraphLoss, {"node_weight": 0, "edge_weight": 0}, "both 0"),
        (MSKDLoss, {"ffd_weight": -1}, "ffd_weight"),
        (MSKDLoss, {"ffd_weight": 0, "rgd_weight": 0}, "both 0"),
        (MSKDLoss, {"levels": [0], "level_weights": [1.0, 1.0]}, "level_weights"),
    ],
)
def test_bad_options_are_rejected_naming_the_option(cls, kwargs, option):
    with pytest.raises(KDConfigError, match=option):
        cls(**kwargs)


def test_label_membership_resizes_by_nearest():
    labels = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    labels[:, :, :4] = 2
    m = label_membership(labels, (4, 4, 4), num_classes=3)
    assert m[0, 2].sum() == 32 and m[0, 0].sum() == 32 and m[0, 1].sum() == 0
