"""nnU-Net v2's sliding-window inference, reimplemented for exact parity with ``nnUNetPredictor``.

What makes nnU-Net's logits nnU-Net's (and MONAI's sliding window differ by up to several logits):

* **padding**: a volume smaller than the patch is zero-padded to it, the content centred (the odd
  voxel after it);
* **window placement**: per axis ``ceil((size - patch) / (patch * step)) + 1`` windows, starts
  ``round(i * (size - patch) / (n - 1))``, visited z-major (z, then y, then x);
* **Gaussian importance**: a unit impulse blurred with sigma ``patch / 8`` (scipy, constant mode),
  scaled to a maximum of 10, cast to fp16, zeros replaced by the smallest non-zero value;
* **fp16 accumulation**: window logits (fp32, times the fp16 Gaussian) are added into fp16 sums,
  divided by the fp16 sum of weights;
* **mirroring**: the logits of every non-empty combination of flips of the allowed axes, added to
  the plain pass in ``itertools.combinations`` order and divided by their count;
* **folds**: each fold's full sliding window in turn, the fp16 results summed and divided.

CUDA runs the networks under fp16 autocast, as nnU-Net does.
"""

from __future__ import annotations

import itertools
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ReCoKDLib.models.base import InferenceError, SegmentationResult, network_logits, resolve_device
from ReCoKDLib.models.runtimes import aggregate_on_one_thread
from ReCoKDLib.nnunet import NNUNetError

__all__ = [
    "gaussian_importance",
    "window_starts",
    "sliding_window_logits",
    "predict_case",
    "predict_file",
    "segment_volume_nnunet",
]


