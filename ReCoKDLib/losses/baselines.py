"""The KD methods users compare ReCo-KD with: logit KD, FitNet, CWD, IFVD, EMKD and CIRKD, in 3D.

Every method is a pure functional core (tensors in, tensors out, shapes in the docstrings) plus a
small ``nn.Module`` that reads a :class:`~ReCoKDLib.losses.base.KDBatch` and returns a
:class:`~ReCoKDLib.losses.base.KDOutput`. Definitions, defaults and the public code's bugs that are
avoided here are in ``kd-methods.md`` §4-§5.

Shapes: features ``(B, C, D, H, W)``, logits ``(B, K, D, H, W)``, labels ``(B, 1, D, H, W)`` class ids
(negative = ignored) or ``(B, R, D, H, W)`` binary region maps, class membership ``(B, K, D, H, W)``.
Inspection maps are ``(B, 1, D_l, H_l, W_l)`` and detached.

Multi-level methods read every level of the batch with uniform weights ``1/L`` unless ``levels``
(indices into the batch's levels, negative counts from the deepest) and/or ``level_weights`` are
given. Channel-free methods can read the student's own features (``student_features="raw"``,
resized to the teacher's grid) instead of the adapter outputs (``"adapted"``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ReCoKDLib.losses.base import KDBatch, KDConfigError, KDOutput, zero_loss
from ReCoKDLib.losses.masks import one_hot_labels, resize_labels

__all__ = [
    "CIRKDLoss",
    "CWDLoss",
    "EMKDLoss",
    "FitNetLoss",
    "IFVDLoss",
    "LevelSelection",
    "LogitKDLoss",
    "channel_wise_divergence",
    "class_centre_similarity",
    "class_prototypes",
    "cross_image_relation_kd",
    "feature_mse",
    "ifvd_loss",
    "importance_map",
    "importance_map_distillation",
    "label_membership",
    "logit_kd",
    "binary_logit_kd",
    "pixel_region_kd",
    "region_affinity_distillation",
]

_STUDENT_SOURCES = ("adapted", "raw")


# --------------------------------------------------------------------------------------------- options


def check_number(who: str, name: str, value: Any, *, positive: bool = True) -> float:
    """Return ``value`` as a float, or raise :class:`KDConfigError` naming the option."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        need = "a positive number" if positive else "a number >= 0"
        raise KDConfigError(f"{who}: {name} must be {need}, got {value!r}")
    return float(value)


