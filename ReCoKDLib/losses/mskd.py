"""MSKD: Feature Filtering Distillation (FFD) and Region Graph Distillation (RGD), in 3D.

MSKD ("Structured knowledge distillation for efficient medical image segmentation", Computers in
Biology and Medicine 2023, 107284) publishes no equations and no code; the only public sketch
(ACF-BCKD's ``mskd_losses.py``) is 2D, unused and broken. What follows is **ReCoKD's
interpretation** (kd-methods.md §3.2, "recommended 3D reimplementation"), built from the abstract's
description and the repairable parts of that sketch:

* FFD: a parameter-free Feature Mapping Module (FMM) turns each network's features into one map;
  a fixed filter from the teacher's map weights the squared map difference.
* RGD: graph nodes are class-region prototypes (or pooled patches), edges their cosine
  similarities; the student matches the teacher's nodes and edges.

Shapes: features ``(B, C, D, H, W)``, FMM maps and inspection maps ``(B, 1, D, H, W)``, graph nodes
``(B, N, C)``, edges ``(B, N, N)``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ReCoKDLib.losses.base import KDBatch, KDConfigError, KDOutput, zero_loss
from ReCoKDLib.losses.baselines import (
    LevelSelection,
    check_choice,
    check_number,
    class_prototypes,
    label_membership,
    student_level,
)

__all__ = [
    "FeatureFilteringLoss",
    "MSKDLoss",
    "RegionGraphLoss",
    "feature_filter",
    "feature_filtering_distillation",
    "feature_mapping",
    "graph_distillation",
    "pooled_nodes",
]

_STUDENT_SOURCES = ("adapted", "raw")
_NODE_KINDS = ("prototype", "pool")


# ------------------------------------------------------------------------------------ functional core


def feature_mapping(features: Tensor) -> Tensor:
    """MSKD's Feature Mapping Module (interpretation): ``(B, C, D, H, W)`` -> ``(B, 1, D, H, W)``.

    ``x = ReLU(F)``; channel weights ``w = softmax_c(GAP(x))``; map ``m = sum_c w_c x_c``. Since the
    weights sum to 1, ``m`` is a weighted channel mean whose scale does not depend on the channel
    count, so teacher and student maps are comparable without an adapter (the 2D sketch's extra
    ``mean_c`` would divide each network's map by its own width). Parameter-free.
    """
    x = F.relu(features.float())
    weights = torch.softmax(x.mean(dim=(2, 3, 4)), dim=1)
    return torch.einsum("bc,bcdhw->bdhw", weights, x).unsqueeze(1)


def feature_filter(teacher_map: Tensor, gamma: float = 0.6, threshold: float = 0.5) -> Tensor:
    """FFD's fixed filter from the teacher's FMM map ``(B, 1, D, H, W)`` (interpretation).

    ``p_f = sigmoid(m_T)``, ``p_b = 1 - p_f``; ``u = p_f`` where ``p_f >= threshold``, else ``p_b``
    where ``p_b > threshold``, else 0 (filtered out: too uncertain). The weight is
    ``W = u^gamma / mean_v(u^gamma)`` per sample, so ``mean(W) = 1`` (0 where all is filtered). The
    sketch's ``exp(gamma)`` is read as the intended ``pow(gamma)``; ties go to the foreground branch
    so that no voxel is counted twice.
    """
    p_fg = torch.sigmoid(teacher_map.float())
    p_bg = 1.0 - p_fg
    kept = torch.where(p_fg >= threshold, p_fg, torch.where(p_bg > threshold, p_bg, torch.zeros_like(p_fg)))
    weight = kept.pow(gamma)
    mean = weight.mean(dim=(1, 2, 3, 4), keepdim=True)
    return torch.where(mean > 0, weight / mean.clamp_min(1e-12), torch.zeros_like(weight))


def feature_filtering_distillation(
    student: Tensor, teacher: Tensor, gamma: float = 0.6, threshold: float = 0.5
) -> tuple[Tensor, dict[str, Tensor]]:
    """FFD (ReCoKD's interpretation of MSKD): ``mean_{b,v} W (m_S - m_T)^2``.

    Args:
        student: ``(B, C_s, d, h, w)`` (any width; resized to the teacher's grid after mapping).
        teacher: ``(B, C_t, D, H, W)``.

    Returns:
        the scalar loss and maps ``filter``, ``fmm_teacher``, ``fmm_student``, ``discrepancy``
        (``(m_S - m_T)^2``), each ``(B, 1, D, H, W)``.
    """
    m_t = feature_mapping(teacher)
    m_s = feature_mapping(student)
    if m_s.shape[2:] != m_t.shape[2:]:
        m_s = F.interpolate(m_s, size=tuple(m_t.shape[2:]), mode="trilinear", align_corners=False)
    weight = feature_filter(m_t.detach(), gamma, threshold)
    diff2 = (m_s - m_t).pow(2)
    loss = (weight * diff2).mean()
    return loss, {"filter": weight, "fmm_teacher": m_t, "fmm_student": m_s, "discrepancy": diff2}


def pooled_nodes(features: Tensor, pool: int, max_nodes: int) -> tuple[Tensor, tuple[int, int, int]]:
    """Patch nodes: ``(B, C, D, H, W)`` average-pooled to ``p x p x p`` patches -> ``(B, N, C)`` and the grid.

    The grid is ``max(1, size // pool)`` per axis, shrunk uniformly while it has more than
    ``max_nodes`` cells (the edge matrix is ``N x N``).
    """
    grid = [max(1, int(s) // pool) for s in features.shape[2:]]
    while math.prod(grid) > max_nodes:
        grid = [max(1, g // 2) if g == max(grid) else g for g in grid]
    pooled = F.adaptive_avg_pool3d(features, tuple(grid))
    return pooled.flatten(2).transpose(1, 2), tuple(grid)  # type: ignore[return-value]


def graph_distillation(student_nodes: Tensor, teacher_nodes: Tensor, node_mask: Tensor) -> dict[str, Tensor]:
    """RGD on graphs of L2-normalised nodes ``(B, N, C_s)`` / ``(B, N, C_t)`` with ``node_mask`` ``(B, N)``.

    * node term: mean over valid nodes of ``||n_S - n_T||^2`` (needs ``C_s == C_t``; skipped otherwise);
    * edge term: edges are the cosine-similarity matrices ``(B, N, N)``; mean over valid pairs
      ``i != j`` of ``(e_S - e_T)^2`` (channel-free).

    Returns:
        ``node``, ``edge`` (scalars; ``node`` absent when widths differ) and per-node ``node_map``
        / ``edge_map`` ``(B, N)`` (a node's squared distance, its mean squared edge difference).
    """
    unit_s = F.normalize(student_nodes.float(), dim=-1)
    unit_t = F.normalize(teacher_nodes.float(), dim=-1)
    mask = node_mask.to(unit_s.dtype)
    n = mask.shape[1]
    off_diagonal = 1.0 - torch.eye(n, dtype=unit_s.dtype, device=unit_s.device)
    pairs = mask.unsqueeze(2) * mask.unsqueeze(1) * off_diagonal
    edge_diff2 = (unit_s @ unit_s.transpose(1, 2) - unit_t @ unit_t.transpose(1, 2)).pow(2) * pairs
    out = {
        "edge": edge_diff2.sum() / pairs.sum().clamp_min(1),
        "edge_map": edge_diff2.sum(-1) / pairs.sum(-1).clamp_min(1),
    }
    if unit_s.shape[-1] == unit_t.shape[-1]:
        node_d2 = (unit_s - unit_t).pow(2).sum(-1) * mask
        out["node"] = node_d2.sum() / mask.sum().clamp_min(1)
        out["node_map"] = node_d2
    return out


# ---------------------------------------------------------------------------------------------- modules


class FeatureFilteringLoss(nn.Module):
    """MSKD's Feature Filtering Distillation, per level: **ReCoKD's interpretation** (kd-methods.md §3).

    The MSKD paper gives no equations and no code; this follows the recommended 3D
    reimplementation: FMM maps ``m_S``, ``m_T`` (:func:`feature_mapping`), a fixed teacher filter
    ``W`` (:func:`feature_filter`) and ``L = mean(W (m_S - m_T)^2)``. FMM is channel-free and
    parameter-free ("without introducing additional model parameters"), so by default it reads the
    student's own features, not the adapters'.

    Terms: ``"<level>/ffd"``. Maps: ``"<level>/filter"``, ``"<level>/fmm_teacher"``,
    ``"<level>/fmm_student"``, ``"<level>/discrepancy"``.

    Args:
        gamma: filter exponent > 0 (0.6, from the sketch).
        threshold: filter threshold in (0, 1) (0.5).
        student_features: ``"raw"`` (default) or ``"adapted"``.
        levels, level_weights: see :class:`~ReCoKDLib.losses.baselines.LevelSelection`.
    """

    def __init__(
        self,
        *,
        gamma: float = 0.6,
        threshold: float = 0.5,
        student_features: str = "raw",
        levels: Sequence[int] | None = None,
        level_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        who = "FFD"
        self.gamma = check_number(who, "gamma", gamma)
        self.threshold = check_number(who, "threshold", threshold)
        if not 0 < self.threshold < 1:
            raise KDConfigError(f"{who}: threshold must be in (0, 1), got {threshold!r}")
        self.student_source = check_choice(who, "student_features", student_features, _STUDENT_SOURCES)
        self.selection = LevelSelection(levels, level_weights, who)

    def forward(self, batch: KDBatch, return_maps: bool = False) -> KDOutput:
        batch.check_features("FFD")
        total, terms, maps = zero_loss(batch), {}, {}
        for level, weight in self.selection.resolve(batch.num_levels):
            s = student_level(batch, level, self.student_source, "FFD", resize=False)
            loss, level_maps = feature_filtering_distillation(s, batch.teacher_features[level], self.gamma, self.threshold)
            total = total + weight * loss
            terms[f"{level}/ffd"] = loss.detach()
            if return_maps:
                maps.update({f"{level}/{k}": v.detach() for k, v in level_maps.items()})
        return KDOutput(loss=total, terms=terms, maps=maps)


class RegionGraphLoss(nn.Module):
    """MSKD's Region Graph Distillation, per level: **ReCoKD's interpretation** (kd-methods.md §3).

    The MSKD paper gives no equations and the public sketch stops before its edge term; this
    follows the recommended 3D reimplementation. Nodes are, per sample,

    * ``node="prototype"`` (default): the mean feature of each class present in the (nearest-resized)
      labels, the "region" and "structured semantic" units of the abstract; or
    * ``node="pool"``: average-pooled ``pool^3`` patches (the sketch's nodes), at most ``max_nodes``.

    Nodes are L2-normalised, edges are their cosine similarities, and
    ``L = node_weight * node MSE + edge_weight * edge MSE`` (:func:`graph_distillation`). The node
    term needs equal widths (adapted features, the default); with ``student_features="raw"`` and
    other widths set ``node_weight=0`` to keep only the parameter-free edges.

    Terms: ``"<level>/node"``, ``"<level>/edge"``. Maps (per node, painted back on its voxels):
    ``"<level>/discrepancy"`` (node distance) and ``"<level>/edge_discrepancy"``.

    Args:
        node: ``"prototype"`` or ``"pool"``.
        pool: patch size for ``node="pool"`` (2).
        max_nodes: cap on patch nodes per sample (512 = ``8^3``).
        node_weight, edge_weight: >= 0, not both 0 (1.0 each).
        student_features: ``"adapted"`` (default) or ``"raw"``.
        levels, level_weights: see :class:`~ReCoKDLib.losses.baselines.LevelSelection`.
    """

    def __init__(
        self,
        *,
        node: str = "prototype",
        pool: int = 2,
        max_nodes: int = 512,
        node_weight: float = 1.0,
        edge_weight: float = 1.0,
        student_features: str = "adapted",
        levels: Sequence[int] | None = None,
        level_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        who = "RGD"
        self.node = check_choice(who, "node", node, _NODE_KINDS)
        for name, value in (("pool", pool), ("max_nodes", max_nodes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise KDConfigError(f"{who}: {name} must be a positive integer, got {value!r}")
        self.pool, self.max_nodes = pool, max_nodes
        self.node_weight = check_number(who, "node_weight", node_weight, positive=False)
        self.edge_weight = check_number(who, "edge_weight", edge_weight, positive=False)
        if self.node_weight + self.edge_weight == 0:
            raise KDConfigError(f"{who}: node_weight and edge_weight are both 0; nothing to distil")
        self.student_source = check_choice(who, "student_features", student_features, _STUDENT_SOURCES)
        self.selection = LevelSelection(levels, level_weights, who)

    def _nodes(self, batch: KDBatch, level: int) -> tuple[Tensor, Tensor, Tensor, Callable[[Tensor], Tensor]]:
        """Student nodes, teacher nodes, node mask, and a function painting ``(B, N)`` values on voxels."""
        t = batch.teacher_features[level]
        s = student_level(batch, level, self.student_source, "RGD")
        if self.node == "prototype":
            membership = label_membership(batch.require_labels("RGD (node='prototype')"), t.shape[2:],
                                          batch.class_count(), batch.regions)
            nodes_t, present = class_prototypes(t, membership)
            nodes_s, _ = class_prototypes(s, membership)

            def paint(values: Tensor) -> Tensor:
                m = membership.to(values.dtype)
                return torch.einsum("bk,bkdhw->bdhw", values, m).unsqueeze(1) / m.sum(1, keepdim=True).clamp_min(1e-6)

            return nodes_s, nodes_t, present, paint
        nodes_t, grid = pooled_nodes(t, self.pool, self.max_nodes)
        nodes_s, _ = pooled_nodes(s, self.pool, self.max_nodes)
        mask = torch.ones(nodes_t.shape[:2], dtype=torch.bool, device=t.device)

        def paint(values: Tensor) -> Tensor:
            return F.interpolate(values.view(values.shape[0], 1, *grid), size=tuple(t.shape[2:]), mode="nearest")

        return nodes_s, nodes_t, mask, paint

    def forward(self, batch: KDBatch, return_maps: bool = False) -> KDOutput:
        batch.check_features("RGD")
        total, terms, maps = zero_loss(batch), {}, {}
        for level, weight in self.selection.resolve(batch.num_levels):
            nodes_s, nodes_t, mask, paint = self._nodes(batch, level)
            graph = graph_distillation(nodes_s, nodes_t, mask)
            if self.node_weight > 0 and "node" not in graph:
                raise KDConfigError(
                    f"RGD: level {level} student nodes have {nodes_s.shape[-1]} channels, the teacher's "
                    f"{nodes_t.shape[-1]}; use student_features='adapted' or node_weight=0 (edges only)"
                )
            loss = self.edge_weight * graph["edge"]
            terms[f"{level}/edge"] = graph["edge"].detach()
            if "node" in graph:
                loss = loss + self.node_weight * graph["node"]
                terms[f"{level}/node"] = graph["node"].detach()
            total = total + weight * loss
            if return_maps:
                maps[f"{level}/edge_discrepancy"] = paint(graph["edge_map"].detach())
                if "node_map" in graph:
                    maps[f"{level}/discrepancy"] = paint(graph["node_map"].detach())
        return KDOutput(loss=total, terms=terms, maps=maps)


class MSKDLoss(nn.Module):
    """MSKD = ``ffd_weight * FFD + rgd_weight * RGD``: **ReCoKD's interpretation** (kd-methods.md §3).

    The MSKD paper (CBM 2023) names its two parts but publishes no equations, hyper-parameters or
    code, so the exact method cannot be reproduced; the parts are :class:`FeatureFilteringLoss` and
    :class:`RegionGraphLoss` (submodules ``ffd`` and ``rgd``), read at the same levels. The paper's
    weights are unknown; 1.0 each is the suggested start.

    Terms: ``ffd``, ``rgd`` (weighted) and each part's terms as ``"ffd/<term>"``, ``"rgd/<term>"``.
    Maps: each part's maps as ``"<level>/ffd_<name>"`` and ``"<level>/rgd_<name>"``, plus
    ``"<level>/discrepancy"`` = FFD's per-voxel FMM discrepancy.

    Args:
        ffd_weight, rgd_weight: >= 0, not both 0.
        gamma, threshold: FFD's filter; node, pool, max_nodes, node_weight, edge_weight: RGD's graph.
        ffd_student_features: ``"raw"`` (default) or ``"adapted"``; rgd_student_features: ``"adapted"``
            (default) or ``"raw"``.
        levels, level_weights: see :class:`~ReCoKDLib.losses.baselines.LevelSelection`.
    """

    def __init__(
        self,
        *,
        ffd_weight: float = 1.0,
        rgd_weight: float = 1.0,
        gamma: float = 0.6,
        threshold: float = 0.5,
        node: str = "prototype",
        pool: int = 2,
        max_nodes: int = 512,
        node_weight: float = 1.0,
        edge_weight: float = 1.0,
        ffd_student_features: str = "raw",
        rgd_student_features: str = "adapted",
        levels: Sequence[int] | None = None,
        level_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.ffd_weight = check_number("MSKD", "ffd_weight", ffd_weight, positive=False)
        self.rgd_weight = check_number("MSKD", "rgd_weight", rgd_weight, positive=False)
        if self.ffd_weight + self.rgd_weight == 0:
            raise KDConfigError("MSKD: ffd_weight and rgd_weight are both 0; nothing to distil")
        self.ffd = FeatureFilteringLoss(
            gamma=gamma, threshold=threshold, student_features=ffd_student_features, levels=levels, level_weights=level_weights
        )
        self.rgd = RegionGraphLoss(
            node=node, pool=pool, max_nodes=max_nodes, node_weight=node_weight, edge_weight=edge_weight,
            student_features=rgd_student_features, levels=levels, level_weights=level_weights,
        )

    def forward(self, batch: KDBatch, return_maps: bool = False) -> KDOutput:
        total, terms, maps = zero_loss(batch), {}, {}
        for name, weight, part in (("ffd", self.ffd_weight, self.ffd), ("rgd", self.rgd_weight, self.rgd)):
            if weight == 0:
                continue
            out: KDOutput = part(batch, return_maps=return_maps)
            total = total + weight * out.loss
            terms[name] = (weight * out.loss).detach()
            terms.update({f"{name}/{k}": v for k, v in out.terms.items()})
            for key, value in out.maps.items():
                level, _, map_name = key.partition("/")
                maps[f"{level}/{name}_{map_name}"] = value
                if name == "ffd" and map_name == "discrepancy":
                    maps[key] = value
        return KDOutput(loss=total, terms=terms, maps=maps)

    def __str__(self) -> str:
        return f"{self.ffd_weight:g}*ffd + {self.rgd_weight:g}*rgd"
