"""The contract every knowledge-distillation loss of ReCoKD follows.

Shapes use one notation across ReCoKDLib: ``B`` batch, ``C`` channels, ``K`` classes (background
included), ``(D, H, W)`` spatial size of a feature level, ``L`` number of distilled levels.

A KD loss is an ``nn.Module`` called with one :class:`KDBatch` and returning a :class:`KDOutput`.
Feature-level losses read ``teacher_features[l]`` and ``student_features[l]``: the student's are
already mapped by the feature taps' adapters to the teacher's channels and spatial size, so both
are ``(B, C_l, D_l, H_l, W_l)``. Channel-free methods may read ``raw_student_features`` instead.
The adapted features may be a :class:`LazyFeatures` sequence (what the feature taps build): level
``l`` is adapted on first access and cached, so a loss that folds the adapter into its own
computation (ReCo-KD) never makes the adapter build a teacher-sized tensor. Read the shapes from
:func:`feature_shape`, which does not materialise anything.
Losses that own trainable parts (MS-CA context blocks, CIRKD projector) expose them through
``parameters()`` like any module; the engine hands them to the optimiser.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor


class KDConfigError(ValueError):
    """A KD loss was configured or called with inconsistent options or shapes."""


class LazyFeatures(Sequence):
    """A read-only list of per-level tensors, each built by ``make(level)`` on first access and cached.

    ``features[l]`` is exactly what ``make(l)`` returns, computed under the gradient and autocast
    modes that were active when the sequence was created (so a later access, e.g. from an
    inspection pass, yields the same tensor the eager list would have held). Shapes are known
    without building anything: :meth:`shape`.

    Args:
        make: ``level -> Tensor`` of shape ``shapes[level]``.
        shapes: the shape ``(B, C_l, D_l, H_l, W_l)`` of every level.
    """

    def __init__(self, make: Callable[[int], Tensor], shapes: Sequence[Sequence[int]]) -> None:
        self._make = make
        self._shapes = [torch.Size(s) for s in shapes]
        self._cache: dict[int, Tensor] = {}
        self._grad_enabled = torch.is_grad_enabled()
        devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
        self._autocast = {dev: (torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev)) for dev in devices}

    def __len__(self) -> int:
        return len(self._shapes)

    def _index(self, level: int) -> int:
        if not -len(self) <= level < len(self):
            raise IndexError(f"feature level {level} out of range for {len(self)} levels")
        return level % len(self)

    def __getitem__(self, level):
        if isinstance(level, slice):
            return [self[i] for i in range(*level.indices(len(self)))]
        level = self._index(level)
        if level not in self._cache:
            self._cache[level] = self._build(level)
        return self._cache[level]

    def _build(self, level: int) -> Tensor:
        with torch.set_grad_enabled(self._grad_enabled), _autocast_states(self._autocast):
            out = self._make(level)
        if tuple(out.shape) != tuple(self._shapes[level]):
            raise KDConfigError(f"lazy feature level {level} built {tuple(out.shape)}, declared {tuple(self._shapes[level])}")
        return out

    def shape(self, level: int) -> torch.Size:
        """Shape of level ``level`` without building it."""
        return self._shapes[self._index(level)]

    def is_materialised(self, level: int) -> bool:
        """Whether level ``level`` has been built (read) already."""
        return self._index(level) in self._cache

    @property
    def materialised_levels(self) -> list[int]:
        return sorted(self._cache)

    def __repr__(self) -> str:
        return f"LazyFeatures(levels={len(self)}, materialised={self.materialised_levels})"


class _autocast_states:
    """Re-enter recorded autocast states ``{device_type: (dtype, enabled)}``."""

    def __init__(self, states: dict) -> None:
        self._contexts = [torch.autocast(device_type=dev, dtype=dtype, enabled=on) for dev, (dtype, on) in states.items()]

    def __enter__(self):
        for ctx in self._contexts:
            ctx.__enter__()
        return self

    def __exit__(self, *exc):
        for ctx in reversed(self._contexts):
            ctx.__exit__(*exc)
        return False


def feature_shape(features: Sequence[Tensor], level: int) -> torch.Size:
    """The shape of ``features[level]`` without materialising a :class:`LazyFeatures` level."""
    if isinstance(features, LazyFeatures):
        return features.shape(level)
    return features[level].shape


@dataclass
class KDBatch:
    """Everything a distillation loss may read for one training step.

    Attributes:
        teacher_features: per level ``(B, C_l, D_l, H_l, W_l)``, detached (teacher runs in no_grad).
        student_features: per level, adapted to the teacher: ``(B, C_l, D_l, H_l, W_l)``; a list or
            a :class:`LazyFeatures` (adapted on first access; index it, don't copy it).
        teacher_logits: ``(B, K, D, H, W)`` at full resolution, or ``None``.
        student_logits: ``(B, K, D, H, W)`` at full resolution, or ``None``.
        labels: ``(B, 1, D, H, W)`` integer class ids in ``[0, K)`` (values < 0 are ignored), or
            ``(B, R, D, H, W)`` binary region maps when ``regions`` is true; ``None`` if unlabelled.
        num_classes: ``K``, the number of classes including the background (``R + 1`` for region
            labels), or ``None`` (the default): then a loss uses its own ``num_classes`` argument, or
            the teacher logits' channel count (:meth:`class_count`). The feature taps always set it.
        raw_student_features: per level, the student's own features before the adapters
            ``(B, C^S_l, D^S_l, H^S_l, W^S_l)``; ``None`` when not captured.
        regions: labels are multi-channel region maps (BraTS-style) instead of class ids.
        student_adapters: per level, the module that mapped ``raw_student_features[l]`` to
            ``student_features[l]`` (the taps' adapters), or ``None``. Losses may use it to fold
            a pointwise adapter into their own computation instead of reading the adapted tensor.
    """

    teacher_features: list[Tensor] = field(default_factory=list)
    student_features: Sequence[Tensor] = field(default_factory=list)
    teacher_logits: Tensor | None = None
    student_logits: Tensor | None = None
    labels: Tensor | None = None
    num_classes: int | None = None
    raw_student_features: list[Tensor] | None = None
    regions: bool = False
    student_adapters: list | None = None

    @property
    def num_levels(self) -> int:
        return len(self.teacher_features)

    def class_count(self, default: int | None = None) -> int:
        """``K`` for the class-aware masks: the batch's ``num_classes`` when set, else ``default`` (a
        loss's own ``num_classes``), else the teacher logits' channels (``+ 1`` for region labels)."""
        if self.num_classes is not None:
            return int(self.num_classes)
        if default is not None:
            return int(default)
        if self.teacher_logits is not None:
            return int(self.teacher_logits.shape[1]) + (1 if self.regions else 0)
        raise KDConfigError("the number of classes is unknown: set KDBatch.num_classes (background included)")

    def check_features(self, who: str) -> None:
        """Raise :class:`KDConfigError` unless teacher and student features pair up level by level."""
        if not self.teacher_features:
            raise KDConfigError(f"{who} needs feature levels, but the batch has none")
        if len(self.teacher_features) != len(self.student_features):
            raise KDConfigError(
                f"{who}: {len(self.teacher_features)} teacher levels but {len(self.student_features)} student levels"
            )
        for level, t in enumerate(self.teacher_features):
            s_shape = feature_shape(self.student_features, level)  # never builds a lazy level
            if t.shape != s_shape:
                raise KDConfigError(
                    f"{who}: level {level} teacher features {tuple(t.shape)} != adapted student features "
                    f"{tuple(s_shape)}; map the student with the feature taps' adapters first"
                )

    def check_logits(self, who: str) -> None:
        """Raise :class:`KDConfigError` unless both logits are present with equal shapes."""
        if self.teacher_logits is None or self.student_logits is None:
            raise KDConfigError(f"{who} needs teacher and student logits")
        if self.teacher_logits.shape != self.student_logits.shape:
            raise KDConfigError(
                f"{who}: teacher logits {tuple(self.teacher_logits.shape)} != student logits "
                f"{tuple(self.student_logits.shape)}"
            )

    def require_labels(self, who: str) -> Tensor:
        """Return the labels or raise :class:`KDConfigError` naming the method that needs them."""
        if self.labels is None:
            raise KDConfigError(
                f"{who} needs labels (or teacher pseudo-labels from its argmax); the batch has none"
            )
        return self.labels


@dataclass
class KDOutput:
    """What a KD loss returns.

    Attributes:
        loss: the scalar to add (already weighted internally by the method's own coefficients).
        terms: named scalar components for logging, detached (e.g. ``{"fg": ..., "bg": ...}``).
        maps: only when called with ``return_maps=True``: inspection maps keyed
            ``"<level>/<name>"`` (and ``"<level>/<name>/<class>"`` where per class), each
            ``(B, D_l, H_l, W_l)`` or ``(B, 1, D_l, H_l, W_l)``; detached.
    """

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    maps: dict[str, Tensor] = field(default_factory=dict)


def zero_loss(batch: KDBatch) -> Tensor:
    """A differentiable zero on the batch's device (for terms that have nothing to compare).

    Prefers tensors that already exist (raw student features, student logits) over building a
    lazy adapted level.
    """
    for t in (*(batch.raw_student_features or ()), batch.student_logits):
        if t is not None:
            return t.sum() * 0.0
    for t in batch.student_features:
        return t.sum() * 0.0
    device = batch.teacher_features[0].device if batch.teacher_features else None
    return torch.zeros((), device=device)