def check_choice(who: str, name: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise :class:`KDConfigError` naming the option."""
    if value not in choices:
        raise KDConfigError(f"{who}: {name} must be one of {list(choices)}, got {value!r}")
    return value


class LevelSelection:
    """Which levels of a batch a method reads, and with which weights.

    Args:
        levels: indices into the batch's levels (negative counts from the deepest); ``None`` = all.
        level_weights: one weight per selected level; ``None`` = uniform ``1/L``.
        who: the method's name, for error messages.
        default_levels: the levels used when ``levels`` is ``None`` (``None`` = all).
    """

    def __init__(
        self,
        levels: Sequence[int] | None,
        level_weights: Sequence[float] | None,
        who: str,
        default_levels: Sequence[int] | None = None,
    ) -> None:
        self.who = who
        if levels is not None:
            levels = list(levels)
            if not levels or not all(isinstance(i, int) and not isinstance(i, bool) for i in levels):
                raise KDConfigError(f"{who}: levels must be a non-empty list of level indices, got {levels!r}")
        if level_weights is not None:
            level_weights = [check_number(who, "level_weights", w, positive=False) for w in level_weights]
            if not level_weights:
                raise KDConfigError(f"{who}: level_weights must not be empty")
            if levels is not None and len(levels) != len(level_weights):
                raise KDConfigError(
                    f"{who}: {len(levels)} levels but {len(level_weights)} level_weights; give one weight per level"
                )
        self.levels = levels
        self.level_weights = level_weights
        self.default_levels = list(default_levels) if default_levels is not None else None

    def resolve(self, num_levels: int) -> list[tuple[int, float]]:
        """``[(level index, weight), ...]`` for a batch with ``num_levels`` levels."""
        if num_levels < 1:
            raise KDConfigError(f"{self.who} needs feature levels, but the batch has none")
        requested = self.levels if self.levels is not None else self.default_levels
        if requested is None:
            indices = list(range(num_levels))
        else:
            bad = [i for i in requested if not -num_levels <= i < num_levels]
            if bad:
                raise KDConfigError(f"{self.who}: levels {bad} do not exist; the batch has {num_levels} levels")
            indices = list(dict.fromkeys(i % num_levels for i in requested))
        if self.level_weights is None:
            return [(i, 1.0 / len(indices)) for i in indices]
        if len(self.level_weights) != len(indices):
            raise KDConfigError(
                f"{self.who}: {len(self.level_weights)} level_weights for {len(indices)} levels {indices}"
            )
        return list(zip(indices, self.level_weights))


def student_level(batch: KDBatch, level: int, source: str, who: str, resize: bool = True) -> Tensor:
    """The student's features at ``level`` ``(B, C', D, H, W)``.

    ``source="adapted"``: the adapter output (teacher channels and grid). ``"raw"``: the student's
    own features (its own channels), trilinearly resized to the teacher's spatial size where they
    differ, unless ``resize`` is false.
    """
    if source == "adapted":
        return batch.student_features[level]
    raw = batch.raw_student_features
    if raw is None or len(raw) != batch.num_levels:
        raise KDConfigError(
            f"{who} reads the student's raw features (student_features='raw') but the batch has "
            f"{'none' if raw is None else len(raw)} for {batch.num_levels} levels; capture them with "
            "DistillationPair or use student_features='adapted'"
        )
    feats = raw[level]
    size = batch.teacher_features[level].shape[2:]
    if resize and feats.shape[2:] != size:
        feats = F.interpolate(feats, size=tuple(size), mode="trilinear", align_corners=False)
    return feats


# ------------------------------------------------------------------------------------ functional core


def label_membership(labels: Tensor, size: Sequence[int], num_classes: int, regions: bool = False) -> Tensor:
    """Soft class membership ``(B, K, d, h, w)`` of each voxel at a feature level's ``size``.

    Class-id labels ``(B, 1, D, H, W)`` are nearest-resized and one-hot encoded (``K = num_classes``;
    ignored voxels, label < 0, belong to no class). Region labels ``(B, R, D, H, W)`` give
    ``K = R + 1``: channel 0 is the background (in no region), then one channel per region; a voxel
    may belong to several regions.
    """
    resized = resize_labels(labels, size)
    if regions:
        inside = (resized > 0).to(torch.float32)
        background = 1.0 - inside.amax(dim=1, keepdim=True)
        return torch.cat([background, inside], dim=1)
    return one_hot_labels(resized, num_classes)


def class_prototypes(features: Tensor, membership: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-sample class means ("prototypes", "centres", "region embeddings") of ``features``.

    Args:
        features: ``(B, C, D, H, W)``.
        membership: ``(B, K, D, H, W)`` non-negative voxel weights per class (e.g. one-hot labels).

    Returns:
        ``(B, K, C)`` class means (zero for absent classes) and ``(B, K)`` bool presence.
    """
    if features.shape[0] != membership.shape[0] or features.shape[2:] != membership.shape[2:]:
        raise KDConfigError(
            f"features {tuple(features.shape)} and class membership {tuple(membership.shape)} disagree in batch or size"
        )
    m = membership.flatten(2).to(features.dtype)
    counts = m.sum(-1)
    sums = torch.einsum("bkn,bcn->bkc", m, features.flatten(2))
    return sums / counts.clamp_min(eps).unsqueeze(-1), counts > 0


def prototype_affinity(prototypes: Tensor) -> Tensor:
    """Cosine similarity between the prototypes of each sample: ``(B, K, C)`` -> ``(B, K, K)``."""
    unit = F.normalize(prototypes, dim=-1)
    return unit @ unit.transpose(1, 2)


def logit_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Voxel-wise ``KL(softmax(t/T) || softmax(s/T)) * T^2`` (Hinton et al. 2015), mean over voxels.

    Args:
        student_logits, teacher_logits: ``(B, K, D, H, W)``.

    Returns:
        the scalar loss and the per-voxel divergence ``(B, 1, D, H, W)`` (times ``T^2``).
    """
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_pt = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    per_voxel = (log_pt.exp() * (log_pt - log_ps)).sum(1, keepdim=True) * temperature**2
    return per_voxel.mean(), per_voxel


def binary_logit_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Logit KD for sigmoid outputs (nnU-Net region heads): per channel the binary
    ``KL(Bern(sigmoid(t/T)) || Bern(sigmoid(s/T))) * T^2``, summed over channels, mean over voxels.

    Each region head is an independent two-class problem, so the softmax over channels of
    :func:`logit_kd` would compare the wrong distributions.

    Args:
        student_logits, teacher_logits: ``(B, R, D, H, W)``.

    Returns:
        the scalar loss and the per-voxel divergence ``(B, 1, D, H, W)`` (times ``T^2``).
    """
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    p_t = torch.sigmoid(t)
    # log sigma(x) = -softplus(-x), log(1 - sigma(x)) = -softplus(x): stable for large |x|
    kl = p_t * (F.softplus(-s) - F.softplus(-t)) + (1.0 - p_t) * (F.softplus(s) - F.softplus(t))
    per_voxel = kl.sum(1, keepdim=True) * temperature**2
    return per_voxel.mean(), per_voxel


