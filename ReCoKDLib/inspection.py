"""Inspection maps: what a KD loss looks at, computed by the very code that computes the loss.

Every feature-level KD loss returns, with ``return_maps=True``, its maps in ``KDOutput.maps`` keyed
``"<level>/<name>"`` or ``"<level>/<name>/<class>"``, each ``(B, d, h, w)`` at the level's
resolution. For ReCo-KD (:mod:`ReCoKDLib.losses.recokd`):

==============================  ===========================================================
``fg_mask`` / ``bg_mask``       class-balanced region weights ``W_fg``, ``W_bg`` (1/N_c)
``class_mask/<c>``              the weight of class ``c`` alone (0 = background)
``teacher_spatial_attention``   ``A^S_T`` (mean 1); ``student_spatial_attention``: ``A^S_S``
``teacher_affinity``            context-block softmax over voxels (sums to 1); ``student_affinity``
``discrepancy``                 ``mean_c (F~S - FT)^2`` per voxel
==============================  ===========================================================

:func:`compute_maps` runs a :class:`~ReCoKDLib.taps.DistillationPair` and a KD loss once, without
gradients, and :func:`resample_to_image` brings any map onto the input image grid, so the Slicer
overlays and the reports show exactly what the optimiser sees.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn



class InspectionError(ValueError):
    """An inspection map or target grid has an unexpected shape or option."""


RESAMPLE_MODES = ("trilinear", "nearest")


def resample_to_image(volume_map: Tensor, image_shape: Sequence[int], mode: str = "trilinear") -> Tensor:
    """Resize a map ``(d, h, w)``, ``(B, d, h, w)`` or ``(B, 1, d, h, w)`` to ``image_shape`` ``(D, H, W)``.

    Feature levels of a U-Net cover the whole patch at a coarser grid, so the map is stretched
    over the image (``align_corners=False``, the convention of strided convolutions). Use
    ``mode="nearest"`` for masks and labels, ``"trilinear"`` for continuous maps.

    Returns:
        the map with the same leading dimensions and spatial size ``image_shape``, float32.
    """
    if mode not in RESAMPLE_MODES:
        raise InspectionError(f"unknown resampling mode {mode!r}; choose one of {RESAMPLE_MODES}")
    size = tuple(int(s) for s in image_shape)
    if len(size) != 3 or min(size) < 1:
        raise InspectionError(f"image_shape must be three positive sizes (D, H, W), got {tuple(image_shape)}")
    dims = volume_map.dim()
    if dims == 3:
        x = volume_map[None, None]
    elif dims == 4:
        x = volume_map[:, None]
    elif dims == 5 and volume_map.shape[1] == 1:
        x = volume_map
    else:
        raise InspectionError(f"a map must be (d, h, w), (B, d, h, w) or (B, 1, d, h, w), got {tuple(volume_map.shape)}")
    x = x.detach().float()
    if tuple(x.shape[2:]) != size:
        if mode == "nearest":
            x = F.interpolate(x, size=size, mode="nearest-exact")
        else:
            x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    if dims == 3:
        return x[0, 0]
    if dims == 4:
        return x[:, 0]
    return x


def is_mask_map(key: str) -> bool:
    """True for maps holding mask weights (resample those with ``mode="nearest"``)."""
    name = key.split("/")
    return any(part in ("fg_mask", "bg_mask", "class_mask") for part in name)


@torch.no_grad()
def compute_maps(
    pair: nn.Module,
    kd_loss: nn.Module,
    images: Tensor,
    labels: Tensor | None = None,
    num_classes: int | None = None,
    regions: bool = False,
    image_grid: bool = False,
) -> dict[str, Tensor]:
    """The inspection maps of ``kd_loss`` for ``images``: one pass in eval mode, without gradients.

    Args:
        pair: a :class:`~ReCoKDLib.taps.DistillationPair` (teacher, student, adapters).
        kd_loss: any KD loss following the ``KDBatch``/``KDOutput`` contract (or a weighted sum).
        images: ``(B, C_in, D, H, W)``.
        labels: ``(B, 1, D, H, W)`` class ids (or region maps with ``regions``); ``None`` to use
            the teacher's argmax as pseudo-labels for the methods that need labels.
        num_classes: ``K`` including the background (default: the teacher's output channels).
        image_grid: resample every map to the image grid (nearest for masks, trilinear otherwise).

    Returns:
        ``{"<level>/<name>[/<class>]": (B, d, h, w) float32}`` plus ``"loss"`` and every term
        as 0-d tensors under ``"terms/<name>"``. Training modes are restored afterwards.
    """
    if images.dim() != 5:
        raise InspectionError(f"images must be (B, C, D, H, W), got {tuple(images.shape)}")
    modes = [(m, m.training) for m in (pair, kd_loss)]
    pair.eval()
    kd_loss.eval()
    try:
        _, batch = pair(images, labels=labels, num_classes=num_classes, regions=regions)
        if batch.labels is None and batch.teacher_logits is not None:
            from ReCoKDLib.losses.masks import pseudo_labels_from_teacher

            batch.labels = pseudo_labels_from_teacher(batch.teacher_logits, regions=regions)
        out = kd_loss(batch, return_maps=True)
    finally:
        for module, mode in modes:
            module.train(mode)
    maps = {key: value.detach().float() for key, value in out.maps.items()}
    if image_grid:
        shape = images.shape[2:]
        maps = {k: resample_to_image(v, shape, "nearest" if is_mask_map(k) else "trilinear") for k, v in maps.items()}
    maps["loss"] = out.loss.detach()
    maps.update({f"terms/{k}": v.detach() for k, v in out.terms.items()})
    return maps
