"""ReCo-KD: Region- and Context-Aware Knowledge Distillation (Lan et al., arXiv 2601.08301, 2026).

Two objectives over encoder levels ``k = 0`` (highest resolution) ``.. L-1``, as in the authors'
code release (``ClinicaAlpha/DPRD-3D-MedSeg``, ``methods/reco.py``; kd-methods.md §2.4–2.6):

* **MS-SARD** (multi-scale structure-aware region distillation). With the teacher's spatial and
  channel attention ``A^S_T (B, D, H, W)`` and ``A^C_T (B, C)`` (softmax of the mean ``|F|`` at
  temperature ``T``, scaled to mean 1) and the class-balanced masks ``M_fg``, ``M_bg`` of
  :func:`~ReCoKDLib.losses.masks.class_balanced_region_masks` (``W = M^tau``)::

      L_fg  = sum_{b,c,v} W_fg A^S_T(v) A^C_T(c) (F~S - FT)^2 / (C sum_{b,v} W_fg)      (L_bg alike)
      L_att = mean_{b,c} |A^C_S - A^C_T| + mean_{b,v} |A^S_S - A^S_T|

* **MS-CA** (multi-scale context alignment): a 3D global-context block per side (separate
  parameters); ``alpha = softmax_v(W_m F)`` (the "affinity"), ``ctx = sum_v alpha_v F_v``,
  ``G(F) = F + Conv(ReLU(LN(Conv(ctx))))``; ``L_rel = MSE(G_s(F~S), G_t(FT))``.

* Levels are weighted ``w_k = r^k / sum_j r^j`` with ``r = 2^(-3 alpha)`` (``alpha = 0.4``) or
  explicit weights, and ``L_ReCo = sum_k w_k (c_fg L_fg + c_bg L_bg + c_att L_att + c_rel L_rel)``.
  The training objective is ``L_seg + lambda(step) L_ReCo`` (:func:`ReCoKDLib.engine.kd_lambda`: 0.01 after a linear warm-up).

Differences from the release (kd-methods §2.10–2.11), all deliberate:

* adapters and context blocks are trainable. ``frozen_aux=True`` on this loss freezes the context
  blocks it owns; the 1x1x1 adapters belong to the feature taps (``DistillationPair.adapters``), so
  the release's behaviour (both frozen) is ``TrainConfig.frozen_aux`` in the engine, or freezing
  ``pair.adapters`` yourself. The loss warns once when it is frozen but the batch's adapters train.
* voxels with negative labels are ignored instead of counted as background.
* labels are resized to each level with ``nearest-exact`` (the voxel nearest each level voxel's
  centre), where the release's fallback uses ``nearest`` (the block's first voxel: a half-voxel
  shift towards the origin per halving). With nnU-Net's downsampled targets both read the same
  labels; with full-resolution targets the loss differs by about 0.5 % (measured -0.47 %).
* the context block's bottleneck is ``C // 2`` as in the release, but at least 2 (a LayerNorm over a
  single value is constant).
* every full-volume reduction is fused and chunked over depth (:mod:`ReCoKDLib.losses.fused`): the
  values are the release's to float32 rounding; the extra peak memory, measured, is about the size
  of the level's student and teacher features together (0.97x; 4.8x the student features'
  gradient) instead of ~7x the features, at 8-12x the release's speed.

When the batch carries the taps' adapters (``KDBatch.student_adapters``) and the adapter is a
pure 1x1x1 projection, the loss reads the raw student features and folds the projection into its
slabs, so neither the adapted features' gradient nor any other teacher-sized temporary is built;
with the taps' lazy ``student_features`` (:class:`~ReCoKDLib.losses.base.LazyFeatures`) the adapted
features themselves are never built either.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ReCoKDLib.losses.base import KDBatch, KDConfigError, KDOutput, zero_loss
from ReCoKDLib.losses.fused import abs_statistics, context_pool, weighted_squared_errors
from ReCoKDLib.losses.masks import class_balanced_region_masks, class_region_masks, resize_labels

Projection = tuple[Tensor, Tensor | None] | None


# --------------------------------------------------------------------------- functional core


def attention_from_means(means: Tensor, temperature: float = 0.5) -> Tensor:
    """``n * softmax(means / T)`` over the last dims flattened (float32), so the map has mean 1.

    Args:
        means: ``(B, ...)`` mean absolute activations (per voxel or per channel).
    """
    if temperature <= 0:
        raise KDConfigError(f"attention temperature must be > 0, got {temperature}")
    flat = means.float().flatten(1)
    return (flat.shape[1] * torch.softmax(flat / temperature, dim=1)).view(means.shape)


def spatial_attention(features: Tensor, temperature: float = 0.5, chunk_size: int | None = None) -> Tensor:
    """``A^S(F)_v = DHW * softmax_v(mean_c |F_{c,v}| / T)``: ``(B, C, D, H, W)`` -> ``(B, D, H, W)``, mean 1."""
    spatial, _, _ = abs_statistics(features, chunk=chunk_size)
    return attention_from_means(spatial, temperature)


def channel_attention(features: Tensor, temperature: float = 0.5, chunk_size: int | None = None) -> Tensor:
    """``A^C(F)_c = C * softmax_c(mean_v |F_{c,v}| / T)``: ``(B, C, D, H, W)`` -> ``(B, C)``, mean 1."""
    _, channel, _ = abs_statistics(features, chunk=chunk_size)
    return attention_from_means(channel, temperature)


def stage_weights(num_levels: int, alpha: float = 0.4, dims: int = 3) -> list[float]:
    """``w_k = r^k / sum_j r^j`` with ``r = 2^(-dims * alpha)``; level 0 is the highest resolution.

    Example:
        >>> [round(w, 4) for w in stage_weights(5, 0.4)]
        [0.5737, 0.2497, 0.1087, 0.0473, 0.0206]
    """
    if num_levels < 1:
        raise KDConfigError(f"need at least one level, got {num_levels}")
    r = 2.0 ** (-dims * alpha)
    raw = [r**k for k in range(num_levels)]
    return [v / sum(raw) for v in raw]


def region_mask_weights(labels: Tensor, num_classes: int, size: Sequence[int], tau: float = 1.0, regions: bool = False) -> tuple[Tensor, Tensor]:
    """``W_fg, W_bg`` ``(B, d, h, w)`` at feature size ``size``: nearest-resized labels, masks to the power ``tau``."""
    fg, bg = class_balanced_region_masks(resize_labels(labels, size), num_classes, regions=regions)
    if tau != 1.0:
        fg, bg = fg.pow(tau), bg.pow(tau)
    return fg[:, 0], bg[:, 0]


class GlobalContextBlock3d(nn.Module):
    """3D global-context block (GCNet; FGD's relation module), "3D GcBlock" in the ReCo-KD figure.

    ``alpha = softmax_v(conv_mask(F))``, ``ctx = sum_v alpha_v F_v`` ``(B, C)``,
    ``delta = Conv(C/2 -> C)(ReLU(LayerNorm(Conv(C -> C/2)(ctx))))`` and ``G(F) = F + delta``
    broadcast over the volume. ``conv_mask`` is Kaiming-normal (fan-in), the last convolution is
    zero-initialised, so a fresh block is the identity.

    Args:
        channels: ``C``.
        ratio: bottleneck width ``max(2, floor(C * ratio))`` (the release's ``C // 2`` for the default
            0.5; at least 2: a LayerNorm over a single value is constant).
    """

    def __init__(self, channels: int, ratio: float = 0.5) -> None:
        super().__init__()
        if channels < 1:
            raise KDConfigError(f"a context block needs >= 1 channel, got {channels}")
        planes = max(2, int(math.floor(channels * ratio)))
        self.channels = channels
        self.conv_mask = nn.Conv3d(channels, 1, kernel_size=1)
        self.channel_add = nn.Sequential(
            nn.Conv3d(channels, planes, kernel_size=1),
            nn.GroupNorm(1, planes),  # one group over (C, 1, 1, 1) = LayerNorm over the channels
            nn.ReLU(inplace=True),
            nn.Conv3d(planes, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add[-1].weight)
        nn.init.zeros_(self.channel_add[-1].bias)

    @property
    def mask_parameters(self) -> tuple[Tensor, Tensor]:
        """``(weight (C,), bias (1,))`` of the 1x1x1 mask convolution."""
        return self.conv_mask.weight.view(-1), self.conv_mask.bias

    def delta(self, context: Tensor) -> Tensor:
        """The channel-add transform of a context vector: ``(B, C)`` -> ``(B, C)``."""
        weight_dtype = self.conv_mask.weight.dtype
        out = self.channel_add(context.to(weight_dtype)[:, :, None, None, None])
        return out[:, :, 0, 0, 0].float()

    def affinity_and_delta(self, logits: Tensor, pooled_fn) -> tuple[Tensor, Tensor]:
        """``alpha (B, D, H, W)`` from mask ``logits`` and ``delta (B, C)`` via ``pooled_fn(alpha)``."""
        alpha = torch.softmax(logits.float().flatten(1), dim=1).view(logits.shape)
        return alpha, self.delta(pooled_fn(alpha))

    def forward(self, features: Tensor) -> Tensor:
        """``G(F)``: ``(B, C, D, H, W)`` -> ``(B, C, D, H, W)`` (materialised; the losses never call this)."""
        logits = F.conv3d(features, self.conv_mask.weight, self.conv_mask.bias)[:, 0]
        alpha = torch.softmax(logits.float().flatten(1), dim=1).view(logits.shape)
        ctx = torch.einsum("bcdhw,bdhw->bc", features.float(), alpha)
        return features + self.delta(ctx).to(features.dtype)[:, :, None, None, None]


@dataclass
class LevelResult:
    """The terms of one level (scalars) and, on request, its inspection maps ``(B, D, H, W)``."""

    terms: dict[str, Tensor]
    maps: dict[str, Tensor]


def recokd_level(
    student: Tensor,
    teacher: Tensor,
    *,
    projection: Projection = None,
    masks: tuple[Tensor, Tensor] | None = None,
    context_blocks: tuple[GlobalContextBlock3d, GlobalContextBlock3d] | None = None,
    temperature: float = 0.5,
    chunk_size: int | None = None,
    return_maps: bool = False,
) -> LevelResult:
    """The ReCo-KD terms of one level.

    Args:
        student: ``(B, C, D, H, W)`` adapted student features, or ``(B, C_s, D, H, W)`` raw ones
            with ``projection = (weight (C, C_s), bias (C,))`` the 1x1x1 adapter folded in.
        teacher: ``(B, C, D, H, W)``, detached.
        masks: ``(W_fg, W_bg)`` each ``(B, D, H, W)`` for MS-SARD, or ``None`` to skip it.
        context_blocks: ``(student_block, teacher_block)`` for MS-CA, or ``None`` to skip it.
        temperature: attention temperature ``T``.
        chunk_size: depth slices per slab (``None``: automatic); results do not depend on it.
        return_maps: also return the maps (detached): masks, attentions, affinities, discrepancy.

    Returns:
        :class:`LevelResult` with terms among ``fg``, ``bg``, ``att``, ``rel``.
    """
    b, c = teacher.shape[:2]
    spatial_size = teacher.shape[2:]
    n = math.prod(spatial_size)
    if student.shape[0] != b or student.shape[2:] != spatial_size:
        raise KDConfigError(f"student features {tuple(student.shape)} do not match teacher features {tuple(teacher.shape)}")
    out_channels = projection[0].shape[0] if projection is not None else student.shape[1]
    if out_channels != c:
        raise KDConfigError(f"adapted student has {out_channels} channels but the teacher has {c}; use an adapter")
    teacher = teacher.detach()
    terms: dict[str, Tensor] = {}
    maps: dict[str, Tensor] = {}
    rows: list[tuple[Tensor | None, Tensor | None, bool]] = []
    denominators: list[Tensor] = []
    names: list[str] = []
    offset = None
    s_block, t_block = context_blocks if context_blocks is not None else (None, None)

    t_spatial, t_channel, t_logits = abs_statistics(
        teacher, mask=t_block.mask_parameters if t_block is not None else None, chunk=chunk_size
    )
    if masks is not None or return_maps:
        s_spatial, s_channel, s_logits = abs_statistics(
            student, projection, mask=s_block.mask_parameters if s_block is not None else None, chunk=chunk_size
        )
    elif s_block is not None:
        s_spatial = s_channel = None
        _, _, s_logits = abs_statistics(student, projection, mask=s_block.mask_parameters, chunk=chunk_size)
    with torch.no_grad():
        at_spatial = attention_from_means(t_spatial, temperature)
        at_channel = attention_from_means(t_channel, temperature)

    if masks is not None:
        w_fg, w_bg = (m.float() for m in masks)
        voxel = [at_spatial * w_fg, at_spatial * w_bg]
        rows += [(voxel[0], at_channel, False), (voxel[1], at_channel, False)]
        denominators += [(c * w_fg.sum()).clamp(min=1e-12), (c * w_bg.sum()).clamp(min=1e-12)]
        names += ["fg", "bg"]
        as_spatial = attention_from_means(s_spatial, temperature)
        as_channel = attention_from_means(s_channel, temperature)
        terms["att"] = (as_channel - at_channel).abs().mean() + (as_spatial - at_spatial).abs().mean()
    if s_block is not None:
        alpha_t, delta_t = t_block.affinity_and_delta(t_logits, lambda a: context_pool(teacher, a, chunk=chunk_size))
        alpha_s, delta_s = s_block.affinity_and_delta(s_logits, lambda a: context_pool(student, a, projection, chunk_size))
        offset = delta_s - delta_t
        rows.append((None, None, True))
        denominators.append(torch.tensor(float(b * c * n), device=teacher.device))
        names.append("rel")
    if rows:
        sums = weighted_squared_errors(student, teacher, rows, projection, offset, chunk_size)
        for i, name in enumerate(names):
            terms[name] = sums[i] / denominators[i]

    if return_maps:
        with torch.no_grad():
            maps["teacher_spatial_attention"] = at_spatial
            maps["student_spatial_attention"] = attention_from_means(s_spatial, temperature).detach()
            if masks is not None:
                maps["fg_mask"], maps["bg_mask"] = (m.detach().float() for m in masks)
            if s_block is not None:
                maps["teacher_affinity"] = alpha_t.detach()
                maps["student_affinity"] = alpha_s.detach()
            maps["discrepancy"] = voxel_discrepancy(student, teacher, projection, chunk_size)
    return LevelResult(terms=terms, maps=maps)


@torch.no_grad()
def voxel_discrepancy(student: Tensor, teacher: Tensor, projection: Projection = None, chunk_size: int | None = None) -> Tensor:
    """Per-voxel teacher–student discrepancy ``mean_c (F~S - FT)^2``: -> ``(B, D, H, W)`` float32."""
    from ReCoKDLib.losses.fused import Workspace, _diff_slab, auto_chunk, depth_slabs

    weight, bias = projection if projection is not None else (None, None)
    out = torch.empty((teacher.shape[0], *teacher.shape[2:]), dtype=torch.float32, device=teacher.device)
    chunk = chunk_size or auto_chunk(teacher.shape)
    ws = Workspace(teacher.device)
    with torch.autocast(device_type=teacher.device.type, enabled=False):
        for sl in depth_slabs(teacher.shape[2], chunk):
            diff = _diff_slab(student, teacher, sl, weight, bias, ws)
            torch.mean(diff.square_(), dim=1, out=out[:, sl])
    return out


# --------------------------------------------------------------------------- modules


def _pointwise_projection(batch: KDBatch, level: int) -> tuple[Tensor, Projection] | None:
    """``(raw student features, (weight, bias))`` when the level's adapter is a pure 1x1x1 map."""
    adapters = getattr(batch, "student_adapters", None)
    if adapters is None or batch.raw_student_features is None:
        return None
    adapter = adapters[level]
    raw = batch.raw_student_features[level]
    pointwise = getattr(adapter, "pointwise_projection", None)
    if pointwise is None or tuple(raw.shape[2:]) != tuple(batch.teacher_features[level].shape[2:]):
        return None
    projection = pointwise()
    if projection is not None and projection[0].shape[1] != raw.shape[1]:
        return None
    return raw, projection


class _ReCoKDBase(nn.Module):
    """Shared machinery of :class:`ReCoKDLoss`, :class:`MSSARDLoss` and :class:`MSCALoss`."""

    use_regions_loss = True
    use_context_loss = True
    name = "recokd"

    def __init__(
        self,
        *,
        teacher_channels: Sequence[int] = (),
        num_classes: int = 2,
        temperature: float = 0.5,
        tau: float = 1.0,
        coef_fg: float = 1.0,
        coef_bg: float = 1.0,
        coef_att: float = 1.0,
        coef_rel: float = 1.0,
        stage_alpha: float = 0.4,
        stage_weights: Sequence[float] | None = None,
        chunk_size: int | None = None,
        frozen_aux: bool = False,
        context_ratio: float = 0.5,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise KDConfigError(f"temperature must be > 0, got {temperature}")
        if tau <= 0:
            raise KDConfigError(f"tau (mask exponent) must be > 0, got {tau}")
        if chunk_size is not None and chunk_size < 1:
            raise KDConfigError(f"chunk_size is a number of depth slices >= 1 (or None for automatic), got {chunk_size}")
        if self.use_regions_loss and num_classes < 2:
            raise KDConfigError(f"num_classes must include the background (>= 2), got {num_classes}")
        self.num_classes = int(num_classes)
        self.temperature = float(temperature)
        self.tau = float(tau)
        self.coef = {"fg": float(coef_fg), "bg": float(coef_bg), "att": float(coef_att), "rel": float(coef_rel)}
        self.stage_alpha = float(stage_alpha)
        self.explicit_weights = [float(w) for w in stage_weights] if stage_weights is not None else None
        self.chunk_size = chunk_size
        self.frozen_aux = bool(frozen_aux)
        self._warned_adapters = False
        self.teacher_channels = [int(ch) for ch in teacher_channels]
        if self.use_context_loss:
            if not self.teacher_channels:
                raise KDConfigError(f"{self.name} needs teacher_channels (one per level) to build its context blocks")
            self.student_context = nn.ModuleList(GlobalContextBlock3d(ch, context_ratio) for ch in self.teacher_channels)
            self.teacher_context = nn.ModuleList(GlobalContextBlock3d(ch, context_ratio) for ch in self.teacher_channels)
            if frozen_aux:
                for p in [*self.student_context.parameters(), *self.teacher_context.parameters()]:
                    p.requires_grad_(False)

    def level_weights(self, num_levels: int) -> list[float]:
        if self.explicit_weights is not None:
            if len(self.explicit_weights) != num_levels:
                raise KDConfigError(
                    f"{self.name}: {len(self.explicit_weights)} stage_weights given for {num_levels} feature levels"
                )
            return self.explicit_weights
        return stage_weights(num_levels, self.stage_alpha)

    def _check(self, batch: KDBatch) -> None:
        batch.check_features(self.name)
        if self.use_context_loss and len(self.teacher_channels) != batch.num_levels:
            raise KDConfigError(
                f"{self.name} was built for {len(self.teacher_channels)} levels (teacher_channels) but the batch has {batch.num_levels}"
            )
        if self.use_context_loss:
            got = [int(t.shape[1]) for t in batch.teacher_features]
            if got != self.teacher_channels:
                raise KDConfigError(f"{self.name}: teacher channels per level {got} != teacher_channels {self.teacher_channels}")

    def _warn_if_adapters_train(self, batch: KDBatch) -> None:
        if not self.frozen_aux or self._warned_adapters or not batch.student_adapters:
            return
        if any(p.requires_grad for a in batch.student_adapters if a is not None for p in a.parameters()):
            self._warned_adapters = True
            warnings.warn(f"{self.name}: frozen_aux freezes the context blocks only; the batch's adapters still "
                          "train (freeze DistillationPair.adapters too, or use TrainConfig.frozen_aux, for the "
                          "release's behaviour)", stacklevel=3)

    def forward(self, batch: KDBatch, return_maps: bool = False) -> KDOutput:
        self._check(batch)
        self._warn_if_adapters_train(batch)
        labels = batch.require_labels(self.name) if self.use_regions_loss else batch.labels
        num_classes = batch.class_count(self.num_classes)
        weights = self.level_weights(batch.num_levels)
        total: Tensor | None = None
        terms: dict[str, Tensor] = {}
        maps: dict[str, Tensor] = {}
        for level, teacher in enumerate(batch.teacher_features):
            fused = _pointwise_projection(batch, level)
            # folded: the raw features and the adapter's (weight, bias); the adapted level is never read
            student, projection = fused if fused is not None else (batch.student_features[level], None)
            masks = None
            if self.use_regions_loss:
                masks = region_mask_weights(labels, num_classes, teacher.shape[2:], self.tau, batch.regions)
            blocks = (self.student_context[level], self.teacher_context[level]) if self.use_context_loss else None
            result = recokd_level(
                student,
                teacher,
                projection=projection,
                masks=masks,
                context_blocks=blocks,
                temperature=self.temperature,
                chunk_size=self.chunk_size,
                return_maps=return_maps,
            )
            level_loss = sum(self.coef[k] * v for k, v in result.terms.items())
            total = weights[level] * level_loss if total is None else total + weights[level] * level_loss
            for key, value in result.terms.items():
                terms[f"{level}/{key}"] = value.detach()
                terms[key] = terms.get(key, 0.0) + weights[level] * value.detach()
            if return_maps:
                maps.update({f"{level}/{k}": v for k, v in result.maps.items()})
                if labels is not None:
                    per_class = class_region_masks(resize_labels(labels, teacher.shape[2:]), num_classes, batch.regions)
                    for cls in range(per_class.shape[1]):
                        maps[f"{level}/class_mask/{cls}"] = per_class[:, cls]
        loss = total if total is not None else zero_loss(batch)
        return KDOutput(loss=loss, terms=terms, maps=maps)

    def extra_repr(self) -> str:
        return (
            f"T={self.temperature}, tau={self.tau}, coef={self.coef}, stage_alpha={self.stage_alpha}, "
            f"stage_weights={self.explicit_weights}, frozen_aux={self.frozen_aux}"
        )


class ReCoKDLoss(_ReCoKDBase):
    """ReCo-KD = MS-SARD + MS-CA over the distilled levels (see the module docstring).

    Args:
        teacher_channels: teacher channels per level (one context-block pair each).
        num_classes: ``K`` including the background, used when the batch does not set ``num_classes``
            (a hand-built :class:`KDBatch`); batches from the feature taps always set it.
        temperature: attention temperature ``T`` (0.5).
        tau: mask exponent (1.0).
        coef_fg / coef_bg / coef_att / coef_rel: term coefficients (1.0 each).
        stage_alpha: ``alpha`` of the level weights ``2^(-3 alpha k)`` (0.4).
        stage_weights: explicit per-level weights (override ``stage_alpha``; used as given).
        chunk_size: depth slices per slab (``None``: about 16 MiB slabs); values do not depend on it.
        frozen_aux: freeze the context blocks (the release never optimised them). The adapters are the
            taps' (``DistillationPair.adapters``): freeze them too for the release's behaviour (the
            engine's ``TrainConfig.frozen_aux`` does both); the loss warns once when they still train.
        context_ratio: bottleneck width of the context blocks relative to ``C`` (0.5: ``C // 2``).

    ``forward(batch, return_maps=False) -> KDOutput``: ``terms`` hold ``fg``, ``bg``, ``att``,
    ``rel`` (level-weighted sums) and ``"<level>/<term>"``; ``maps`` the inspection maps.
    """


class MSSARDLoss(_ReCoKDBase):
    """MS-SARD alone: class-balanced, teacher-attention-weighted region losses + attention consistency.

    Needs labels (``batch.labels``; for label-free use pass teacher pseudo-labels from
    :func:`~ReCoKDLib.losses.masks.pseudo_labels_from_teacher`). Arguments as :class:`ReCoKDLoss`.
    """

    use_context_loss = False
    name = "ms_sard"

    def __init__(
        self,
        num_classes: int = 2,
        temperature: float = 0.5,
        tau: float = 1.0,
        coef_fg: float = 1.0,
        coef_bg: float = 1.0,
        coef_att: float = 1.0,
        stage_alpha: float = 0.4,
        stage_weights: Sequence[float] | None = None,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(
            num_classes=num_classes, temperature=temperature, tau=tau, coef_fg=coef_fg, coef_bg=coef_bg,
            coef_att=coef_att, coef_rel=0.0, stage_alpha=stage_alpha, stage_weights=stage_weights, chunk_size=chunk_size,
        )  # fmt: skip


class MSCALoss(_ReCoKDBase):
    """MS-CA alone: MSE between context-augmented student and teacher features; needs no labels.

    Arguments as :class:`ReCoKDLoss`.
    """

    use_regions_loss = False
    name = "ms_ca"

    def __init__(
        self,
        teacher_channels: Sequence[int] = (),
        coef_rel: float = 1.0,
        stage_alpha: float = 0.4,
        stage_weights: Sequence[float] | None = None,
        chunk_size: int | None = None,
        frozen_aux: bool = False,
        context_ratio: float = 0.5,
        temperature: float = 0.5,
    ) -> None:
        super().__init__(
            teacher_channels=teacher_channels, coef_rel=coef_rel, stage_alpha=stage_alpha, stage_weights=stage_weights,
            chunk_size=chunk_size, frozen_aux=frozen_aux, context_ratio=context_ratio, temperature=temperature,
        )  # fmt: skip