def feature_mse(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """FitNet (Romero et al. 2015): ``mean((F_S - F_T)^2)`` over ``(B, C, D, H, W)``.

    Returns:
        the scalar loss and the per-voxel channel mean of the squared difference ``(B, 1, D, H, W)``.
    """
    per_voxel = (student - teacher).pow(2).mean(1, keepdim=True)
    return per_voxel.mean(), per_voxel


def channel_wise_divergence(student: Tensor, teacher: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Channel-wise distillation (Shu et al., ICCV 2021) on ``(B, C, D, H, W)`` features.

    Each channel becomes a distribution over voxels, ``softmax_v(F_c / T)``; the loss is
    ``T^2 / (B C) * sum_{b,c} KL(P^T_{b,c} || P^S_{b,c})``.

    Returns:
        the scalar loss and a per-voxel map ``(B, 1, D, H, W)`` (the KL summands summed over
        channels, times ``T^2 / C``) whose sum over voxels, averaged over the batch, is the loss.
    """
    b, c = teacher.shape[:2]
    log_ps = F.log_softmax(student.flatten(2).float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher.flatten(2).float() / temperature, dim=-1)
    summands = log_pt.exp() * (log_pt - log_ps)
    per_voxel = summands.sum(1, keepdim=True) * (temperature**2 / c)
    return per_voxel.sum() / b, per_voxel.view(b, 1, *teacher.shape[2:])


def class_centre_similarity(features: Tensor, membership: Tensor) -> tuple[Tensor, Tensor]:
    """IFVD's intra-class feature variation map: cosine of each voxel to its class centre.

    Centres are per-sample class means (Wang et al., ECCV 2020). A voxel in several classes (region
    labels) gets the membership-weighted mean of its cosines.

    Args:
        features: ``(B, C, D, H, W)``.
        membership: ``(B, K, D, H, W)``.

    Returns:
        similarity ``(B, 1, D, H, W)`` and ``valid`` ``(B, 1, D, H, W)`` bool (voxels in some class).
    """
    centres, _ = class_prototypes(features, membership)
    unit_feats = F.normalize(features.flatten(2), dim=1)
    unit_centres = F.normalize(centres, dim=-1)
    cosine = torch.einsum("bkc,bcn->bkn", unit_centres, unit_feats)
    m = membership.flatten(2).to(cosine.dtype)
    weight = m.sum(1)
    similarity = (m * cosine).sum(1) / weight.clamp_min(1e-6)
    shape = (features.shape[0], 1, *features.shape[2:])
    return similarity.view(shape), (weight > 0).view(shape)


def ifvd_loss(student: Tensor, teacher: Tensor, membership: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """IFVD: MSE between student and teacher class-centre similarity maps, over labelled voxels only.

    Returns:
        the scalar loss and maps ``similarity_teacher``, ``similarity_student``, ``discrepancy``.
    """
    sim_s, valid = class_centre_similarity(student, membership)
    sim_t, _ = class_centre_similarity(teacher, membership)
    diff2 = (sim_s - sim_t).pow(2) * valid
    loss = diff2.sum() / valid.sum().clamp_min(1)
    return loss, {"similarity_teacher": sim_t, "similarity_student": sim_s, "discrepancy": diff2}


def importance_map(features: Tensor, exponent: int = 4) -> Tensor:
    """EMKD's importance (attention) map: ``normalize_v(mean_c F^p)``, ``(B, C, D, H, W)`` -> ``(B, D*H*W)``."""
    return F.normalize(features.float().pow(exponent).mean(1).flatten(1), dim=1)


def importance_map_distillation(student: Tensor, teacher: Tensor, exponent: int = 4) -> tuple[Tensor, Tensor]:
    """EMKD's IMD (Qin et al., IEEE TMI 2021): ``mean_b sum_v (a_S - a_T)^2`` of L2-normalised importance maps.

    Channel-free: ``student`` may have any channel count, on the teacher's grid.

    Returns:
        the scalar loss and the per-voxel squared difference ``(B, 1, D, H, W)``.
    """
    diff2 = (importance_map(student, exponent) - importance_map(teacher, exponent)).pow(2)
    return diff2.sum(1).mean(), diff2.view(teacher.shape[0], 1, *teacher.shape[2:])


def region_affinity_distillation(student: Tensor, teacher: Tensor, membership: Tensor) -> tuple[Tensor, Tensor]:
    """EMKD's RAD generalised to many classes: match the cosine between class-region means.

    For every sample and every pair of classes ``i < j`` both present in it, the cosine of the two
    region means is computed in each network; the loss is the mean over those (sample, pair)
    entries of ``(cos_S - cos_T)^2``. With two classes this is the binary original; absent classes
    are skipped (never NaN). Channel-free.

    Args:
        student: ``(B, C_s, D, H, W)``; teacher: ``(B, C_t, D, H, W)``; membership: ``(B, K, D, H, W)``.

    Returns:
        the scalar loss (0 without any valid pair) and the per-pair squared difference ``(B, K, K)``.
    """
    proto_s, present = class_prototypes(student, membership)
    proto_t, _ = class_prototypes(teacher, membership)
    k = present.shape[1]
    upper = torch.ones(k, k, dtype=torch.bool, device=present.device).triu(1)
    pairs = (present.unsqueeze(2) & present.unsqueeze(1) & upper).to(proto_s.dtype)
    diff2 = (prototype_affinity(proto_s) - prototype_affinity(proto_t)).pow(2) * pairs
    return diff2.sum() / pairs.sum().clamp_min(1), diff2


def cross_image_relation_kd(student: Tensor, teacher: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """CIRKD's pixel-to-pixel relation over every pair of images of the batch (Yang et al., CVPR 2022).

    Features are L2-normalised over channels; for every pair ``(i, j)`` (``i == j`` included) the
    ``N x N`` voxel similarities of image ``i`` to image ``j`` become row distributions
    ``softmax(sim / tau)``, matched by ``KL(teacher || student)`` averaged over rows and over the
    ``B^2`` pairs. Channel-free.

    Args:
        student: ``(B, C_s, d, h, w)``; teacher: ``(B, C_t, d, h, w)`` (pooled, ``N = d*h*w`` small).

    Returns:
        the scalar loss and the per-voxel divergence ``(B, 1, d, h, w)`` averaged over partner images.
    """
    b, n = teacher.shape[0], teacher.shape[2:].numel()

    def relation(x: Tensor) -> Tensor:
        unit = F.normalize(x.flatten(2).float(), dim=1).transpose(1, 2).reshape(b * n, -1)
        return F.log_softmax((unit @ unit.T).view(b, n, b, n) / temperature, dim=-1)

    log_ps, log_pt = relation(student), relation(teacher)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # (B, N, B): row i of image b vs image j
    per_voxel = kl.mean(-1)
    return per_voxel.mean(), per_voxel.view(b, 1, *teacher.shape[2:])


def pixel_region_kd(
    student: Tensor, teacher: Tensor, memory: Tensor, contrast_temperature: float, kd_temperature: float
) -> tuple[Tensor, Tensor]:
    """CIRKD's pixel-to-region relation: each voxel's similarities to the teacher's region memory.

    Args:
        student: ``(B, C, d, h, w)`` projected student embeddings; teacher: ``(B, C, d, h, w)``.
        memory: ``(M, C)`` L2-normalised teacher region embeddings (class means of past images).

    Returns:
        ``KL(softmax(t/tau_kd) || softmax(s/tau_kd)) * tau_kd^2`` of the logits ``x . memory / tau_c``,
        mean over voxels, and that divergence per voxel ``(B, 1, d, h, w)``.
    """
    b = teacher.shape[0]

    def logits(x: Tensor) -> Tensor:
        unit = F.normalize(x.flatten(2).float(), dim=1).transpose(1, 2)
        return unit @ memory.T.to(unit.dtype) / contrast_temperature

    log_ps = F.log_softmax(logits(student) / kd_temperature, dim=-1)
    log_pt = F.log_softmax(logits(teacher) / kd_temperature, dim=-1)
    per_voxel = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * kd_temperature**2
    return per_voxel.mean(), per_voxel.view(b, 1, *teacher.shape[2:])


# ---------------------------------------------------------------------------------------------- modules


class LogitKDLoss(nn.Module):
    """Logit KD (Hinton et al. 2015): voxel-wise ``KL(softmax(t/T) || softmax(s/T)) * T^2``, mean over voxels.

    Reads ``batch.teacher_logits`` / ``batch.student_logits`` ``(B, K, D, H, W)``. Terms: ``kl``.
    When ``batch.regions`` is set (the engine sets it for nnU-Net region-based labels: sigmoid
    heads), the per-channel binary KL of :func:`binary_logit_kd` replaces the softmax KL.
    Maps: ``"logits/kl"`` ``(B, 1, D, H, W)``.

    Args:
        temperature: ``T`` > 0 (2.0, as the ClinicaAlpha framework's ``KL_Loss``).
    """

    def __init__(self, *, temperature: float = 2.0) -> None:
        super().__init__()
        self.temperature = check_number("logit KD", "temperature", temperature)

    def forward(self, batch: KDBatch, return_maps: bool = False) -> KDOutput:
        batch.check_logits("logit KD")
        kd = binary_logit_kd if batch.regions else logit_kd
        loss, per_voxel = kd(batch.student_logits, batch.teacher_logits, self.temperature)
        maps = {"logits/kl": per_voxel.detach()} if return_maps else {}
        return KDOutput(loss=loss, terms={"kl": loss.detach()}, maps=maps)


class FitNetLoss(nn.Module):
    """FitNet (Romero et al., ICLR 2015): MSE between adapted student and teacher features per level.

    The regressor is the feature taps' 1x1x1 adapter. Terms: ``"<level>/mse"``.
    Maps: ``"<level>/discrepancy"`` (channel-mean squared difference).

    Args:
        levels, level_weights: see :class:`LevelSelection`.
    """

    def __init__(self, *, levels: Sequence[int] | None = None, level_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.selection = LevelSelection(levels, level_weights, "FitNet")

    def forward(self, batch: KDBatch, return_maps: bool = False) -> KDOutput:
        batch.check_features("FitNet")
        total, terms, maps = zero_loss(batch), {}, {}
        for level, weight in self.selection.resolve(batch.num_levels):
            loss, per_voxel = feature_mse(batch.student_features[level], batch.teacher_features[level])
            total = total + weight * loss
            terms[f"{level}/mse"] = loss.detach()
            if return_maps:
                maps[f"{level}/discrepancy"] = per_voxel.detach()
        return KDOutput(loss=total, terms=terms, maps=maps)


class CWDLoss(nn.Module):
    """Channel-wise distillation (Shu et al., ICCV 2021) on adapted features, per level.

    Each channel's activations become a spatial distribution ``softmax_v(F_c / T)``; the loss is
    ``T^2/(B C) * sum KL(teacher || student)``. Terms: ``"<level>/cwd"``. Maps: ``"<level>/cwd"``
    (per-voxel KL summands) and ``"<level>/discrepancy"`` (channel-mean squared difference).

    Args:
        temperature: ``T`` > 0 (1.0 as in the ClinicaAlpha preset).
        levels, level_weights: see :class:`LevelSelection`.
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        levels: Sequence[int] | None = None,
        level_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.temperature = check_number("CWD", "temperature", temperature)
        self.selection = LevelSelection(levels, level_weights, "CWD")

    def forward(self, batch: KDBatch, return_maps: bool = False) -> KDOutput:
        batch.check_features("CWD")
        total, terms, maps = zero_loss(batch), {}, {}
        for level, weight in self.selection.resolve(batch.num_levels):
            s, t = batch.student_features[level], batch.teacher_features[level]
            loss, per_voxel = channel_wise_divergence(s, t, self.temperature)
            total = total + weight * loss
            terms[f"{level}/cwd"] = loss.detach()
            if return_maps:
                maps[f"{level}/cwd"] = per_voxel.detach()
                maps[f"{level}/discrepancy"] = feature_mse(s.detach(), t)[1]
        return KDOutput(loss=total, terms=terms, maps=maps)


class IFVDLoss(nn.Module):
    """Intra-class feature variation distillation (Wang et al., ECCV 2020), per level.

    Labels are nearest-resized to each level; per sample and class the centre is the mean feature;
    each voxel's cosine to its own class centre gives a ``(B, 1, D, H, W)`` map per network; the loss
    is their MSE over labelled voxels (ignored voxels, label < 0, are excluded, not counted as 0).
    Terms: ``"<level>/ifvd"``. Maps: ``"<level>/similarity_teacher"``, ``"<level>/similarity_student"``,
    ``"<level>/discrepancy"``.

    Args:
        student_features: ``"adapted"`` (the ClinicaAlpha port's adapter) or ``"raw"`` (the
            student's own channels, as ACF-BCKD: the map is channel-free).
        levels, level_weights: see :class:`LevelSelection`.
    """

    def __init__(
        self,
        *,
        student_features: str = "adapted",
        levels: Sequence[int] | None = None,
        level_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.student_source = check_choice("IFVD", "student_features", student_features, _STUDENT_SOURCES)
        self.selection = LevelSelection(levels, level_weights, "IFVD")

    def forward(self, batch: KDBatch, return_maps: bool = False) -> KDOutput:
        batch.check_features("IFVD")
        labels = batch.require_labels("IFVD")
        total, terms, maps = zero_loss(batch), {}, {}
        for level, weight in self.selection.resolve(batch.num_levels):
            t = batch.teacher_features[level]
            s = student_level(batch, level, self.student_source, "IFVD")
            membership = label_membership(labels, t.shape[2:], batch.class_count(), batch.regions)
            loss, level_maps = ifvd_loss(s, t, membership)
            total = total + weight * loss
            terms[f"{level}/ifvd"] = loss.detach()
            if return_maps:
                maps.update({f"{level}/{k}": v.detach() for k, v in level_maps.items()})
        return KDOutput(loss=total, terms=terms, maps=maps)


class EMKDLoss(nn.Module):
    """EMKD (Qin et al., IEEE TMI 2021), in 3D and for any number of classes (kd-methods.md §4.2, §4.4).

    ``L = pmd_weight * PMD + imd_weight * sum_l IMD_l + rad_weight * sum_l RAD_l`` where

    * PMD: voxel-wise logit KL at temperature ``T`` (times ``T^2``, mean over voxels; the original's
      ``view(-1, 2)`` mixes classes and voxels and is not reproduced);
    * IMD: importance maps ``normalize(mean_c F^p)`` (p = 4), squared L2 distance, mean over the batch;
    * RAD: cosine between class-region means, for every pair of classes present in a sample
      (the binary original generalised as ACF-BCKD does; absent classes skipped, never NaN).

    IMD and RAD are summed over ``levels`` (default: the shallowest and the deepest level of the
    batch, EMKD's "low" and "high" layers). Both are channel-free, so by default they read the
    student's own features, as the original (no adapter). Terms: ``pmd``, ``"<level>/imd"``,
    ``"<level>/rad"``. Maps: ``"logits/kl"``, ``"<level>/importance_teacher"``,
    ``"<level>/importance_student"``, ``"<level>/discrepancy"`` (squared importance difference).

    Args:
        pmd_weight, imd_weight, rad_weight: >= 0 (0.1, 0.9, 0.9 as the original).
        temperature: PMD temperature > 0 (4.0).
        exponent: IMD's power ``p`` (positive integer, 4).
        levels: level indices for IMD and RAD; ``None`` = (shallowest, deepest).
        student_features: ``"raw"`` (default) or ``"adapted"``.
    """

    def __init__(
        self,
        *,
        pmd_weight: float = 0.1,
        imd_weight: float = 0.9,
        rad_weight: float = 0.9,
        temperature: float = 4.0,
        exponent: int = 4,
        levels: Sequence[int] | None = None,
        student_features: str = "raw",
    ) -> None:
        super().__init__()
        who = "EMKD"
        self.pmd_weight = check_number(who, "pmd_weight", pmd_weight, positive=False)
        self.imd_weight = check_number(who, "imd_weight", imd_weight, positive=False)
        self.rad_weight = check_number(who, "rad_weight", rad_weight, positive=False)
        if self.pmd_weight + self.imd_weight + self.rad_weight == 0:
            raise KDConfigError(f"{who}: pmd_weight, imd_weight and rad_weight are all 0; nothing to distil")
        self.temperature = check_number(who, "temperature", temperature)
        if not isinstance(exponent, int) or isinstance(exponent, bool) or exponent < 1:
            raise KDConfigError(f"{who}: exponent must be a positive integer, got {exponent!r}")
        self.exponent = exponent
        self.student_source = check_choice(who, "student_features", student_features, _STUDENT_SOURCES)
        # IMD and RAD are summed over their levels (weight 1 each), as in EMKD's train_kd.py.
        self.selection = LevelSelection(levels, None, who, default_levels=(0, -1))

    def forward(self, batch: KDBatch, return_maps: bool = False) -> KDOutput:
        total, terms, maps = zero_loss(batch), {}, {}
        if self.pmd_weight > 0:
            batch.check_logits("EMKD (PMD)")
            pmd, per_voxel = (binary_logit_kd if batch.regions else logit_kd)(
                batch.student_logits, batch.teacher_logits, self.temperature)
            total = total + self.pmd_weight * pmd
            terms["pmd"] = pmd.detach()
            if return_maps:
                maps["logits/kl"] = per_voxel.detach()
        if self.imd_weight > 0 or self.rad_weight > 0:
            batch.check_features("EMKD")
            labels = batch.require_labels("EMKD (RAD)") if self.rad_weight > 0 else None
            for level, _ in self.selection.resolve(batch.num_levels):
                t = batch.teacher_features[level]
                s = student_level(batch, level, self.student_source, "EMKD")
                if self.imd_weight > 0:
                    imd, diff2 = importance_map_distillation(s, t, self.exponent)
                    total = total + self.imd_weight * imd
                    terms[f"{level}/imd"] = imd.detach()
                    if return_maps:
                        shape = (t.shape[0], 1, *t.shape[2:])
                        maps[f"{level}/importance_teacher"] = importance_map(t, self.exponent).view(shape)
                        maps[f"{level}/importance_student"] = importance_map(s.detach(), self.exponent).view(shape)
                        maps[f"{level}/discrepancy"] = diff2.detach()
                if labels is not None:
                    membership = label_membership(labels, t.shape[2:], batch.class_count(), batch.regions)
                    rad, _ = region_affinity_distillation(s, t, membership)
                    total = total + self.rad_weight * rad
                    terms[f"{level}/rad"] = rad.detach()
        return KDOutput(loss=total, terms=terms, maps=maps)


class _Projector(nn.Sequential):
    """CIRKD's student projection head: ``Conv(C_s->C_t) -> norm -> ReLU -> Conv(C_t->C_t)``, 1x1x1."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        norm_layer = nn.BatchNorm3d(out_channels) if norm == "batch" else nn.InstanceNorm3d(out_channels, affine=True)
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size=1, bias=False),
            norm_layer,
            nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, kernel_size=1, bias=True),
        )


class CIRKDLoss(nn.Module):
    """Cross-image relational KD (Yang et al., CVPR 2022) in 3D, with a teacher region memory.

    Per level, both networks' features are average-pooled to at most ``pool_size`` voxels per axis
    (bounded memory); the student's go through a trainable projector (a submodule, so
    ``.parameters()`` gives it to the optimiser) into the teacher's channels. Then

    * **pixel-to-pixel**: for EVERY pair of images of the batch, the voxel-similarity rows
      ``softmax(sim / tau)`` are matched by KL (:func:`cross_image_relation_kd`); ACF-BCKD's
      ``single_batch=True``, which keeps only image 0, is not reproduced;
    * **pixel-to-region**: a per-class queue (a registered buffer) holds L2-normalised teacher class
      means of past images; in training mode the current batch's means are enqueued first (no
      gradient), then each voxel's similarities to the memory are matched by KL
      (:func:`pixel_region_kd`). An empty memory (eval mode before any training step) gives 0.

    ``L = sum_l w_l (pixel_weight * L_pp + region_weight * L_pr)``. Terms: ``"<level>/pixel"``,
    ``"<level>/region"``. Maps (on the pooled grid): ``"<level>/pixel_relation"``,
    ``"<level>/pixel_region"``, ``"<level>/discrepancy"`` (squared difference of unit embeddings).

    Args:
        teacher_channels, student_channels: channels per level (given by the registry).
        num_classes: ``K`` (background included); ``R + 1`` for region labels.
        pool_size: pooled grid size per axis (int or 3 ints), default 8 (``8^3`` voxels).
        temperature: pixel-to-pixel relation temperature (0.1, CIRKD's default).
        memory_size: region embeddings kept per class and level.
        contrast_temperature: pixel-to-region logits temperature (0.1); kd_temperature: its KL
            temperature (1.0).
        pixel_weight, region_weight: >= 0 (1.0 and 0.1, CIRKD's ``lambda_minibatch_pixel`` and
            ``lambda_memory_region``).
        projector_norm: ``"batch"`` or ``"instance"``.
        student_features: ``"raw"`` (the projector maps the student's own features, default) or
            ``"adapted"``.
        levels, level_weights: see :class:`LevelSelection`.
    """

    def __init__(
        self,
        *,
        teacher_channels: Sequence[int] = (),
        student_channels: Sequence[int] = (),
        num_classes: int = 2,
        pool_size: int | Sequence[int] = 8,
        temperature: float = 0.1,
        memory_size: int = 128,
        contrast_temperature: float = 0.1,
        kd_temperature: float = 1.0,
        pixel_weight: float = 1.0,
        region_weight: float = 0.1,
        projector_norm: str = "batch",
        student_features: str = "raw",
        levels: Sequence[int] | None = None,
        level_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        who = "CIRKD"
        teacher_channels, student_channels = list(teacher_channels), list(student_channels)
        if not teacher_channels or len(teacher_channels) != len(student_channels):
            raise KDConfigError(
                f"{who} builds one projector per level and needs teacher_channels and student_channels of equal, "
                f"non-zero length; got {teacher_channels} and {student_channels}"
            )
        if not isinstance(num_classes, int) or num_classes < 2:
            raise KDConfigError(f"{who}: num_classes (background included) must be >= 2, got {num_classes!r}")
        pool = [pool_size] * 3 if isinstance(pool_size, int) else list(pool_size)
        if len(pool) != 3 or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in pool):
            raise KDConfigError(f"{who}: pool_size must be a positive int or 3 positive ints, got {pool_size!r}")
        if not isinstance(memory_size, int) or isinstance(memory_size, bool) or memory_size < 1:
            raise KDConfigError(f"{who}: memory_size must be a positive integer, got {memory_size!r}")
        self.pool_size = tuple(pool)
        self.temperature = check_number(who, "temperature", temperature)
        self.contrast_temperature = check_number(who, "contrast_temperature", contrast_temperature)
        self.kd_temperature = check_number(who, "kd_temperature", kd_temperature)
        self.pixel_weight = check_number(who, "pixel_weight", pixel_weight, positive=False)
        self.region_weight = check_number(who, "region_weight", region_weight, positive=False)
        if self.pixel_weight + self.region_weight == 0:
            raise KDConfigError(f"{who}: pixel_weight and region_weight are both 0; nothing to distil")
        check_choice(who, "projector_norm", projector_norm, ("batch", "instance"))
        self.student_source = check_choice(who, "student_features", student_features, _STUDENT_SOURCES)
        self.selection = LevelSelection(levels, level_weights, who)
        self.num_classes = num_classes
        self.memory_size = memory_size
        self.teacher_channels = teacher_channels
        in_channels = student_channels if self.student_source == "raw" else teacher_channels
        self.projectors = nn.ModuleList(_Projector(ci, co, projector_norm) for ci, co in zip(in_channels, teacher_channels))
        for level, c in enumerate(teacher_channels):
            self.register_buffer(f"region_memory_{level}", torch.zeros(num_classes, memory_size, c))
            self.register_buffer(f"region_count_{level}", torch.zeros(num_classes, dtype=torch.long))
            self.register_buffer(f"region_next_{level}", torch.zeros(num_classes, dtype=torch.long))

    def memory(self, level: int) -> Tensor:
        """The filled region embeddings of ``level``, ``(M, C_t)`` (all classes together)."""
        bank = getattr(self, f"region_memory_{level}")
        count = getattr(self, f"region_count_{level}")
        return torch.cat([bank[k, : int(count[k])] for k in range(self.num_classes)], dim=0)

    @torch.no_grad()
    def enqueue(self, level: int, teacher: Tensor, membership: Tensor) -> None:
        """Push the L2-normalised teacher class means of every sample ``(B, C_t, D, H, W)`` into the queue."""
        if membership.shape[1] != self.num_classes:
            raise KDConfigError(
                f"CIRKD was built for num_classes={self.num_classes} but the labels give {membership.shape[1]} classes"
            )
        means, present = class_prototypes(teacher.float(), membership)
        means = F.normalize(means, dim=-1)
        bank = getattr(self, f"region_memory_{level}")
        count = getattr(self, f"region_count_{level}")
        nxt = getattr(self, f"region_next_{level}")
        for b, k in present.nonzero().tolist():
            bank[k, int(nxt[k])] = means[b, k].to(bank.dtype)
            nxt[k] = (nxt[k] + 1) % self.memory_size
            count[k] = torch.clamp(count[k] + 1, max=self.memory_size)

    def _grid(self, size: Sequence[int]) -> tuple[int, ...]:
        return tuple(min(p, int(s)) for p, s in zip(self.pool_size, size))

    def forward(self, batch: KDBatch, return_maps: bool = False) -> KDOutput:
        who = "CIRKD"
        batch.check_features(who)
        if batch.num_levels != len(self.projectors):
            raise KDConfigError(f"{who} was built for {len(self.projectors)} levels, the batch has {batch.num_levels}")
        labels = batch.require_labels(f"{who} (region memory)") if self.region_weight > 0 else None
        total, terms, maps = zero_loss(batch), {}, {}
        for level, weight in self.selection.resolve(batch.num_levels):
            t = batch.teacher_features[level]
            if t.shape[1] != self.teacher_channels[level]:
                raise KDConfigError(
                    f"{who}: level {level} teacher has {t.shape[1]} channels, built for {self.teacher_channels[level]}"
                )
            # adaptive pooling brings a raw student of another spatial size onto the same grid
            s = student_level(batch, level, self.student_source, who, resize=False)
            grid = self._grid(t.shape[2:])
            s_emb = self.projectors[level](F.adaptive_avg_pool3d(s, grid))
            t_emb = F.adaptive_avg_pool3d(t, grid)
            level_loss = zero_loss(batch)
            if self.pixel_weight > 0:
                pp, pp_map = cross_image_relation_kd(s_emb, t_emb, self.temperature)
                level_loss = level_loss + self.pixel_weight * pp
                terms[f"{level}/pixel"] = pp.detach()
                if return_maps:
                    maps[f"{level}/pixel_relation"] = pp_map.detach()
            if labels is not None:
                if self.training:
                    membership = label_membership(labels, t.shape[2:], self.num_classes, batch.regions)
                    self.enqueue(level, t, membership)
                memory = self.memory(level)
                if memory.shape[0] > 0:
                    pr, pr_map = pixel_region_kd(s_emb, t_emb, memory, self.contrast_temperature, self.kd_temperature)
                    level_loss = level_loss + self.region_weight * pr
                    terms[f"{level}/region"] = pr.detach()
                    if return_maps:
                        maps[f"{level}/pixel_region"] = pr_map.detach()
            total = total + weight * level_loss
            if return_maps:
                unit_s, unit_t = F.normalize(s_emb.detach(), dim=1), F.normalize(t_emb, dim=1)
                maps[f"{level}/discrepancy"] = (unit_s - unit_t).pow(2).sum(1, keepdim=True)
        return KDOutput(loss=total, terms=terms, maps=maps)
