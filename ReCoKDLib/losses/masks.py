"""Labels at feature resolution, and the class-aware region masks shared by every KD method.

Shapes: labels ``(B, 1, D, H, W)`` integer class ids (negative = ignored) or ``(B, R, D, H, W)``
binary region maps; features ``(B, C, d, h, w)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ReCoKDLib.losses.base import KDConfigError


def resize_labels(labels: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resize of ``labels`` ``(B, R, D, H, W)`` to spatial ``size`` ``(d, h, w)``.

    Integer ids stay integers (no interpolation between classes); the dtype is kept.
    """
    if labels.dim() != 5:
        raise KDConfigError(f"labels must be (B, 1, D, H, W) or (B, R, D, H, W), got shape {tuple(labels.shape)}")
    size = tuple(int(s) for s in size)
    if tuple(labels.shape[2:]) == size:
        return labels
    dtype = labels.dtype
    resized = F.interpolate(labels.float(), size=size, mode="nearest-exact")
    return resized.to(dtype)


def one_hot_labels(labels: Tensor, num_classes: int) -> Tensor:
    """``(B, 1, D, H, W)`` class ids -> ``(B, K, D, H, W)`` float one-hot; ignored voxels (< 0) are all-zero."""
    if labels.dim() != 5 or labels.shape[1] != 1:
        raise KDConfigError(f"class-id labels must be (B, 1, D, H, W), got shape {tuple(labels.shape)}")
    ids = labels[:, 0].long()
    if ids.numel() and int(ids.max()) >= num_classes:
        raise KDConfigError(f"label value {int(ids.max())} is outside the {num_classes} classes (0..{num_classes - 1})")
    valid = ids >= 0
    onehot = F.one_hot(ids.clamp(min=0), num_classes).permute(0, 4, 1, 2, 3).to(torch.float32)
    return onehot * valid.unsqueeze(1)
