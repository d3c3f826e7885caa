"""nnU-Net v2's preprocessing and export, reimplemented on numpy/scipy for exact parity.

Forward (``DefaultPreprocessor.run_case_npy``), for an image ``(C, Z, Y, X)`` as SimpleITK reads it
and its spacing ``(z, y, x)``:

1. **transpose** the spatial axes by ``plans["transpose_forward"]`` (and the spacing with them);
2. **crop to non-zero**: the bounding box of voxels non-zero in any channel, holes filled;
3. **normalise** each channel by its scheme (``CTNormalization``: clip to the foreground 0.5/99.5
   percentiles of the dataset fingerprint, subtract its mean, divide by its std;
   ``ZScoreNormalization``: per image, over the non-zero mask when ``use_mask_for_norm``;
   ``NoNormalization``, ``RescaleTo01Normalization``, ``RGBTo01Normalization``), in float32;
4. **resample** to the configuration's spacing, shape ``round(old_spacing / new_spacing * shape)``:
   3rd-order splines (``order``) in 3D, or, when the current or the target spacing is anisotropic
   (max/min > 3) along a single axis, 2D splines in-plane and ``order_z`` (nearest) along that axis.

Backward (``convert_predicted_logits_to_segmentation_with_correct_shape``): resample the logits to
the cropped shape (``resampling_fn_probabilities``: order 1, same separate-z rule), argmax (or, for
regions, sigmoid then each region's value where p > 0.5, later regions overwriting), paste into the
crop box of a zero volume and transpose back. The logits keep the dtype they come in (nnU-Net's
sliding window accumulates fp16); the interpolation itself runs in float64, as nnU-Net's does.

Interpolation matches ``skimage.transform.resize(..., mode="edge", anti_aliasing=False)``:
``scipy.ndimage.zoom(grid_mode=True, mode="nearest")`` clipped to the input's range.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ReCoKDLib.nnunet import NNUNetError

__all__ = [
    "ANISO_THRESHOLD",
    "preprocess_case",
    "crop_to_nonzero",
    "normalize_channels",
    "compute_new_shape",
    "separate_z_axis",
    "resample_to_shape",
    "logits_to_segmentation",
]

#: nnU-Net's ``ANISO_THRESHOLD``: spacing max/min above this resamples the low-resolution axis separately
ANISO_THRESHOLD = 3.0
_RESAMPLING_FN = "resample_data_or_seg_to_shape"


def crop_to_nonzero(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Crop ``(C, Z, Y, X)`` to the box of voxels non-zero in any channel (holes filled).

    Returns:
        ``(cropped (C, z, y, x), mask (z, y, x) bool of the filled non-zero region, bbox [[lo, hi]] * 3)``;
        an all-zero image keeps its full extent.
    """
    from scipy.ndimage import binary_fill_holes

    mask = np.any(data != 0, axis=0)
    mask = binary_fill_holes(mask)
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(np.any(mask, axis=other))
        bbox.append([int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, mask.shape[axis]])
    sl = tuple(slice(lo, hi) for lo, hi in bbox)
    return data[(slice(None),) + sl], mask[sl], bbox


def _normalize_one(image: np.ndarray, scheme: str, use_mask: bool, props: Mapping[str, Any] | None,
                   mask: np.ndarray, source: str) -> np.ndarray:
    """One channel, float32, the same arithmetic in the same order as nnU-Net's normalisation classes."""
    eps = 1e-8
    image = image.astype(np.float32, copy=False)
    if scheme == "CTNormalization":
        try:
            mean, std = props["mean"], props["std"]
            lower, upper = props["percentile_00_5"], props["percentile_99_5"]
        except (TypeError, KeyError) as exc:
            raise NNUNetError(f"{source}: CTNormalization needs foreground_intensity_properties_per_channel with "
                              f"mean, std, percentile_00_5 and percentile_99_5; missing {exc}") from None
        np.clip(image, lower, upper, out=image)
        image -= mean
        image /= max(std, eps)
        return image
    if scheme == "ZScoreNormalization":
        if use_mask:
            mean = image[mask].mean()
            std = image[mask].std()
            image[mask] = (image[mask] - mean) / (max(std, eps))
        else:
            mean = image.mean()
            std = image.std()
            image -= mean
            image /= (max(std, eps))
        return image
    if scheme == "NoNormalization":
        return image
    if scheme == "RescaleTo01Normalization":
        image -= image.min()
        image /= np.clip(image.max(), a_min=eps, a_max=None)
        return image
    if scheme == "RGBTo01Normalization":
        if image.min() < 0 or image.max() > 255:
            raise NNUNetError(f"RGBTo01Normalization expects values in 0..255; got {image.min()}..{image.max()}")
        image /= 255.0
        return image
    raise NNUNetError(f"{source}: unknown normalisation scheme {scheme!r}; ReCoKD reproduces CTNormalization, "
                      f"ZScoreNormalization, NoNormalization, RescaleTo01Normalization, RGBTo01Normalization")


