"""nnU-Net-like preprocessing that can be undone exactly.

The steps, in nnU-Net v2's order (``DefaultPreprocessor``), after one of ours:

0. **Reorient** to the canonical axis order :data:`CANONICAL_ORIENTATION` (``"LPS"``: +i to the
   patient's left, +j posterior, +k superior) with SimpleITK's ``DICOMOrient``, a pure
   permutation/flip of the voxel axes. Scans of one anatomy stored with different direction
   matrices (the TotalSegmentator scans S1 and S3 are mirrored in x and y against each other)
   then reach the network the same way round; nnU-Net instead assumes a consistent dataset.
1. **Crop to the non-zero region** (:func:`nonzero_bbox`): the bounding box of voxels that are
   non-zero in any channel (nnU-Net fills the mask's holes first, which cannot change the box). CT volumes,
   where air is -1000, are usually not cropped at all; skull-stripped MR volumes shrink a lot.
2. **Normalise** (:func:`normalize_image`) with the scheme of the model card
   (:func:`compute_normalization` makes it from training data):

   * ``{"scheme": "ct", "clip": [lo, hi], "mean": m, "std": s}``: clip to the 0.5 / 99.5
     percentiles of the foreground (label > 0) intensities of the training set, then subtract the
     foreground mean and divide by the foreground standard deviation (nnU-Net's
     ``CTNormalization``);
   * ``{"scheme": "zscore"}``: per volume and channel, ``(x - mean) / std`` with mean and std over
     the non-zero voxels (all voxels when none is zero; ``"nonzero": false`` uses all voxels);
   * ``{"scheme": "none"}``: the intensities as they are, in float32.
3. **Resample** to the target spacing: images with 3rd-order B-splines (linear on request), labels
   with nearest neighbour. The resampled grid covers exactly the field of view of the cropped grid
   (its corners coincide), so its voxel size is the target spacing rounded to a whole number of
   voxels, as in nnU-Net's ``compute_new_shape``. Axes whose spacing already matches (within 1e-3
   relative) are not resampled at all; when all match, nothing is. The two grids share their
   direction matrix, so each output voxel's continuous source index along an axis depends on its
   index along that axis only, and ITK's B-spline and linear weights are products of per-axis
   weights: images are resampled by three per-axis matrix products (:func:`_separable_resample`;
   B-splines: ITK's mirror-boundary prefilter ``inv(B)`` and 4-tap evaluation folded into one dense
   matrix, run by torch; linear: 2 gathered taps). The matrices are built from ITK's own
   interpolation rules (inside test, borders, mirror boundaries), so the result is SimpleITK's
   ``ResampleImageFilter`` output to float32 rounding (~1e-7 of the data range, checked in
   ``Testing/test_resample_separable.py``), about 9x faster for B-splines on a 1 mm head with 2
   threads (``benchmarks/resample_speed.py``). Labels and grids with different directions go to
   SimpleITK. One deliberate difference: B-splines from a 2-voxel axis, where ITK's mirror boundary
   reads outside the image (garbage in SimpleITK), fold that tap back onto the axis.

:class:`PreprocessedCase` keeps what is needed to go back: :func:`restore_to_original` resamples a
label map (nearest) or class probabilities (linear) from the preprocessed grid onto the cropped
part of the (reoriented) input grid, pads the rest and undoes the reorientation, giving an array
of exactly the original shape whose voxels are those of the original geometry.

Axis order: arrays are ``(D, H, W)`` = ``(z, y, x)`` or channel-first ``(C, D, H, W)``; the target
spacing is given in the same ``(D, H, W)`` order (mm), while :class:`~ReCoKDLib.data.io.Geometry`
stores spacing/origin in SimpleITK's ``(x, y, z)`` order.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ReCoKDLib.data.boxes import Box, nonzero_bbox
from ReCoKDLib.data.io import Geometry, InputWarning, check_finite, check_same_grid, require_3d

__all__ = [
    "PreprocessingError",
    "ImplausibleGeometryWarning",
    "PLAUSIBLE_SPACING_MM",
    "MIN_SLICES",
    "geometry_warnings",
    "PreprocessedCase",
    "NORMALIZATION_SCHEMES",
    "compute_normalization",
    "normalize_image",
    "nonzero_bbox",
    "check_label_values",
    "resampled_shape",
    "preprocess_case",
    "restore_to_original",
    "as_channels",
    "reorient",
    "CANONICAL_ORIENTATION",
]

NORMALIZATION_SCHEMES = ("ct", "zscore", "none")

#: per-case cap of foreground voxels sampled for the CT statistics (nnU-Net samples 10 000)
_FOREGROUND_SAMPLES_PER_CASE = 10_000


#: the voxel-axis orientation every case is brought to before cropping and resampling
CANONICAL_ORIENTATION = "LPS"

#: bumped whenever preprocessing changes its output; part of the training cache key
#: (2: reorientation to CANONICAL_ORIENTATION)
PREPROCESSING_VERSION = 2


class PreprocessingError(ValueError):
    """Input that preprocessing cannot handle: bad normalisation, labels or target spacing."""


class ImplausibleGeometryWarning(InputWarning):
    """A voxel spacing or image extent that no medical scan has (a wrong header, or 2-D data)."""


#: voxel spacings (mm) outside this range are taken for a wrong header (units in m or um, a 0 read as 0.001)
PLAUSIBLE_SPACING_MM = (0.05, 20.0)
#: fewer voxels than this along an axis: the image is (nearly) 2-D for a 3-D network
MIN_SLICES = 4
_AXES = ("z", "y", "x")


def geometry_warnings(shape: Sequence[int], spacing: Sequence[float],
                      target_spacing: Sequence[float] | None = None) -> list[str]:
    """Sentences about an implausible geometry and what preprocessing will make of it (empty when plausible).

    Args:
        shape: ``(D, H, W)`` of the image; spacing: its ``(D, H, W)`` voxel size in mm;
        target_spacing: the model's ``(D, H, W)`` spacing (then the message gives the resampled shape).
    """
    shape, spacing = tuple(int(n) for n in shape), tuple(float(s) for s in spacing)
    new = resampled_shape(shape, spacing, target_spacing) if target_spacing is not None else shape
    fmt = lambda values: "(" + ", ".join(f"{v:g}" for v in values) + ")"  # noqa: E731
    then = (f"; at the model's spacing {fmt(target_spacing)} mm the (D, H, W) grid {shape} becomes {new} "
            f"({np.prod(new, dtype=float):.3g} voxels)") if target_spacing is not None else ""
    messages = []
    lo, hi = PLAUSIBLE_SPACING_MM
    odd = [f"{axis} {s:g} mm" for axis, s in zip(_AXES, spacing) if not lo <= s <= hi]
    if odd:
        messages.append(f"voxel spacing {', '.join(odd)} is outside the {lo:g}-{hi:g} mm of medical scans: the "
                        f"header is probably wrong (units?){then}; check the spacing before trusting the result")
    thin = [f"{n} voxel(s) along {axis}" for axis, n in zip(_AXES, shape) if n < MIN_SLICES]
    if thin:
        messages.append(f"the image has only {', '.join(thin)} (shape {shape}): it is 2-D data, and a 3-D model sees "
                        f"it as a thin slab padded to its patch{then if not odd else ''}; expect a poor segmentation")
    return messages


# --------------------------------------------------------------------------------------------
# Normalisation


def as_channels(image: np.ndarray, name: str = "image") -> np.ndarray:
    """``(D, H, W)`` -> ``(1, D, H, W)``; ``(C, D, H, W)`` unchanged; anything else is an error."""
    image = np.asarray(image)
    require_3d(image, name, allow_channels=True)
    return image[None] if image.ndim == 3 else image


def compute_normalization(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray] | None = None,
    scheme: str = "ct",
    seed: int = 0,
) -> dict[str, Any]:
    """Normalisation parameters for a model card (``ModelCard.normalization``).

    Args:
        images: training volumes ``(D, H, W)`` (or ``(C, D, H, W)``; CT statistics use channel 0).
        labels: their label maps ``(D, H, W)``, same shapes; needed for ``"ct"``.
        scheme: ``"ct"`` (dataset-wide foreground percentiles), ``"zscore"`` (per volume) or ``"none"``.
        seed: seed of the foreground voxel subsampling (at most 10 000 voxels per case).

    Returns:
        ``{"scheme": "ct", "clip": [p0.5, p99.5], "mean": m, "std": s}``, ``{"scheme": "zscore"}``
        or ``{"scheme": "none"}``.

    Raises:
        PreprocessingError: unknown scheme, missing/mismatched labels, or no foreground voxel at all.
    """
    if scheme not in NORMALIZATION_SCHEMES:
        raise PreprocessingError(f"unknown normalization scheme {scheme!r}; choose one of {NORMALIZATION_SCHEMES}")
    if scheme != "ct":
        return {"scheme": scheme}
    if labels is None or len(labels) != len(images) or not images:
        raise PreprocessingError(
            "CT normalisation needs one label map per image (foreground intensities); got "
            f"{len(images)} images and {0 if labels is None else len(labels)} labels")
    rng = np.random.default_rng(seed)
    samples = []
    for n, (image, label) in enumerate(zip(images, labels)):
        image = as_channels(image, f"image {n}")[0]
        label = np.asarray(label)
        if label.shape != image.shape:
            raise PreprocessingError(f"image {n} has shape {image.shape} but its label {label.shape}")
        values = image[label > 0]
        if values.size > _FOREGROUND_SAMPLES_PER_CASE:
            values = rng.choice(values, _FOREGROUND_SAMPLES_PER_CASE, replace=False)
        samples.append(values.astype(np.float64))
    foreground = np.concatenate(samples)
    if foreground.size == 0:
        raise PreprocessingError("no foreground voxel (label > 0) in any case: cannot compute CT normalisation")
    lo, hi = np.percentile(foreground, [0.5, 99.5])
    return {
        "scheme": "ct",
        "clip": [float(lo), float(hi)],
        "mean": float(foreground.mean()),
        "std": float(max(foreground.std(), 1e-8)),
    }


def _mean_std(channel: np.ndarray, mask: np.ndarray | None, slab_voxels: int = 1 << 20) -> tuple[float, float]:
    """Mean and standard deviation of ``channel`` ``(D, H, W)`` (where ``mask``, if given), in
    float64, two passes over slabs of about ``slab_voxels``: no full-size temporary (a masked copy
    and numpy's ``x - mean`` for ``std`` were 85 MB of temporaries on a 1 mm head)."""
    step = max(1, slab_voxels // max(1, channel[0].size))
    slabs = [slice(z, z + step) for z in range(0, channel.shape[0], step)]

    def values(slab: slice) -> np.ndarray:
        return channel[slab] if mask is None else channel[slab][mask[slab]]

    count = sum(values(s).size for s in slabs) if mask is not None else channel.size
    mean = sum(float(values(s).sum(dtype=np.float64)) for s in slabs) / count
    squares = 0.0
    for slab in slabs:
        centred = values(slab).astype(np.float64).ravel() - mean
        squares += float(np.dot(centred, centred))
    return mean, float(np.sqrt(squares / count))


def normalize_image(image: np.ndarray, normalization: dict[str, Any]) -> np.ndarray:
    """Normalise a ``(C, D, H, W)`` image with a card's normalisation dict; returns float32."""
    scheme = normalization.get("scheme") if isinstance(normalization, dict) else None
    image = as_channels(image).astype(np.float32, copy=True)
    if scheme == "none":
        return image
    if scheme == "ct":
        try:
            lo, hi = (float(v) for v in normalization["clip"])
            mean, std = float(normalization["mean"]), float(normalization["std"])
        except (KeyError, TypeError, ValueError):
            raise PreprocessingError(
                f"CT normalisation needs 'clip' [lo, hi], 'mean' and 'std'; got {normalization}") from None
        np.clip(image, lo, hi, out=image)
        image -= mean
        image /= max(std, 1e-8)
        return image
    if scheme == "zscore":
        nonzero_only = bool(normalization.get("nonzero", True))  # False: over all voxels (HD-BET)
        for channel in image:
            mask = channel != 0 if nonzero_only else None
            if mask is not None and (mask.all() or not mask.any()):
                mask = None  # every voxel counts (no zero, or nothing else)
            mean, std = _mean_std(channel, mask)
            channel -= mean
            channel /= max(std, 1e-8)
        return image
    raise PreprocessingError(f"unknown normalization {normalization!r}; 'scheme' must be one of {NORMALIZATION_SCHEMES}")


# --------------------------------------------------------------------------------------------
# Cropping and label checks


def check_label_values(label: np.ndarray, num_classes: int | None, name: str = "label", allow_empty: bool = True,
                       allow_ignored: bool = False) -> None:
    """Raise :class:`PreprocessingError` if ``label`` holds non-integer values or values outside
    ``0..num_classes-1`` (not checked when ``num_classes`` is ``None``), or, with
    ``allow_empty=False``, no foreground. ``allow_ignored`` accepts -1 (voxels of an nnU-Net ignore
    label, see ``nnunet.labels.mark_ignored``)."""
    label = np.asarray(label)
    if not allow_empty and not np.any(label > 0):
        raise PreprocessingError(
            f"{name}: the label map is empty (background only); a training case needs labelled foreground: "
            f"remove the case or fix its label file")
    if num_classes is None:
        return
    values = np.unique(label)
    if not np.issubdtype(values.dtype, np.integer) and not np.all(np.equal(np.mod(values, 1), 0)):
        raise PreprocessingError(
            f"{name}: the label map holds non-integer values {values[np.mod(values, 1) != 0][:5].tolist()}; give a "
            f"label map of integer class ids (not probabilities or an interpolated label)")
    bad = values[((values < 0) & ~(allow_ignored & (values == -1))) | (values >= num_classes)]
    if bad.size:
        raise PreprocessingError(
            f"{name}: label values {bad[:10].astype(int).tolist()} are outside the {num_classes} classes "
            f"(0..{num_classes - 1}); the label map must use the teacher's class ids (check the class list / dataset.json)")


# --------------------------------------------------------------------------------------------
# Resampling


def _spacing_dhw(geometry: Geometry) -> tuple[float, float, float]:
    return tuple(reversed(geometry.spacing))  # type: ignore[return-value]


def _same_spacing(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-3 * max(a, b)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple[int, int, int]:
    """nnU-Net's new shape: ``round(shape * spacing / target_spacing)`` per axis, at least 1;
    unchanged where the spacings already agree. All in ``(D, H, W)`` order."""
    return tuple(  # type: ignore[return-value]
        int(n) if _same_spacing(s, t) else max(1, int(round(n * s / t)))
        for n, s, t in zip(shape, spacing, target_spacing)
    )


def _subgrid(geometry: Geometry, start_dhw: Sequence[int]) -> Geometry:
    """Geometry of the grid that starts at voxel ``start_dhw`` of ``geometry`` (same spacing)."""
    origin = geometry.index_to_physical(np.asarray(list(reversed(start_dhw)), float))[0]
    return Geometry(geometry.spacing, tuple(origin), geometry.direction)


def _resampled_geometry(geometry: Geometry, shape: Sequence[int], new_shape: Sequence[int]) -> Geometry:
    """The grid of ``new_shape`` voxels covering the same field of view as ``geometry``/``shape``."""
    old = np.asarray(geometry.spacing)
    new = old * np.asarray(list(reversed(shape)), float) / np.asarray(list(reversed(new_shape)), float)
    origin = np.asarray(geometry.origin) + geometry.direction_matrix @ ((new - old) / 2.0)
    return Geometry(tuple(new), tuple(origin), geometry.direction)


# The separable path (:func:`_separable_resample`) reproduces SimpleITK's ResampleImageFilter
# (SimpleITK 2.5 / ITK 5.4) as read in ITK at commit fee22c1e22464dea46b49d19b89b9966fa94dc2c:
# * Modules/Filtering/ImageGrid/include/itkResampleImageFilter.hxx (LinearThreadedGenerateData) with
#   ImageFunction::IsInsideBuffer (Modules/Core/ImageFunction/include/itkImageFunction.h/.hxx): an
#   output voxel is interpolated when every continuous index x lies in [-0.5, n - 0.5), else it gets
#   the default value 0;
# * Modules/Core/ImageFunction/include/itkLinearInterpolateImageFunction.h: per axis
#   base = max(floor(x), 0), d = x - base; the value at base when d <= 0 or base + 1 > n - 1, else
#   weights (1 - d, d) on (base, base + 1);
# * Modules/Core/ImageFunction/include/itkBSplineDecompositionImageFilter.hxx: cubic coefficients with
#   mirror boundaries, i.e. c = inv(B) v with B tridiagonal, rows (1/6, 4/6, 1/6) whose index -1 folds
#   onto 1 and n onto n - 2 (ITK runs the recursive filter with pole sqrt(3) - 2; its causal start,
#   truncated at 1e-10, changes c by ~1e-10); an axis of 1 voxel keeps its values;
# * Modules/Core/ImageFunction/include/itkBSplineInterpolateImageFunction.hxx: taps
#   floor(float32(x)) - 1 .. + 2, weights w3 = w^3/6, w0 = 1/6 + w(w - 1)/2 - w3, w2 = w + w0 - 2 w3,
#   w1 = 1 - w0 - w2 - w3 (w = x - tap 1), mirror boundary k < 0 -> -k, then k > n - 1 -> 2(n - 1) - k
#   (all taps 0 when n == 1). When n == 2 the last tap can land on -1, outside the line, and ITK reads
#   a neighbouring line (garbage): :func:`_mirror` folds it back onto the axis instead.
# With one direction for both grids each output voxel's continuous index along an axis depends only on
# its own index along that axis, and the 3-D weights are products of these per-axis weights: the
# resampling is three matrix products, one per axis, and the SimpleITK result up to float32 rounding.

#: use the separable path where it applies (``False``: always SimpleITK, e.g. as a reference)
SEPARABLE_RESAMPLING = True
#: largest shift (voxels) of a continuous source index that treating the grid pair as separable may cause
_SEPARABLE_TOLERANCE = 1e-6


def _axis_maps(geometry: Geometry, ref: Geometry, ref_shape: Sequence[int]) -> list[tuple[float, float]] | None:
    """Per array axis ``(D, H, W)``: ``(offset, step)`` with source continuous index = offset + step * target
    index, or ``None`` when the grids do not share their direction (the map is then not separable).

    The continuous source index of target index ``i'`` (``(x, y, z)`` order) is
    ``inv(D S) (o' - o) + inv(D S) D' S' i'``; the off-diagonal part of ``inv(D S) D' S'`` must move no
    index by more than ``_SEPARABLE_TOLERANCE`` over the target grid.
    """
    if not np.allclose(geometry.direction_matrix, ref.direction_matrix, rtol=0.0, atol=1e-6):
        return None
    to_index = np.linalg.inv(geometry.direction_matrix @ np.diag(geometry.spacing))
    step = to_index @ ref.direction_matrix @ np.diag(ref.spacing)  # (3, 3), (x, y, z)
    offset = to_index @ (np.asarray(ref.origin) - np.asarray(geometry.origin))
    last = np.asarray(list(reversed(tuple(ref_shape))), float) - 1.0
    if np.any(np.abs(step - np.diag(np.diag(step))) @ last > _SEPARABLE_TOLERANCE):
        return None
    return [(float(offset[k]), float(step[k, k])) for k in (2, 1, 0)]


def _mirror(k: np.ndarray, n: int) -> np.ndarray:
    """ITK's B-spline mirror boundary of integer indices ``k`` on an axis of ``n`` voxels, folded until
    the index lies on the axis. ITK reflects once (``k < 0 -> -k``, then ``k > n - 1 -> 2(n - 1) - k``),
    which is the same wherever that lands on the axis; on a 2-voxel axis it can land on -1, where
    SimpleITK reads outside the image (values like 7e8 that change from call to call)."""
    if n == 1:
        return np.zeros_like(k)
    period = 2 * (n - 1)
    k = np.abs(k) % period
    return np.where(k > n - 1, period - k, k)


def _bspline_coefficients(weights: np.ndarray) -> np.ndarray:
    """``weights @ inv(B)`` for the ``(n, n)`` cubic B-spline prefilter ``B`` with mirror boundaries.

    ``weights``: ``(m, n)`` evaluation weights on coefficients; returns ``(m, n)`` weights on samples.
    """
    from scipy.linalg import solve_banded

    n = weights.shape[1]
    if n == 1:
        return weights
    bands = np.zeros((3, n))  # B^T in solve_banded's layout: super-, main and sub-diagonal
    bands[0, 1:], bands[1], bands[2, :-1] = 1 / 6, 4 / 6, 1 / 6
    bands[2, 0] = bands[0, n - 1] = 2 / 6  # B[0, 1] and B[n-1, n-2]: the folded neighbour counts twice
    return solve_banded((1, 1), bands, weights.T).T


def _axis_matrix(n: int, m: int, offset: float, step: float, order: str) -> np.ndarray:
    """``(m, n)`` float64 matrix resampling one axis of ``n`` source voxels onto ``m`` target voxels
    (target voxel ``i`` at source continuous index ``offset + step * i``), as ITK does; rows of target
    voxels outside ``[-0.5, n - 0.5)`` are 0."""
    x = offset + step * np.arange(m)
    rows = np.arange(m)[:, None]
    matrix = np.zeros((m, n))
    if order == "linear":
        base = np.maximum(np.floor(x), 0.0)
        d = np.where((x - base > 0) & (base + 1 <= n - 1), x - base, 0.0)
        taps, weights = np.stack([base, base + 1], 1), np.stack([1 - d, d], 1)
    else:
        first = np.floor(x.astype(np.float32)).astype(np.int64) - 1
        w = x - (first + 1)
        w3 = w ** 3 / 6
        w0 = 1 / 6 + 0.5 * w * (w - 1) - w3
        w2 = w + w0 - 2 * w3
        taps, weights = _mirror(first[:, None] + np.arange(4), n), np.stack([w0, 1 - w0 - w2 - w3, w2, w3], 1)
    np.add.at(matrix, (rows, np.clip(taps, 0, n - 1).astype(np.int64)), weights)
    if order == "bspline":
        matrix = _bspline_coefficients(matrix)
    matrix[~((x >= -0.5) & (x < n - 0.5))] = 0.0
    return matrix


def _apply_axis(x: np.ndarray, matrix: np.ndarray, axis: int) -> np.ndarray:
    """``matrix`` ``(m, n)`` applied along ``axis`` of the float32 ``x`` (``n`` voxels there, ``m`` after).

    A matrix with at most two neighbouring non-zeros per row (linear interpolation) is applied by
    gathering those two slices; a dense one (B-splines) by torch's matmul, on all of torch's threads.
    """
    m, n = matrix.shape
    rows, first = np.arange(m), np.argmax(matrix != 0, axis=1)  # first non-zero column (0 for a zero row)
    second = np.minimum(first + 1, n - 1)
    w0, w1 = matrix[rows, first], np.where(second > first, matrix[rows, second], 0.0)
    if np.count_nonzero(matrix) == np.count_nonzero(w0) + np.count_nonzero(w1):  # the two taps hold them all
        shape = [1, 1, 1]
        shape[axis] = m
        return (np.take(x, first, axis) * w0.astype(np.float32).reshape(shape)
                + np.take(x, second, axis) * w1.astype(np.float32).reshape(shape))
    import torch

    a, t = torch.from_numpy(matrix.astype(np.float32)), torch.from_numpy(np.ascontiguousarray(x))
    if axis == 0:
        return (a @ t.reshape(n, -1)).reshape((m,) + tuple(t.shape[1:])).numpy()
    return (torch.matmul(a, t) if axis == 1 else t @ a.T).numpy()


def _separable_resample(array: np.ndarray, maps: list[tuple[float, float]], ref_shape: Sequence[int],
                        order: str) -> np.ndarray:
    """``(D, H, W)`` -> ``ref_shape`` float32 with one :func:`_axis_matrix` per axis (identity where the
    grids coincide), the axes taken in the order that costs the fewest multiply-adds."""
    from itertools import permutations

    x = np.asarray(array, np.float32)
    todo = {}
    for axis, ((offset, step), n, m) in enumerate(zip(maps, x.shape, ref_shape)):
        if not (n == m and abs(offset) + abs(step - 1.0) * (n - 1) <= _SEPARABLE_TOLERANCE):  # else identity
            todo[axis] = _axis_matrix(n, int(m), offset, step, order)

    def cost(axes: Sequence[int]) -> float:
        shape, total = list(x.shape), 0.0
        for axis in axes:
            taps = 2 if order == "linear" else shape[axis]  # gathered, or a dense matmul
            total += float(np.prod(shape)) / shape[axis] * todo[axis].shape[0] * taps
            shape[axis] = todo[axis].shape[0]
        return total

    for axis in min(permutations(todo), key=cost, default=()):
        x = _apply_axis(x, todo[axis], axis)
    return np.ascontiguousarray(x, dtype=np.float32)


def _resample(array: np.ndarray, geometry: Geometry, ref: Geometry, ref_shape: Sequence[int], order: str) -> np.ndarray:
    """Resample ``(D, H, W)`` ``array`` from ``geometry`` onto ``ref``/``ref_shape`` (world coordinates).

    ``order``: ``"nearest"`` (dtype kept), ``"linear"`` or ``"bspline"`` (float32). ``"linear"`` and
    ``"bspline"`` between grids that share their direction are separable and take
    :func:`_separable_resample` (SimpleITK's result to float32 rounding, much faster for B-splines); the
    rest goes to SimpleITK's ``ResampleImageFilter``.
    """
    import SimpleITK as sitk

    from ReCoKDLib.data.io import to_sitk

    if SEPARABLE_RESAMPLING and order in ("linear", "bspline") and np.ndim(array) == 3:
        maps = _axis_maps(geometry, ref, ref_shape)
        if maps is not None:
            return _separable_resample(array, maps, ref_shape, order)
    interp = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}[order]
    source = to_sitk(array if order == "nearest" else np.asarray(array, np.float32), geometry)
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in reversed(tuple(ref_shape))])
    f.SetOutputSpacing(ref.spacing)
    f.SetOutputOrigin(ref.origin)
    f.SetOutputDirection(ref.direction)
    f.SetInterpolator(interp)
    f.SetDefaultPixelValue(0.0)
    f.SetOutputPixelType(source.GetPixelID())
    return sitk.GetArrayFromImage(f.Execute(source))


