"""Feature taps: multi-scale features of any ``torch.nn.Module``, paired between teacher and student.

* :class:`FeatureTaps` records the outputs of named submodules with forward hooks and removes
  the hooks cleanly (context manager or :meth:`FeatureTaps.remove`).
* :class:`FeatureAdapter` maps one student level onto the teacher's: a trainable 1x1x1
  ``Conv3d`` from student to teacher channels (identity when they agree), then trilinear
  resizing when the spatial sizes differ.
* :class:`DistillationPair` runs a frozen teacher (eval mode, ``torch.no_grad``) and a student on
  the same input and returns the student's output plus a :class:`~ReCoKDLib.losses.base.KDBatch`
  with the adapted features and both logits: the one object the engine, the inspection maps and
  the tests use, so that what researchers see is what is optimised.
* :func:`lazy_adapted_features` gives those adapted features as a
  :class:`~ReCoKDLib.losses.base.LazyFeatures`: a level is adapted only when a loss reads it, so
  a loss that folds the 1x1x1 adapter into its own passes (ReCo-KD) costs no teacher-sized tensor.

Shapes: features ``(B, C, D, H, W)``; logits ``(B, K, D, H, W)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ReCoKDLib.losses.base import KDBatch, LazyFeatures


class TapError(ValueError):
    """A tap names a module that does not exist, or a tapped module did not run."""


def _first_tensor(output) -> Tensor:
    """The tensor of a module output (first element of a tuple/list/dict output)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return _first_tensor(output[0])
    if isinstance(output, dict) and output:
        return _first_tensor(next(iter(output.values())))
    raise TapError(f"cannot take a feature tensor from a module output of type {type(output).__name__}")


class FeatureTaps:
    """Capture the outputs of ``names`` (dotted module names, as in ``model.named_modules()``).

    Example:
        >>> with FeatureTaps(model, ["input_block", "downsamples.0"]) as taps:  # doctest: +SKIP
        ...     model(x)
        ...     f0, f1 = taps.collect()
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        # no names: nothing is tapped and collect() returns [] (output-level distillation, e.g. a
        # TorchScript teacher whose modules cannot be named)
        modules = dict(model.named_modules()) if names else {}
        missing = [n for n in names if n not in modules]
        if missing:
            available = [n for n in modules if n][:40]
            raise TapError(f"no module named {missing} in {type(model).__name__}; some available names: {available}")
        self.names = list(names)
        self._features: dict[str, Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def record(_module, _inputs, output):
            self._features[name] = _first_tensor(output)

        return record

    def collect(self) -> list[Tensor]:
        """Features of the last forward pass, in the order of ``names``; then forget them."""
        absent = [n for n in self.names if n not in self._features]
        if absent:
            raise TapError(f"tapped modules {absent} did not run in the last forward pass")
        feats = [self._features[n] for n in self.names]
        self._features.clear()
        return feats

    def clear(self) -> None:
        self._features.clear()

    def remove(self) -> None:
        """Remove every hook; the model behaves as if never tapped."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._features.clear()

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def probe_feature_shapes(model: nn.Module, names: Sequence[str], input_shape: Sequence[int]) -> list[torch.Size]:
    """Shapes ``(1, C, D, H, W)`` of the tapped features for one zero input of ``input_shape`` ``(C_in, D, H, W)``."""
    if not names:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with FeatureTaps(model, names) as taps, torch.no_grad():  # shapes only: no autograd graph
            model(torch.zeros((1, *input_shape), device=device))
            return [f.shape for f in taps.collect()]
    finally:
        model.train(was_training)