def normalize_channels(data: np.ndarray, configuration: Mapping[str, Any], intensity_properties: Mapping[str, Any],
                       mask: np.ndarray, source: str = "plans.json") -> np.ndarray:
    """Normalise ``(C, z, y, x)`` float32 in place, channel by channel (see the module docstring)."""
    schemes = list(configuration.get("normalization_schemes", []))
    use_mask = list(configuration.get("use_mask_for_norm", [False] * len(schemes)))
    if len(schemes) != data.shape[0]:
        raise NNUNetError(f"{source}: {len(schemes)} normalization_schemes for an image of {data.shape[0]} channel(s)")
    for c in range(data.shape[0]):
        props = (intensity_properties or {}).get(str(c))
        data[c] = _normalize_one(data[c], schemes[c], bool(use_mask[c]) if c < len(use_mask) else False, props, mask,
                                 source)
    return data


def compute_new_shape(shape: Sequence[int], old_spacing: Sequence[float], new_spacing: Sequence[float]) -> np.ndarray:
    """``round(old_spacing / new_spacing * shape)`` per axis (nnU-Net's ``compute_new_shape``)."""
    return np.array([int(round(o / n * s)) for o, n, s in zip(old_spacing, new_spacing, shape)])


def _lowres_axes(spacing: Sequence[float]) -> np.ndarray:
    spacing = np.asarray(spacing, float)
    return np.where(max(spacing) / spacing == 1)[0]


def separate_z_axis(current_spacing: Sequence[float], new_spacing: Sequence[float], force_separate_z: bool | None = None,
                    threshold: float = ANISO_THRESHOLD) -> int | None:
    """The axis resampled on its own (nearest / ``order_z``), or ``None`` for plain 3D resampling.

    The current spacing decides first, then the target; an anisotropy (max/min > ``threshold``)
    along two or three axes at once falls back to 3D resampling, as in nnU-Net.
    """
    if force_separate_z is not None:
        axes = _lowres_axes(current_spacing) if force_separate_z else None
    elif max(current_spacing) / min(current_spacing) > threshold:
        axes = _lowres_axes(current_spacing)
    elif max(new_spacing) / min(new_spacing) > threshold:
        axes = _lowres_axes(new_spacing)
    else:
        axes = None
    if axes is None or len(axes) != 1:
        return None
    return int(axes[0])


def _resize(image: np.ndarray, new_shape: Sequence[int], order: int) -> np.ndarray:
    """``skimage.transform.resize(image, new_shape, order, mode="edge", anti_aliasing=False)`` in float64."""
    from scipy import ndimage

    image = np.asarray(image, dtype=float)
    factors = np.divide(image.shape, new_shape)
    out = ndimage.zoom(image, [1 / f for f in factors], order=order, mode="nearest", cval=0, grid_mode=True)
    np.clip(out, np.min(image), np.max(image), out=out)
    return out


