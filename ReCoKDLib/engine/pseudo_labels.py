"""Label-free and partially labelled distillation: the teacher's predictions stand in for missing labels."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ReCoKDLib.data.sampling import UNLABELLED


def unlabelled_samples(labels: Tensor) -> Tensor:
    """``(B,)`` bool: which samples of ``labels`` ``(B, 1, D, H, W)`` come from unlabelled cases
    (any voxel equal to ``data.sampling.UNLABELLED``; padding and augmentation may add zeros)."""
    return (labels == UNLABELLED).flatten(1).any(dim=1)


def merge_pseudo_labels(labels: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Label-free distillation: the teacher's argmax wherever a sample has no annotation.

    Samples from unlabelled cases (:func:`unlabelled_samples`) take the teacher's argmax
    (``losses.masks.pseudo_labels_from_teacher``) as their labels, whole; samples with real labels
    keep them unchanged (real labels take precedence). ReCo-KD's class-aware region masks and the
    hard segmentation target are then built from the result.

    Args:
        labels: ``(B, 1, D, H, W)`` integer class ids, :data:`UNLABELLED` for unannotated cases.
        teacher_logits: ``(B, K, D, H, W)``.

    Returns:
        ``(merged labels (B, 1, D, H, W) int64, unlabelled (B,) bool)``.
    """
    from ReCoKDLib.losses.masks import pseudo_labels_from_teacher

    unlabelled = unlabelled_samples(labels)
    if not bool(unlabelled.any()):
        return labels, unlabelled
    pseudo = pseudo_labels_from_teacher(teacher_logits).to(labels.dtype)
    return torch.where(unlabelled[:, None, None, None, None], pseudo, labels), unlabelled


def pseudo_weighted_seg_loss(seg_loss: nn.Module, heads: list[Tensor], labels: Tensor, unlabelled: Tensor | None,
                             pseudo_weight: float) -> Tensor:
    """Segmentation loss with the samples on teacher pseudo-labels weighted by ``pseudo_weight``.

    ``heads``: deep-supervision logits ``[(B, K, D, H, W), ...]``; ``labels`` the merged labels;
    ``unlabelled`` ``(B,)`` bool (``None``: all labelled). The loss is the sample-count-weighted
    mean of the labelled part and ``pseudo_weight`` times the pseudo-labelled part.
    """
    if unlabelled is None or not bool(unlabelled.any()):
        return seg_loss(heads, labels)
    total = labels.shape[0]
    parts = []
    for mask, weight in ((~unlabelled, 1.0), (unlabelled, float(pseudo_weight))):
        n = int(mask.sum())
        if n and weight > 0:
            parts.append(seg_loss([h[mask] for h in heads], labels[mask]) * (weight * n / total))
    return sum(parts) if parts else heads[0].sum() * 0.0


def merge_region_pseudo_labels(labels: Tensor, teacher_logits: Tensor,
                               regions_class_order: Sequence[int]) -> tuple[Tensor, Tensor]:
    """:func:`merge_pseudo_labels` for region (sigmoid) teachers: unlabelled samples take the
    teacher's regions painted into class ids (``nnunet.labels.paint_regions``, later regions
    overwrite); ``teacher_logits`` ``(B, R, D, H, W)``. Returns ``(labels (B, 1, D, H, W), unlabelled (B,))``."""
    from ReCoKDLib.nnunet.labels import paint_regions

    unlabelled = unlabelled_samples(labels)
    if not bool(unlabelled.any()):
        return labels, unlabelled
    pseudo = paint_regions(teacher_logits.detach(), regions_class_order).to(labels.dtype)
    return torch.where(unlabelled[:, None, None, None, None], pseudo, labels), unlabelled
