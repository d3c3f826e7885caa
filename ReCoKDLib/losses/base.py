"""The contract every knowledge-distillation loss of ReCoKD follows.

Shapes use one notation across ReCoKDLib: ``B`` batch, ``C`` channels, ``K`` classes (background
included), ``(D, H, W)`` spatial size of a feature level, ``L`` number of distilled levels.

A KD loss is an ``nn.Module`` called with one :class:`KDBatch` and returning a :class:`KDOutput`.
Feature-level losses read ``teacher_features[l]`` and ``student_features[l]``: the student's are
already mapped by the feature taps' adapters to the teacher's channels and spatial size, so both
are ``(B, C_l, D_l, H_l, W_l)``. Channel-free methods may read ``raw_student_features`` instead.
Losses that own trainable parts (MS-CA context blocks, CIRKD projector) expose them through
``parameters()`` like any module; the engine hands them to the optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


class KDConfigError(ValueError):
    """A KD loss was configured or called with inconsistent options or shapes."""


@dataclass
class KDBatch:
    """Everything a distillation loss may read for one training step.

    Attributes:
        teacher_features: per level ``(B, C_l, D_l, H_l, W_l)``, detached (teacher runs in no_grad).
        student_features: per level, adapted to the teacher: ``(B, C_l, D_l, H_l, W_l)``.
        teacher_logits: ``(B, K, D, H, W)`` at full resolution, or ``None``.
        student_logits: ``(B, K, D, H, W)`` at full resolution, or ``None``.
        labels: ``(B, 1, D, H, W)`` integer class ids in ``[0, K)`` (values < 0 are ignored), or
            ``(B, R, D, H, W)`` binary region maps when ``regions`` is true; ``None`` if unlabelled.
        num_classes: ``K``, the number of classes including the background.
        raw_student_features: per level, the student's own features before the adapters
            ``(B, C^S_l, D^S_l, H^S_l, W^S_l)``; ``None`` when not captured.
        regions: labels are multi-channel region maps (BraTS-style) instead of class ids.
        student_adapters: per level, the module that mapped ``raw_student_features[l]`` to
            ``student_features[l]`` (the taps' adapters), or ``None``. Losses may use it to fold
            a pointwise adapter into their own computation instead of reading the adapted tensor.
    """

    teacher_features: list[Tensor] = field(default_factory=list)
    student_features: list[Tensor] = field(default_factory=list)
    teacher_logits: Tensor | None = None
    student_logits: Tensor | None = None
    labels: Tensor | None = None
    num_classes: int = 2
    raw_student_features: list[Tensor] | None = None
    regions: bool = False
    student_adapters: list | None = None

    @property
    def num_levels(self) -> int:
        return len(self.teacher_features)

    def check_features(self, who: str) -> None:
        """Raise :class:`KDConfigError` unless teacher and student features pair up level by level."""
        if not self.teacher_features:
            raise KDConfigError(f"{who} needs feature levels, but the batch has none")
        if len(self.teacher_features) != len(self.student_features):
            raise KDConfigError(
                f"{who}: {len(self.teacher_features)} teacher levels but {len(self.student_features)} student levels"
            )
        for level, (t, s) in enumerate(zip(self.teacher_features, self.student_features)):
            if t.shape != s.shape:
                raise KDConfigError(
                    f"{who}: level {level} teacher features {tuple(t.shape)} != adapted student features "
                    f"{tuple(s.shape)}; map the student with the feature taps' adapters first"
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
    """A differentiable zero on the batch's device (for terms that have nothing to compare)."""
    for t in (*batch.student_features, batch.student_logits):
        if t is not None:
            return t.sum() * 0.0
    return torch.zeros(())