def resample_to_shape(data: np.ndarray, new_shape: Sequence[int], current_spacing: Sequence[float],
                      new_spacing: Sequence[float], order: int = 3, order_z: int = 0,
                      force_separate_z: bool | None = None, threshold: float = ANISO_THRESHOLD) -> np.ndarray:
    """Resample ``(C, z, y, x)`` to ``new_shape`` (nnU-Net's ``resample_data_or_seg_to_shape``, images only).

    Returns:
        ``(C, *new_shape)`` in the input's dtype (the input itself when the shape already matches).
    """
    new_shape = np.asarray([int(s) for s in new_shape])
    shape = np.asarray(data.shape[1:])
    if np.all(shape == new_shape):
        return data
    axis = separate_z_axis(current_spacing, new_spacing, force_separate_z, threshold)
    out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    work = data.astype(float, copy=False)
    for c in range(data.shape[0]):
        if axis is None:
            out[c] = _resize(work[c], new_shape, order)
            continue
        inplane_shape = new_shape[[a for a in range(3) if a != axis]]
        stack_shape = new_shape.copy()
        stack_shape[axis] = shape[axis]
        stack = np.zeros(stack_shape)
        for i in range(shape[axis]):
            index = [slice(None)] * 3
            index[axis] = i
            stack[tuple(index)] = _resize(work[c][tuple(index)], inplane_shape, order)
        if shape[axis] == new_shape[axis]:
            out[c] = stack
            continue
        from scipy.ndimage import map_coordinates

        scale = np.asarray(stack.shape, float) / new_shape
        grid = np.mgrid[:new_shape[0], :new_shape[1], :new_shape[2]].astype(float)
        coords = np.stack([scale[a] * (grid[a] + 0.5) - 0.5 for a in range(3)])
        out[c] = map_coordinates(stack, coords, order=order_z, mode="nearest")
    return out


def _resampling_kwargs(configuration: Mapping[str, Any], key: str, source: str) -> dict[str, Any]:
    fn = configuration.get(f"resampling_fn_{key}", _RESAMPLING_FN)
    if fn != _RESAMPLING_FN:
        raise NNUNetError(f"{source}: resampling_fn_{key} is {fn!r}; ReCoKD reproduces {_RESAMPLING_FN!r} only")
    kwargs = dict(configuration.get(f"resampling_fn_{key}_kwargs") or {})
    if kwargs.get("is_seg"):
        raise NNUNetError(f"{source}: resampling_fn_{key}_kwargs has is_seg true; expected image interpolation")
    return {"order": int(kwargs.get("order", 3 if key == "data" else 1)), "order_z": int(kwargs.get("order_z", 0)),
            "force_separate_z": kwargs.get("force_separate_z"),
            "threshold": float(kwargs.get("separate_z_anisotropy_threshold", ANISO_THRESHOLD))}


def _plans_parts(folder) -> tuple[Mapping[str, Any], Mapping[str, Any], str]:
    plans, configuration = getattr(folder, "plans", None), getattr(folder, "configuration", None)
    if plans is None or configuration is None:
        raise NNUNetError("expected an opened nnU-Net model folder (nnunet.folder.open_model_folder)")
    return plans, configuration, str(getattr(folder, "path", "plans.json")) + "/plans.json"


