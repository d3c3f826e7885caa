"""Bounding boxes of array regions: numpy only, below every other module (preprocessing crops to
the box, post-processing labels components inside it)."""

from __future__ import annotations

import numpy as np

__all__ = ["Box", "nonzero_bbox"]

#: half-open ``((d0, d1), (h0, h1), (w0, w1))``
Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def nonzero_bbox(image: np.ndarray) -> Box:
    """Bounding box ``((d0, d1), (h0, h1), (w0, w1))`` (half-open) of the non-zero region of a
    ``(C, D, H, W)`` or ``(D, H, W)`` image (any channel non-zero); the whole volume when it is all zero.

    nnU-Net takes the box of the mask with its holes filled (``binary_fill_holes``); filling holes
    cannot move the box (a zero voxel outside it reaches the border in a straight line outside it,
    so it is not a hole), so the box is read from the mask's projections on each axis: the same
    box, without the fill's two passes over the volume (about 0.2 s of a 2 s head segmentation).
    """
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise ValueError(f"nonzero_bbox takes a (D, H, W) or (C, D, H, W) array; got shape {image.shape}")
    mask = image != 0 if image.ndim == 3 else np.any(image != 0, axis=0)
    box = []
    for axis in range(3):
        present = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
        if present.size == 0:
            return tuple((0, s) for s in mask.shape)  # type: ignore[return-value]
        box.append((int(present[0]), int(present[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]
