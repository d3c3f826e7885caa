"""The trainable module of a run, what DDP wraps: the network alone, or student + adapters + KD loss
around a frozen teacher. ``forward(images, labels) -> (output, kd loss, terms[, (labels, unlabelled)])``."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import Tensor, nn

from ReCoKDLib.engine.pseudo_labels import merge_pseudo_labels, merge_region_pseudo_labels


class _SegModule(nn.Module):
    """Teacher training: the network alone. ``forward -> (output, kd_loss None, {})``."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: Tensor, labels: Tensor, **_teacher_targets):
        return self.network(images), None, {}



class _DistillModule(nn.Module):
    """Student + adapters + KD loss around a frozen teacher (a ``DistillationPair``).

    ``forward(images (B, C, D, H, W), labels (B, 1, D, H, W)[, teacher_logits, teacher_features]) ->
    (student output, kd loss, terms, (merged labels, unlabelled (B,)))``: unlabelled samples take the
    teacher's argmax (:func:`merge_pseudo_labels`) before the KD loss reads the labels. With
    ``teacher_logits`` (``(B, K, D, H, W)``, and ``teacher_features`` per tap, cropped from the
    teacher cache with the same patch and spatial augmentation) the teacher is not run.
    """

    def __init__(self, pair: nn.Module, kd_loss: nn.Module, num_classes: int, label_spec: Any = None) -> None:
        super().__init__()
        self.pair = pair
        self.kd_loss = kd_loss
        self.num_classes = num_classes
        self.label_spec = label_spec  # nnunet.labels.LabelSpec; region-based: KD on region maps

    def forward(self, images: Tensor, labels: Tensor, teacher_logits: Tensor | None = None,
                teacher_features: Sequence[Tensor] = ()):
        cached = (teacher_logits, list(teacher_features)) if teacher_logits is not None else None
        out, batch = self.pair(images, labels=labels, num_classes=self.num_classes, teacher_outputs=cached)
        spec = self.label_spec
        if spec is not None and spec.has_regions:
            # sigmoid heads: pseudo-labels painted from the teacher's regions; the KD losses read
            # one binary map per region (class-aware masks per region, binary logit KD)
            from ReCoKDLib.nnunet.labels import labels_to_regions

            merged, unlabelled = merge_region_pseudo_labels(labels, batch.teacher_logits, spec.regions_class_order)
            batch.labels, batch.regions = labels_to_regions(merged, spec.regions), True
        else:
            merged, unlabelled = merge_pseudo_labels(labels, batch.teacher_logits)
            batch.labels = merged
        kd = self.kd_loss(batch)
        return out, kd.loss, kd.terms, (merged, unlabelled)



def build_kd_module(spec: Mapping[str, Mapping[str, Any]], teacher_channels: Sequence[int],
                    student_channels: Sequence[int], num_classes: int) -> nn.Module:
    """The weighted KD loss of ``spec`` (``losses.registry.build_combined_kd_loss``)."""
    from ReCoKDLib.losses.registry import build_combined_kd_loss

    return build_combined_kd_loss(spec, teacher_channels=teacher_channels, student_channels=student_channels,
                                  num_classes=num_classes)