class FeatureAdapter(nn.Module):
    """Map student features ``(B, C_s, d, h, w)`` to the teacher's ``(B, C_t, D, H, W)``.

    A 1x1x1 ``Conv3d`` with bias when ``C_s != C_t`` (or ``always_project``), identity otherwise;
    trilinear resizing (after the projection, which is cheaper at the student's size) when the
    spatial sizes differ.
    """

    def __init__(self, student_channels: int, teacher_channels: int, always_project: bool = False) -> None:
        super().__init__()
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        if student_channels != teacher_channels or always_project:
            self.proj: nn.Module = nn.Conv3d(student_channels, teacher_channels, kernel_size=1, bias=True)
        else:
            self.proj = nn.Identity()

    def pointwise_projection(self) -> tuple[Tensor, Tensor | None] | None:
        """``(weight (C_t, C_s), bias (C_t,))`` of the 1x1x1 projection, or ``None`` for the identity.

        Lets a loss fold the adapter into its own chunked computation (the gradients still reach
        these parameters). Valid only where no resizing happens (equal spatial sizes).
        """
        if isinstance(self.proj, nn.Identity):
            return None
        return self.proj.weight.view(self.teacher_channels, self.student_channels), self.proj.bias

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        if x.shape[1] != self.student_channels:
            raise TapError(f"adapter expects {self.student_channels} student channels, got {tuple(x.shape)}")
        x = self.proj(x)
        if size is not None and tuple(x.shape[2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)
        return x


def lazy_adapted_features(
    adapters: Sequence[FeatureAdapter], student_features: Sequence[Tensor], teacher_features: Sequence[Tensor]
) -> LazyFeatures:
    """``adapters[l](student_features[l], size of teacher_features[l])`` per level, built on first access.

    Args:
        adapters: one :class:`FeatureAdapter` per level.
        student_features: raw student features ``(B, C^S_l, d_l, h_l, w_l)``.
        teacher_features: teacher features ``(B, C_l, D_l, H_l, W_l)`` (only their shapes are used).

    Returns:
        a :class:`~ReCoKDLib.losses.base.LazyFeatures` whose level ``l`` has shape
        ``(B, C_l, D_l, H_l, W_l)``; nothing is computed until a level is read.
    """
    if not len(adapters) == len(student_features) == len(teacher_features):
        raise TapError(
            f"need one adapter per level: {len(adapters)} adapters, {len(student_features)} student and "
            f"{len(teacher_features)} teacher levels"
        )
    shapes = []
    for level, (adapter, s, t) in enumerate(zip(adapters, student_features, teacher_features)):
        if s.shape[1] != adapter.student_channels or t.shape[1] != adapter.teacher_channels or s.shape[0] != t.shape[0]:
            raise TapError(
                f"level {level}: adapter maps {adapter.student_channels} -> {adapter.teacher_channels} channels but the "
                f"student features are {tuple(s.shape)} and the teacher's {tuple(t.shape)}"
            )
        shapes.append((s.shape[0], adapter.teacher_channels, *t.shape[2:]))
    sizes = [tuple(t.shape[2:]) for t in teacher_features]
    raw = list(student_features)
    adapters = list(adapters)
    return LazyFeatures(lambda level: adapters[level](raw[level], sizes[level]), shapes)


def kd_batch_from_features(
    adapters: Sequence[FeatureAdapter],
    teacher_features: Sequence[Tensor],
    student_features: Sequence[Tensor],
    teacher_logits: Tensor | None = None,
    student_logits: Tensor | None = None,
    labels: Tensor | None = None,
    num_classes: int | None = None,
    regions: bool = False,
) -> KDBatch:
    """The :class:`KDBatch` of one step from tapped features (what :class:`DistillationPair` returns).

    Teacher features ``(B, C_l, D_l, H_l, W_l)`` and logits are detached; the student's raw features
    ``(B, C^S_l, d_l, h_l, w_l)`` are kept as ``raw_student_features`` and adapted lazily
    (:func:`lazy_adapted_features`) as ``student_features``; the adapters ride along as
    ``student_adapters`` so that losses can fold them in. ``num_classes`` defaults to the teacher
    logits' channel count.
    """
    teacher_features = [t.detach() for t in teacher_features]
    student_features = list(student_features)
    if num_classes is None:
        if teacher_logits is None:
            raise TapError("num_classes is needed when there are no teacher logits to read it from")
        num_classes = teacher_logits.shape[1]
    return KDBatch(
        teacher_features=teacher_features,
        student_features=lazy_adapted_features(adapters, student_features, teacher_features),
        teacher_logits=teacher_logits.detach() if teacher_logits is not None else None,
        student_logits=student_logits,
        labels=labels,
        num_classes=int(num_classes),
        raw_student_features=student_features,
        regions=regions,
        student_adapters=list(adapters),
    )


class DistillationPair(nn.Module):
    """A frozen teacher and a trainable student, tapped at matching levels.

    Args:
        teacher: any module mapping ``(B, C_in, D, H, W)`` to logits ``(B, K, D, H, W)`` (or a
            tuple/list whose first element is that). Frozen here: ``requires_grad=False``, eval mode.
        student: any module with the same input and output convention (MONAI's stacked
            deep-supervision output is accepted; its full-resolution head is used for the logits).
        teacher_taps / student_taps: module names, one per distilled level, paired in order.
        input_shape: ``(C_in, D, H, W)`` of a valid input, used once to probe channel counts.
        always_project: use a 1x1x1 adapter even where the channel counts agree.

    Attributes:
        adapters: ``nn.ModuleList`` of :class:`FeatureAdapter`, trainable; give their parameters
            (and the KD loss's) to the optimiser.
        teacher_channels / student_channels: channels per level.
        teacher_strides: per level the teacher feature's stride ``(s_D, s_H, s_W)`` relative to the
            input (from the probe), or ``None`` where the input size is not a whole multiple.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        teacher_taps: Sequence[str],
        student_taps: Sequence[str],
        input_shape: Sequence[int],
        always_project: bool = False,
    ) -> None:
        super().__init__()
        if len(teacher_taps) != len(student_taps):
            raise TapError(
                f"teacher and student need the same number of tapped levels, got {len(teacher_taps)} and {len(student_taps)}"
            )
        self.teacher = teacher
        self.student = student
        self.teacher_taps = list(teacher_taps)
        self.student_taps = list(student_taps)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        t_shapes = probe_feature_shapes(teacher, teacher_taps, input_shape)
        s_shapes = probe_feature_shapes(student, student_taps, input_shape)
        self.teacher_channels = [int(s[1]) for s in t_shapes]
        self.student_channels = [int(s[1]) for s in s_shapes]
        self.teacher_strides = [
            tuple(int(n) // int(f) for n, f in zip(input_shape[1:], s[2:]))
            if all(int(f) and int(n) % int(f) == 0 for n, f in zip(input_shape[1:], s[2:])) else None
            for s in t_shapes
        ]
        self.adapters = nn.ModuleList(
            FeatureAdapter(cs, ct, always_project) for cs, ct in zip(self.student_channels, self.teacher_channels)
        )
        self._t_taps = FeatureTaps(teacher, teacher_taps)
        self._s_taps = FeatureTaps(student, student_taps)

    def train(self, mode: bool = True) -> "DistillationPair":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher stays in eval mode whatever the pair does
        return self

    def remove_taps(self) -> None:
        """Remove the forward hooks from both networks (they keep working as plain models)."""
        self._t_taps.remove()
        self._s_taps.remove()

    def release_teacher(self) -> None:
        """Drop the teacher (its outputs come from a cache from now on: ``forward(teacher_outputs=...)``),
        so that it is neither moved to the training device nor kept in memory by the pair."""
        self._t_taps.remove()
        self.teacher = None

    @torch.no_grad()
    def teacher_forward(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Teacher logits ``(B, K, D, H, W)`` and tapped features, without gradients."""
        self.teacher.eval()
        out = self.teacher(images)
        logits = _first_tensor(out)
        if logits.dim() == 6:  # stacked deep supervision: full-resolution head first
            logits = logits[:, 0]
        return logits, self._t_taps.collect()

    def forward(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        num_classes: int | None = None,
        regions: bool = False,
        teacher_outputs: tuple[Tensor, Sequence[Tensor]] | None = None,
    ) -> tuple[Tensor, KDBatch]:
        """Run both networks on ``images`` ``(B, C_in, D, H, W)``.

        ``teacher_outputs``: the teacher's logits ``(B, K, D, H, W)`` and tapped features for these
        images, computed beforehand (``engine.teacher_cache``); the teacher is then not run.

        Returns:
            the student's raw output (what the segmentation loss reads: possibly MONAI's stacked
            deep-supervision tensor) and a :class:`KDBatch` for the KD losses, whose
            ``student_features`` are adapted lazily (:func:`kd_batch_from_features`).
        """
        if teacher_outputs is not None:
            t_logits, t_feats = teacher_outputs[0], list(teacher_outputs[1])
        elif self.teacher is None:
            raise TapError("the teacher was released (cached outputs); pass teacher_outputs")
        else:
            t_logits, t_feats = self.teacher_forward(images)
        s_out = self.student(images)
        s_feats = self._s_taps.collect()
        s_logits = _first_tensor(s_out)
        if s_logits.dim() == 6:
            s_logits = s_logits[:, 0]
        batch = kd_batch_from_features(
            self.adapters, t_feats, s_feats, t_logits, s_logits, labels=labels, num_classes=num_classes, regions=regions
        )
        return s_out, batch