def reorient(array: np.ndarray, geometry: Geometry, orientation: str) -> tuple[np.ndarray, Geometry]:
    """Permute/flip the voxel axes of ``array`` ``(D, H, W)`` or ``(C, D, H, W)`` to ``orientation``.

    Uses SimpleITK's ``DICOMOrient`` (closest axes for oblique directions); the voxels and their
    world positions are unchanged, only their order. Returns the array and its new geometry;
    ``reorient(*reorient(a, g, "LPS"), g.orientation_code())`` gives back ``(a, g)`` exactly.
    """
    import SimpleITK as sitk

    from ReCoKDLib.data.io import from_sitk, to_sitk

    if geometry.orientation_code() == orientation:
        return array, geometry
    channels = array if array.ndim == 4 else array[None]
    out, new_geometry = [], geometry
    for channel in channels:
        oriented, new_geometry = from_sitk(sitk.DICOMOrient(to_sitk(np.ascontiguousarray(channel), geometry), orientation))
        out.append(oriented)
    stacked = np.stack(out)
    return (stacked if array.ndim == 4 else stacked[0]), new_geometry


# --------------------------------------------------------------------------------------------
# The case


@dataclass
class PreprocessedCase:
    """A case on the network's grid, with what is needed to go back to the original grid.

    Attributes:
        image: ``(C, D', H', W')`` float32, normalised, on the preprocessed grid.
        label: ``(D', H', W')`` label map on the same grid (or ``None``).
        geometry: world placement of the preprocessed grid (its spacing is the effective one).
        original_shape: ``(D, H, W)`` of the input.
        original_geometry: geometry of the input.
        crop_box: ``((d0, d1), (h0, h1), (w0, w1))`` half-open box of the reoriented input that
            was kept.
        oriented_shape / oriented_geometry: the input's grid after reorientation to
            :data:`CANONICAL_ORIENTATION` (equal to the input's when it already was).
        resampled: whether any axis was resampled (``False``: the grid is the cropped input grid).
    """

    image: np.ndarray
    label: np.ndarray | None
    geometry: Geometry
    original_shape: tuple[int, int, int]
    original_geometry: Geometry
    crop_box: Box
    resampled: bool
    info: dict[str, Any] = field(default_factory=dict)
    oriented_shape: tuple[int, int, int] | None = None
    oriented_geometry: Geometry | None = None

    def __post_init__(self) -> None:
        if self.oriented_shape is None:
            self.oriented_shape = tuple(self.original_shape)  # type: ignore[assignment]
        if self.oriented_geometry is None:
            self.oriented_geometry = self.original_geometry

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(D', H', W')`` of the preprocessed grid."""
        return tuple(self.image.shape[1:])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Effective voxel spacing of the preprocessed grid, ``(D, H, W)`` order, mm."""
        return _spacing_dhw(self.geometry)

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in self.crop_box)  # type: ignore[return-value]

    @property
    def crop_geometry(self) -> Geometry:
        """Geometry of the cropped part of the (reoriented) input grid."""
        return _subgrid(self.oriented_geometry, [a for a, _ in self.crop_box])


def preprocess_case(
    image: np.ndarray,
    geometry: Geometry,
    target_spacing: Sequence[float] | None,
    normalization: dict[str, Any],
    label: np.ndarray | None = None,
    crop_nonzero: bool = True,
    *,
    label_geometry: Geometry | None = None,
    num_classes: int | None = None,
    image_order: str = "bspline",
    allow_empty_label: bool = True,
    orientation: str | None = CANONICAL_ORIENTATION,
) -> PreprocessedCase:
    """Crop, normalise and resample one case (nnU-Net order); see the module docstring.

    Args:
        image: ``(D, H, W)`` or ``(C, D, H, W)``.
        geometry: the image's geometry.
        target_spacing: ``(D, H, W)`` mm (the model card's ``spacing``); ``None`` keeps the grid.
        normalization: the model card's normalisation dict.
        label: optional ``(D, H, W)`` label map on the image grid.
        crop_nonzero: crop to the non-zero bounding box first.
        label_geometry: the label's own geometry, checked against the image's when given.
        num_classes: when given, label values must lie in ``0..num_classes-1``.
        image_order: image interpolation, ``"bspline"`` (3rd order, default) or ``"linear"``.
        allow_empty_label: ``False`` refuses a label without foreground (training cases).
        orientation: the voxel-axis orientation to bring the case to first (``None``: keep).

    Raises:
        ImageDimensionError: 2D/4D input where 3D is expected. GeometryError: label grid differs.
        PreprocessingError: bad spacing, normalisation or label values.
    """
    image = check_finite(as_channels(image), "image")  # NaN/inf would spread through normalisation
    spatial = tuple(image.shape[1:])
    if label is not None:
        label = np.asarray(label)
        require_3d(label, "label")
        if label_geometry is not None:
            check_same_grid(geometry, label_geometry, image.shape, label.shape)
        elif label.shape != spatial:
            raise PreprocessingError(
                f"label shape {label.shape} differs from image shape (D, H, W) {spatial}; "
                f"they must share one voxel grid")
        check_label_values(label, num_classes, allow_empty=allow_empty_label)
    if image_order not in ("bspline", "linear"):
        raise PreprocessingError(f"image_order must be 'bspline' or 'linear'; got {image_order!r}")
    input_geometry = geometry
    if orientation is not None:
        image, geometry = reorient(image, input_geometry, orientation)
        if label is not None:
            label = reorient(label, input_geometry, orientation)[0]
    oriented_shape = tuple(image.shape[1:])

    if target_spacing is None:
        target = _spacing_dhw(geometry)
    else:
        target = tuple(float(s) for s in target_spacing)
        if len(target) != 3 or not all(np.isfinite(target)) or min(target) <= 0:
            raise PreprocessingError(f"target spacing must be 3 positive numbers in (D, H, W) order; got {target_spacing}")
    for message in geometry_warnings(oriented_shape, _spacing_dhw(geometry), target if target_spacing is not None else None):
        warnings.warn(ImplausibleGeometryWarning(message), stacklevel=2)

    box: Box = nonzero_bbox(image) if crop_nonzero else tuple((0, s) for s in oriented_shape)  # type: ignore[assignment]
    region = tuple(slice(a, b) for a, b in box)
    cropped = image[(slice(None),) + region]
    cropped_label = label[region] if label is not None else None
    crop_geometry = _subgrid(geometry, [a for a, _ in box])

    normalized = normalize_image(cropped, normalization)

    crop_shape = tuple(cropped.shape[1:])
    new_shape = resampled_shape(crop_shape, _spacing_dhw(geometry), target)
    resampled = new_shape != crop_shape
    if resampled:
        new_geometry = _resampled_geometry(crop_geometry, crop_shape, new_shape)
        normalized = np.stack([_resample(c, crop_geometry, new_geometry, new_shape, image_order) for c in normalized])
        if cropped_label is not None:
            cropped_label = _resample(cropped_label, crop_geometry, new_geometry, new_shape, "nearest")
    else:
        new_geometry = crop_geometry
    return PreprocessedCase(
        image=np.ascontiguousarray(normalized, dtype=np.float32),
        label=None if cropped_label is None else np.ascontiguousarray(cropped_label),
        geometry=new_geometry,
        original_shape=spatial,  # type: ignore[arg-type]
        original_geometry=input_geometry,
        crop_box=box,
        resampled=resampled,
        info={"target_spacing": list(target), "normalization": dict(normalization),
              "input_orientation": input_geometry.orientation_code(), "orientation": geometry.orientation_code()},
        oriented_shape=oriented_shape,  # type: ignore[arg-type]
        oriented_geometry=geometry,
    )


def restore_to_original(array: np.ndarray, preprocessed: PreprocessedCase, fill: str = "background") -> np.ndarray:
    """Bring an array from the preprocessed grid back onto the exact original grid.

    Args:
        array: ``(D', H', W')`` label map (nearest-neighbour resampling, dtype kept) or
            ``(K, D', H', W')`` class probabilities (linear resampling per channel, float32).
        preprocessed: the :class:`PreprocessedCase` it was computed on.
        fill: what goes outside the crop box: ``"background"`` (label 0; probability 1 for class
            0 and 0 for the others) or ``"zero"`` (0 in every channel).

    Returns:
        ``(D, H, W)`` or ``(K, D, H, W)`` with ``(D, H, W) = preprocessed.original_shape``.
    """
    array = np.asarray(array)
    if array.ndim not in (3, 4) or tuple(array.shape[-3:]) != preprocessed.shape:
        raise PreprocessingError(
            f"expected an array of shape (D', H', W') or (K, D', H', W') with (D', H', W') = {preprocessed.shape}; "
            f"got {array.shape}")
    if fill not in ("background", "zero"):
        raise PreprocessingError(f"fill must be 'background' or 'zero'; got {fill!r}")
    channels = array if array.ndim == 4 else array[None]
    crop_shape = preprocessed.crop_shape
    if preprocessed.resampled:
        order = "nearest" if array.ndim == 3 else "linear"
        channels = np.stack([
            _resample(c, preprocessed.geometry, preprocessed.crop_geometry, crop_shape, order) for c in channels
        ])
    out = np.zeros((channels.shape[0],) + tuple(preprocessed.oriented_shape), dtype=channels.dtype)
    if array.ndim == 4 and fill == "background":
        out[0] = 1
    out[(slice(None),) + tuple(slice(a, b) for a, b in preprocessed.crop_box)] = channels
    if preprocessed.oriented_geometry != preprocessed.original_geometry:
        out = reorient(out, preprocessed.oriented_geometry, preprocessed.original_geometry.orientation_code())[0]
    if tuple(out.shape[1:]) != tuple(preprocessed.original_shape):
        raise PreprocessingError(f"restored shape {out.shape[1:]} != original {preprocessed.original_shape}")
    return out if array.ndim == 4 else out[0]