@lru_cache(maxsize=4)
def _gaussian_numpy(patch_size: tuple[int, ...], sigma_scale: float, value_scaling_factor: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros(patch_size)
    impulse[tuple(p // 2 for p in patch_size)] = 1
    weights = gaussian_filter(impulse, [p * sigma_scale for p in patch_size], 0, mode="constant", cval=0)
    weights /= np.max(weights) / value_scaling_factor
    return weights


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8, value_scaling_factor: float = 10,
                        dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu") -> Tensor:
    """The ``(D, H, W)`` window weights (see the module docstring)."""
    weights = torch.from_numpy(_gaussian_numpy(tuple(int(p) for p in patch_size), sigma_scale, value_scaling_factor))
    weights = weights.to(device=device, dtype=dtype)
    zero = weights == 0
    if zero.any():
        weights[zero] = torch.min(weights[~zero])
    return weights


def window_starts(size: int, patch: int, step_size: float = 0.5) -> list[int]:
    """Start indices of nnU-Net's windows along one axis (``size >= patch``)."""
    if size < patch:
        raise NNUNetError(f"window_starts needs size >= patch (pad first); got size {size}, patch {patch}")
    if not 0 < step_size <= 1:
        raise NNUNetError(f"step_size must be in (0, 1]; got {step_size}")
    n = int(np.ceil((size - patch) / (patch * step_size))) + 1
    step = (size - patch) / (n - 1) if n > 1 else 0
    return [int(np.round(step * i)) for i in range(n)]


def _pad_to_patch(data: Tensor, patch: Sequence[int]) -> tuple[Tensor, tuple[slice, ...]]:
    shape = data.shape[1:]
    below = [max(p - s, 0) // 2 for s, p in zip(shape, patch)]
    above = [max(p - s, 0) - b for s, p, b in zip(shape, patch, below)]
    if not any(below) and not any(above):
        return data, tuple(slice(None) for _ in shape)
    pad = []
    for b, a in zip(reversed(below), reversed(above)):
        pad += [b, a]
    padded = torch.nn.functional.pad(data, pad, "constant", 0)
    return padded, tuple(slice(b, b + s) for b, s in zip(below, shape))


def _mirrored_logits(network: nn.Module, x: Tensor, mirror_axes: Sequence[int]) -> Tensor:
    prediction = network_logits(network(x))
    if mirror_axes:
        dims = [int(a) + 2 for a in mirror_axes]
        combos = [c for n in range(len(dims)) for c in itertools.combinations(dims, n + 1)]
        for axes in combos:
            prediction += torch.flip(network_logits(network(torch.flip(x, axes))), axes)
        prediction /= len(combos) + 1
    return prediction


def _one_network(network: nn.Module, data: Tensor, patch: Sequence[int], mirror_axes: Sequence[int],
                 step_size: float, use_gaussian: bool, device: torch.device, callback) -> Tensor:
    padded, unpad = _pad_to_patch(data, patch)
    starts = [window_starts(s, p, step_size) for s, p in zip(padded.shape[1:], patch)]
    windows = list(itertools.product(*starts))
    gaussian = gaussian_importance(patch, device="cpu") if use_gaussian else None
    logits = None
    weights = torch.zeros(padded.shape[1:], dtype=torch.half)
    autocast = torch.autocast(device.type, enabled=device.type == "cuda")
    for n, start in enumerate(windows):
        sl = tuple(slice(s, s + p) for s, p in zip(start, patch))
        x = padded[(slice(None),) + sl][None].contiguous().to(device)
        with autocast:
            prediction = _mirrored_logits(network, x, mirror_axes)[0].to("cpu")
        if logits is None:
            logits = torch.zeros((prediction.shape[0], *padded.shape[1:]), dtype=torch.half)
        if gaussian is not None:
            prediction *= gaussian
            weights[sl] += gaussian
        else:
            weights[sl] += 1
        logits[(slice(None),) + sl] += prediction
        if callback is not None:
            callback(n + 1, len(windows))
    torch.div(logits, weights, out=logits)
    if torch.isinf(logits).any():
        raise NNUNetError("the accumulated fp16 logits overflowed (inf); the network's logits are too large for fp16")
    return logits[(slice(None),) + unpad]


def sliding_window_logits(networks: nn.Module | Sequence[nn.Module], data: Tensor, patch_size: Sequence[int],
                          mirror_axes: Sequence[int] = (), step_size: float = 0.5, *, use_gaussian: bool = True,
                          device: str | torch.device | None = None,
                          progress_callback: Callable[[int, int], None] | None = None) -> Tensor:
    """Whole-volume logits exactly as ``nnUNetPredictor.predict_logits_from_preprocessed_data``.

    Args:
        networks: one network, or one per fold (averaged), each mapping ``(1, C, *patch)`` to ``(1, K, *patch)``.
        data: ``(C, D, H, W)`` preprocessed volume (nnU-Net's transposed axis order).
        patch_size: window ``(D, H, W)``.
        mirror_axes: spatial axes to mirror (``(0, 1, 2)`` from the checkpoint), or ``()``.
        step_size: window step as a fraction of the patch (nnU-Net's ``tile_step_size``, 0.5).
        use_gaussian: Gaussian window weights (else uniform).
        device: where the networks run (default: their parameters' device); sums stay on the CPU.
        progress_callback: ``callback(done, total)`` over all folds' windows.

    Returns:
        ``(K, D, H, W)`` fp16 logits on the CPU (nnU-Net's dtype; cast with ``.float()`` as needed).
    """
    nets = [networks] if isinstance(networks, nn.Module) else list(networks)
    if not nets:
        raise NNUNetError("sliding_window_logits needs at least one network")
    if not isinstance(data, Tensor) or data.dim() != 4:
        raise NNUNetError(f"sliding_window_logits needs a (C, D, H, W) tensor; got "
                          f"{tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__}")
    patch = [int(p) for p in patch_size]
    if len(patch) != 3 or min(patch) < 1:
        raise NNUNetError(f"patch_size must be 3 positive ints; got {tuple(patch_size)}")
    if any(int(a) not in (0, 1, 2) for a in mirror_axes):
        raise NNUNetError(f"mirror axes are 0, 1, 2; got {tuple(mirror_axes)}")
    if device is None:
        param = next(iter(nets[0].parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    data = data.float().cpu()
    total_windows = int(np.prod([len(window_starts(max(s, p), p, step_size)) for s, p in zip(data.shape[1:], patch)]))
    done_before = [0]

    def callback(done: int, _total: int) -> None:
        if progress_callback is not None:
            progress_callback(done_before[0] + done, total_windows * len(nets))

    modes = [net.training for net in nets]
    result = None
    try:
        with torch.inference_mode(), aggregate_on_one_thread(nets):
            for net in nets:
                net.eval()
                logits = _one_network(net, data, patch, tuple(mirror_axes), step_size, use_gaussian, device, callback)
                done_before[0] += total_windows
                result = logits if result is None else result + logits
            if len(nets) > 1:
                result /= len(nets)
    finally:
        for net, mode in zip(nets, modes):
            net.train(mode)
    return result


def predict_case(model, image: np.ndarray, spacing: Sequence[float], *, use_mirroring: bool = True,
                 step_size: float = 0.5, device: str | torch.device | None = None, return_probabilities: bool = False,
                 progress_callback=None, mirror_axes: Sequence[int] | None = None,
                 networks: Sequence[nn.Module] | None = None):
    """Labels ``(Z, Y, X)`` (and probabilities) of an image ``(C, Z, Y, X)`` with an nnU-Net teacher.

    ``model`` is what :func:`ReCoKDLib.nnunet.teacher.load_nnunet_model` returns; ``mirror_axes``
    (default: the checkpoint's) apply when ``use_mirroring``; ``networks`` (default the folds'
    PyTorch networks) are what runs them: a backend's runners (:mod:`ReCoKDLib.models.backends`).
    """
    from ReCoKDLib.nnunet.preprocess import logits_to_segmentation, preprocess_case

    folder = model.folder
    data, properties = preprocess_case(image, spacing, folder)
    allowed = tuple(model.mirror_axes or ()) if mirror_axes is None else tuple(mirror_axes)
    mirror_axes = allowed if use_mirroring else ()
    logits = sliding_window_logits(list(networks or model.fold_networks), torch.from_numpy(data), folder.configuration["patch_size"],
                                   mirror_axes, step_size, device=device, progress_callback=progress_callback)
    return logits_to_segmentation(logits, properties, folder, return_probabilities=return_probabilities)


def predict_file(folder, image_path: str | os.PathLike | Sequence[str | os.PathLike],
                 out_path: str | os.PathLike | None = None, use_mirroring: bool = True, *, folds=None,
                 checkpoint_name: str = "checkpoint_final.pth", step_size: float = 0.5,
                 device: str | torch.device = "cpu"):
    """Segment an image file (or one file per channel) as ``nnUNetv2_predict`` would.

    Args:
        folder: a model folder path, or a model from :func:`~ReCoKDLib.nnunet.teacher.load_nnunet_model`.
        image_path: the image (``case_0000.nii.gz``), or a list with one file per channel.
        out_path: where to write the label map (atomically, the input's exact geometry), or ``None``.
        use_mirroring: test-time mirroring on the checkpoint's allowed axes.

    Returns:
        ``(labels (Z, Y, X), geometry)``.
    """
    from ReCoKDLib.data.io import check_same_grid, read_image, write_image
    from ReCoKDLib.nnunet.teacher import load_nnunet_model

    model = folder if hasattr(folder, "fold_networks") else load_nnunet_model(folder, folds=folds, device=device,
                                                                             checkpoint_name=checkpoint_name)
    paths = [image_path] if isinstance(image_path, (str, os.PathLike)) else list(image_path)
    arrays, geometry = [], None
    for path in paths:
        array, geo = read_image(path, allow_channels=False)
        if geometry is not None:
            check_same_grid(geometry, geo, arrays[0].shape, array.shape, str(paths[0]), str(path))
        geometry = geometry or geo
        arrays.append(array)
    spacing = [float(s) for s in reversed(geometry.spacing)]
    labels = predict_case(model, np.stack(arrays), spacing, use_mirroring=use_mirroring, step_size=step_size,
                          device=device)
    if out_path is not None:
        write_image(labels, geometry, Path(out_path))
    return labels, geometry


def segment_volume_nnunet(model, image: np.ndarray, geometry, roi=None, mirror: bool | Sequence[int] = False,
                          overlap: float = 0.5, device: str | torch.device | None = "cpu",
                          return_probabilities: bool = False, reporter=None,
                          networks: Sequence[nn.Module] | None = None):
    """:func:`ReCoKDLib.infer.segment_volume` for an nnU-Net model: nnU-Net's preprocessing, window and export.

    ``networks``: the backend's runners of the folds (default their PyTorch networks).
    ``mirror=True`` mirrors on the checkpoint's allowed axes (``nnUNetv2_predict``'s default), ``False`` not at
    all (``--disable_tta``, SlicerNNUnet's default), a tuple on those axes; ``overlap`` is ``1 - step_size``. An
    ROI is applied to the whole-volume result (background outside it).
    """
    import time

    t0 = time.perf_counter()
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[None]
    if image.shape[0] != model.card.in_channels:
        raise InferenceError(f"the model expects {model.card.in_channels} image channel(s); got {image.shape[0]} "
                             f"(image shape {image.shape})")
    if not 0 <= overlap < 1:
        raise InferenceError(f"overlap must be in [0, 1); got {overlap}")
    dev = resolve_device(device)
    if mirror is True:
        axes = tuple(model.mirror_axes)
    elif mirror is False:
        axes = ()
    else:
        axes = tuple(int(a) for a in mirror)
    if reporter is not None:
        reporter.start("segment", total=None, message="nnU-Net preprocessing")

    def callback(done: int, total: int) -> None:
        if reporter is not None:
            reporter.progress("segment", done, total)

    for network in model.fold_networks:
        network.to(dev)
    spacing = [float(s) for s in reversed(geometry.spacing)]
    result = predict_case(model, image, spacing, use_mirroring=bool(axes), step_size=1.0 - overlap, device=dev,
                          return_probabilities=return_probabilities, progress_callback=callback,
                          mirror_axes=axes, networks=networks)
    labels, probabilities = result if return_probabilities else (result, None)
    roi_box = roi.voxel_box(geometry, image.shape) if roi is not None else None
    if roi_box is not None:
        inside = np.zeros(labels.shape, bool)
        inside[tuple(slice(a, b) for a, b in roi_box)] = True
        labels[~inside] = 0
        if probabilities is not None:
            probabilities[:, ~inside] = 0.0
            probabilities[0, ~inside] = 1.0
    seconds = time.perf_counter() - t0
    if reporter is not None:
        reporter.log("segment", f"segmented {image.shape[1:]} with nnU-Net's pipeline in {seconds:.1f} s on {dev}")
    return SegmentationResult(labels=labels, probabilities=probabilities, geometry=geometry,
                              class_names=list(model.card.classes), seconds=seconds, roi_box=roi_box, device=str(dev),
                              info={"pipeline": "nnunet", "mirror_axes": axes, "step_size": 1.0 - overlap})