def preprocess_case(image: np.ndarray, spacing: Sequence[float], folder) -> tuple[np.ndarray, dict[str, Any]]:
    """nnU-Net's preprocessing of one case.

    Args:
        image: ``(C, Z, Y, X)`` raw intensities in SimpleITK array order (a ``(Z, Y, X)`` array is one channel).
        spacing: voxel spacing ``(z, y, x)`` in mm (SimpleITK's ``GetSpacing()`` reversed).
        folder: an :class:`~ReCoKDLib.nnunet.folder.NNUNetModelFolder` (plans and configuration).

    Returns:
        ``(data (C, z', y', x') float32 on the configuration's spacing, in transposed axis order,
        properties)``; ``properties`` holds what :func:`logits_to_segmentation` needs: ``spacing``,
        ``shape_before_cropping``, ``bbox_used_for_cropping``, ``shape_after_cropping_and_before_resampling``.
    """
    plans, configuration, source = _plans_parts(folder)
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise NNUNetError(f"preprocess_case needs a (C, Z, Y, X) or (Z, Y, X) image; got shape {image.shape}")
    spacing = [abs(float(s)) for s in spacing]
    if len(spacing) != 3:
        raise NNUNetError(f"spacing is 3 values (z, y, x); got {spacing}")
    forward = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    data = image.astype(np.float32)
    data = data.transpose([0, *[a + 1 for a in forward]])
    original_spacing = [spacing[a] for a in forward]
    properties: dict[str, Any] = {"spacing": list(spacing), "shape_before_cropping": tuple(data.shape[1:])}
    data, mask, bbox = crop_to_nonzero(data)
    data = np.ascontiguousarray(data)
    properties["bbox_used_for_cropping"] = bbox
    properties["shape_after_cropping_and_before_resampling"] = tuple(data.shape[1:])
    target = [float(s) for s in configuration.get("spacing", [])]
    if len(target) == 2:  # a 2D configuration keeps the first axis's spacing
        target = [original_spacing[0]] + target
    if len(target) != 3:
        raise NNUNetError(f"{source}: configuration spacing must have 3 (or 2) values; got {configuration.get('spacing')}")
    new_shape = compute_new_shape(data.shape[1:], original_spacing, target)
    data = normalize_channels(data, configuration, plans.get("foreground_intensity_properties_per_channel", {}), mask,
                              source)
    data = resample_to_shape(data, new_shape, original_spacing, target, **_resampling_kwargs(configuration, "data", source))
    return data, properties


def logits_to_segmentation(logits, properties: Mapping[str, Any], folder, return_probabilities: bool = False):
    """nnU-Net's export: logits ``(K, z', y', x')`` on the preprocessed grid -> labels ``(Z, Y, X)`` on the input grid.

    Args:
        logits: numpy array or tensor (fp16 as nnU-Net's sliding window returns it, or fp32).
        properties: from :func:`preprocess_case`.
        folder: the model folder (plans, configuration, dataset.json).
        return_probabilities: also return ``(K, Z, Y, X)`` float32 probabilities (softmax, or sigmoid for regions;
            class 0 = 1 outside the crop box).

    Returns:
        labels uint8 (uint16 above 255 labels), or ``(labels, probabilities)``.
    """
    import torch

    from ReCoKDLib.nnunet.folder import label_info

    plans, configuration, source = _plans_parts(folder)
    info = label_info(folder.dataset_json)
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().numpy()
    if logits.shape[0] != info.num_heads:
        raise NNUNetError(f"{logits.shape[0]} logit channels but dataset.json defines {info.num_heads} heads")
    forward = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    backward = [int(a) for a in plans.get("transpose_backward", [0, 1, 2])]
    spacing_t = [float(properties["spacing"][a]) for a in forward]
    crop_shape = properties["shape_after_cropping_and_before_resampling"]
    current = [float(s) for s in configuration["spacing"]]
    if len(current) != len(crop_shape):
        current = [spacing_t[0], *current]
    logits = resample_to_shape(logits, crop_shape, current, spacing_t,
                               **_resampling_kwargs(configuration, "probabilities", source))
    probabilities = None
    if info.has_regions:
        probabilities = torch.sigmoid(torch.from_numpy(np.asarray(logits)).float()).numpy()
        crop_labels = np.zeros(crop_shape, np.uint16)
        for region, value in zip(probabilities, info.regions_class_order):
            crop_labels[region > 0.5] = value
    else:
        if return_probabilities:
            probabilities = torch.softmax(torch.from_numpy(np.asarray(logits)).float(), 0).numpy()
            crop_labels = probabilities.argmax(0)
        else:
            crop_labels = np.asarray(logits).argmax(0)
    n_foreground = len(info.class_names) - 1
    labels = np.zeros(properties["shape_before_cropping"], np.uint8 if n_foreground < 255 else np.uint16)
    box = tuple(slice(lo, hi) for lo, hi in properties["bbox_used_for_cropping"])
    labels[box] = crop_labels
    labels = labels.transpose(backward)
    if not return_probabilities:
        return labels
    full = np.zeros((probabilities.shape[0], *properties["shape_before_cropping"]), np.float32)
    if not info.has_regions:
        full[0] = 1.0
    full[(slice(None),) + box] = probabilities
    return labels, full.transpose([0, *[a + 1 for a in backward]])
