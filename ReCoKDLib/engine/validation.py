"""Validation: mean Dice per class (or per nnU-Net region) over held-out cases, sliding window."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ReCoKDLib.data.sampling import CaseSet
from ReCoKDLib.engine.parts import _autocast


def _sliding_window_logits(network: nn.Module, image: Tensor, patch_size: Sequence[int], overlap: float,
                           device: torch.device, dtype: torch.dtype | None) -> Tensor:
    """``(C, D, H, W)`` -> ``(K, D, H, W)`` logits on CPU; through ``ReCoKDLib.infer`` when present."""
    try:
        from ReCoKDLib.infer import predict_logits
    except ImportError:
        predict_logits = None
    if predict_logits is not None:
        return predict_logits(network, image, patch_size, overlap=overlap, device=device,
                              amp=dtype is not None).float().cpu()
    from monai.inferers import sliding_window_inference

    with torch.no_grad(), _autocast(device, dtype):
        out = sliding_window_inference(image[None].to(device), tuple(patch_size), 1, network,
                                       overlap=overlap, mode="gaussian")
    return out[0].float().cpu()


def dice_per_class(prediction: np.ndarray, label: np.ndarray, num_classes: int) -> list[float]:
    """Dice of classes ``1..K-1`` between two ``(D, H, W)`` id maps; NaN where both are empty.
    Voxels whose label is negative (nnU-Net's ignore label, read as -1) count nowhere."""
    scores = []
    valid = np.asarray(label) >= 0
    for c in range(1, num_classes):
        p, t = (prediction == c) & valid, label == c
        denom = int(p.sum()) + int(t.sum())
        scores.append(float("nan") if denom == 0 else 2.0 * int((p & t).sum()) / denom)
    return scores


def validate(network: nn.Module, val_set: CaseSet, patch_size: Sequence[int], device: torch.device,
             dtype: torch.dtype | None, overlap: float = 0.5) -> dict[str, Any]:
    """Mean Dice per class over the held-out cases (sliding window, Gaussian weighting).

    Ignored voxels (label -1) count nowhere. With nnU-Net region-based labels
    (``val_set.label_spec.has_regions``) the Dice is per region (``sigmoid > 0.5`` against the
    region's label values), keyed by the region names, as nnU-Net validates region models.
    """
    was_training = network.training
    network.eval()
    per_case = []
    spec = getattr(val_set, "label_spec", None)
    regions = spec.regions if spec is not None and spec.has_regions else None
    try:
        for case in val_set.cases:
            image = torch.from_numpy(np.array(case.image, dtype=np.float32))  # a copy: cases may be read-only memory maps
            logits = _sliding_window_logits(network, image, patch_size, overlap, device, dtype)
            label = np.asarray(case.label)[0]
            if regions is not None:
                from ReCoKDLib.nnunet.labels import region_dice

                per_case.append(region_dice((logits > 0).numpy(), label, regions))
            else:
                # max().indices: the argmax (first maximal index), 10x faster over the channel axis on the CPU
                per_case.append(dice_per_class(logits.max(0).indices.numpy(), label, val_set.num_classes))
    finally:
        network.train(was_training)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of classes absent everywhere
        per_class = np.nanmean(np.asarray(per_case, dtype=float), axis=0)
        mean = float(np.nanmean(per_class)) if np.any(np.isfinite(per_class)) else 0.0
    names = spec.head_names if regions is not None else val_set.class_names[1:]
    return {"mean_dice": mean, "dice": {n: (None if not np.isfinite(v) else float(v)) for n, v in zip(names, per_class)},
            "cases": len(per_case)}
