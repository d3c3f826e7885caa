"""Segmentation with exact geometry: sliding window (MONAI), test-time mirroring, regions of interest.

The way of a volume::

    image (D, H, W) + Geometry ──preprocess_case──> (C, D', H', W') on the card's spacing
        ──predict_logits (Gaussian sliding window, optional mirroring; the network run by the
          backend ReCoKDLib.models.backends chose, on the window ReCoKDLib.models.window chose)──>
        (K, D', H', W') logits ──softmax──> probabilities
        ──restore_labels (exact argmax of their linear resampling; ReCoKDLib.restore)──> labels on the input grid
          (or restore_to_original: every class map resampled, when probabilities are asked for)

The output label map has exactly the input's shape, spacing, origin and direction (oblique
directions included): it is computed on the input's own voxels, never re-oriented.

**Regions of interest.** :class:`ROI` is a box in voxel indices (``"ijk"``) or in world millimetres
(``"ras"`` as in Slicer, or ``"lps"`` as in DICOM/ITK). Only the sliding windows that touch the
box (grown by 2 voxels of the preprocessed grid, the support of the linear resampling back) are
run; the context margin is therefore the rest of those windows, at most one patch beyond the box
on each side. The window positions are the ones a whole-volume run would use (the computed region
starts and ends on window boundaries of the whole-volume window grid), so every voxel of the box
receives the same windows, the same Gaussian weights, in the same order as in a whole-volume run:
inside the box the result equals full inference on the same window (an ROI run uses the training
patch unless a window is given, so it equals a whole-volume run with ``window="patch"``; up to the
batching of windows, ``sw_batch_size``, which can change the last bits of a convolution). Outside the box the output is background
(label 0; probability 1 for class 0). Normalisation and resampling always see the whole volume, so
per-volume statistics (z-score) do not depend on the box.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ReCoKDLib.data.boxes import Box
from ReCoKDLib.data.io import Geometry, require_3d
from ReCoKDLib.data.preprocess import PreprocessedCase, as_channels, preprocess_case, restore_to_original
from ReCoKDLib.models.base import InferenceError, SegmentationResult, network_logits, resolve_device
from ReCoKDLib.models.runtimes import aggregate_on_one_thread

__all__ = [
    "InferenceError",
    "ROI",
    "SegmentationResult",
    "resolve_device",
    "network_logits",
    "predict_logits",
    "window_starts",
    "window_aligned_box",
    "DEFAULT_OVERLAP",
    "model_overlap",
    "segment_volume",
    "segment_array",
    "segment_file",
    "softmax_",
]


#: preprocessed-grid voxels added around the ROI before choosing windows (linear resampling support)
ROI_RESAMPLING_MARGIN = 2

#: sliding-window overlap of a model whose card names none (nnU-Net's step size 0.5)
DEFAULT_OVERLAP = 0.5


def model_overlap(model: Any, overlap: float | None = None) -> float:
    """The sliding-window overlap to segment with: ``overlap`` when given, else the model card's
    ``inference["overlap"]`` (measured for that model when it was made), else :data:`DEFAULT_OVERLAP`."""
    if overlap is not None:
        return float(overlap)
    record = getattr(getattr(model, "card", None), "inference", None) or {}
    return float(record.get("overlap", DEFAULT_OVERLAP))


# --------------------------------------------------------------------------------------------
# The functional core: logits of one volume


def _mirror_sets(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    axes = tuple(sorted(set(int(a) for a in mirror_axes)))
    if any(a not in (0, 1, 2) for a in axes):
        raise InferenceError(f"mirror axes are spatial axes 0 (D), 1 (H), 2 (W); got {tuple(mirror_axes)}")
    return [c for n in range(len(axes) + 1) for c in itertools.combinations(axes, n)]


def predict_logits(
    network: nn.Module,
    image: Tensor,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    mirror_axes: Sequence[int] = (),
    device: str | torch.device | None = None,
    amp: bool = False,
    sw_batch_size: int = 1,
    progress_callback=None,
    cval: float = 0.0,
) -> Tensor:
    """Whole-volume logits by Gaussian-weighted sliding window (MONAI ``sliding_window_inference``).

    Args:
        network: maps ``(B, C, *patch_size)`` to ``(B, K, *patch_size)`` logits; run in eval mode, and
            given back in the mode it came in (training loops validate with it).
        image: ``(C, D, H, W)`` preprocessed volume (any device; windows are moved to ``device``).
        patch_size: window ``(D, H, W)`` in voxels; volumes smaller than it are padded by MONAI.
        overlap: fraction of a window shared with its neighbour, in ``[0, 1)``.
        mirror_axes: spatial axes (0 = D, 1 = H, 2 = W) for test-time mirroring: the logits are
            averaged over every combination of flips of these axes (2**n passes, as nnU-Net).
        device: where the network runs (default: the device of its parameters).
        amp: autocast (bf16 on CPU, fp16/bf16 on CUDA) for the forward passes.
        sw_batch_size: windows per forward pass.
        progress_callback: called as ``callback(done, total)`` after each batch of windows.
        cval: the value a volume smaller than the window is padded with.

    Returns:
        ``(K, D, H, W)`` float32 logits on the CPU, aggregated there (window outputs only live on
        ``device``), without gradient.
    """
    if not isinstance(image, Tensor) or image.dim() != 4:
        raise InferenceError(f"predict_logits needs a (C, D, H, W) tensor; got "
                             f"{tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}")
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise InferenceError(f"patch_size must be 3 positive ints (D, H, W); got {tuple(patch_size)}")
    if not 0 <= overlap < 1:
        raise InferenceError(f"overlap must be in [0, 1); got {overlap}")
    from monai.inferers import sliding_window_inference

    if device is None:
        param = next(iter(network.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    flips = _mirror_sets(mirror_axes)
    was_training = network.training
    network.eval()
    total = len(window_starts(image.shape[1], patch[0], overlap)) * len(window_starts(image.shape[2], patch[1], overlap)) \
        * len(window_starts(image.shape[3], patch[2], overlap))
    total = -(-total // max(1, sw_batch_size))
    done = [0]

    def predictor(batch: Tensor) -> Tensor:
        out = None
        with torch.autocast(device.type, enabled=amp):
            for axes in flips:
                dims = [a + 2 for a in axes]
                x = torch.flip(batch, dims) if dims else batch
                y = network_logits(network(x)).float()
                y = torch.flip(y, dims) if dims else y
                out = y if out is None else out + y
        done[0] += 1
        if progress_callback is not None:
            progress_callback(done[0], total)
        return out if len(flips) == 1 else out.div_(len(flips))  # no second (B, K, *window) map

    try:
        with torch.no_grad():
            if all(s <= p for s, p in zip(image.shape[1:], patch)):
                return _one_window(predictor, image, patch, device, cval)
            logits = sliding_window_inference(
                image[None].float(), roi_size=patch, sw_batch_size=sw_batch_size, predictor=predictor,
                overlap=overlap, mode="gaussian", sw_device=device, device=torch.device("cpu"), cval=float(cval),
            )
    finally:
        network.train(was_training)
    return torch.as_tensor(logits)[0].float()


def _one_window(predictor, image: Tensor, patch: Sequence[int], device: torch.device, cval: float) -> Tensor:
    """What ``sliding_window_inference`` gives when one window holds the whole ``(C, D, H, W)`` volume:
    the volume padded with ``cval`` as MONAI pads it (``diff // 2`` before, the rest after), the
    prediction cropped back. MONAI's Gaussian weighting cancels out in one window, so this is its
    result up to float rounding, without its output, weight and count maps (three more
    ``(K, D, H, W)`` float32 maps for a whole-scan window)."""
    spatial = tuple(int(s) for s in image.shape[1:])
    before = [(p - s) // 2 for s, p in zip(spatial, patch)]
    pad: list[int] = []
    for s, p, b in reversed(list(zip(spatial, patch, before))):
        pad.extend([b, p - s - b])
    x = image[None].float()
    if any(pad):
        x = torch.nn.functional.pad(x, pad, value=float(cval))
    out = predictor(x.to(device))[0]
    return out[(slice(None),) + tuple(slice(b, b + s) for b, s in zip(before, spatial))].to("cpu").float()


# --------------------------------------------------------------------------------------------
# Window geometry (for regions of interest)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis, exactly as MONAI's sliding window places them.

    The interval is ``int(patch * (1 - overlap))`` (at least 1; ``patch`` when ``size == patch``);
    windows start at multiples of it until one reaches the end, and the last one is shifted back to
    end at ``size``. A ``size`` smaller than ``patch`` gives one (padded) window at 0.
    """
    if size <= patch:
        return [0]
    interval = max(1, int(patch * (1 - overlap)))
    starts, k = [], 0
    while True:
        start = k * interval
        if start + patch >= size:
            starts.append(size - patch)
            return starts
        starts.append(start)
        k += 1


def window_aligned_box(shape: Sequence[int], box: Box, patch_size: Sequence[int], overlap: float) -> Box:
    """The smallest region, starting and ending on window boundaries of the whole-volume window grid,
    that holds every window touching ``box``. Sliding windows run on that region are exactly the
    whole-volume windows that touch ``box`` (see the module docstring)."""
    out = []
    for size, (lo, hi), patch in zip(shape, box, patch_size):
        starts = window_starts(int(size), int(patch), overlap)
        touching = [s for s in starts if s < hi and s + patch > lo]
        if size <= patch or not touching:
            out.append((0, int(size)))
            continue
        out.append((min(touching), min(int(size), max(touching) + int(patch))))
    return tuple(out)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Regions of interest


@dataclass(frozen=True)
class ROI:
    """A box to segment.

    Attributes:
        start, stop: for ``space="ijk"``, voxel indices ``(i, j, k)``, half-open (``stop`` excluded);
            for ``"ras"``/``"lps"``, two opposite corners in mm of a world-axis-aligned box; the
            voxel box is the smallest one holding every voxel centre inside it (for an oblique
            image it also holds some voxels just outside the world box).
        space: ``"ijk"``, ``"ras"`` or ``"lps"``.
    """

    start: tuple[float, float, float]
    stop: tuple[float, float, float]
    space: str = "ijk"

    def __post_init__(self) -> None:
        if self.space not in ("ijk", "ras", "lps"):
            raise InferenceError(f"ROI space must be 'ijk', 'ras' or 'lps'; got {self.space!r}")
        if len(tuple(self.start)) != 3 or len(tuple(self.stop)) != 3:
            raise InferenceError(f"an ROI needs 3 start and 3 stop values; got {self.start} and {self.stop}")

    @classmethod
    def parse(cls, values: Sequence[float], space: str = "ijk") -> "ROI":
        """From 6 numbers ``x0 y0 z0 x1 y1 z1`` (``i0 j0 k0 i1 j1 k1`` for voxels)."""
        values = [float(v) for v in values]
        if len(values) != 6:
            raise InferenceError(f"an ROI is 6 numbers (x0 y0 z0 x1 y1 z1); got {len(values)}")
        return cls(tuple(values[:3]), tuple(values[3:]), space)  # type: ignore[arg-type]

    def voxel_box(self, geometry: Geometry, shape: Sequence[int]) -> Box:
        """The half-open ``((k0, k1), (j0, j1), (i0, i1))`` box in array ``(D, H, W)`` order, clipped."""
        shape_ijk = np.asarray(list(reversed(tuple(shape)[-3:])))
        if self.space == "ijk":
            lo = np.asarray(self.start, float)
            hi = np.asarray(self.stop, float)
            if np.any(lo != np.round(lo)) or np.any(hi != np.round(hi)):
                raise InferenceError(f"a voxel ROI needs whole indices; got {self.start} - {self.stop}")
            lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
        else:
            a, b = np.asarray(self.start, float), np.asarray(self.stop, float)
            corners = np.array([[(a, b)[n][0], (a, b)[m][1], (a, b)[p][2]] for n in (0, 1) for m in (0, 1) for p in (0, 1)])
            if self.space == "ras":
                corners = corners * np.array([-1.0, -1.0, 1.0])
            index = geometry.physical_to_index(corners)
            lo = np.ceil(index.min(axis=0) - 1e-6)
            hi = np.floor(index.max(axis=0) + 1e-6) + 1
        lo = np.clip(lo, 0, shape_ijk).astype(int)
        hi = np.clip(hi, 0, shape_ijk).astype(int)
        if np.any(hi <= lo):
            raise InferenceError(
                f"the ROI {self.start} - {self.stop} ({self.space}) holds no voxel of the image "
                f"(size i, j, k = {tuple(shape_ijk.tolist())})")
        return tuple((int(lo[n]), int(hi[n])) for n in (2, 1, 0))  # type: ignore[return-value]


def _box_on_preprocessed(box: Box, pre: PreprocessedCase, margin: int) -> Box:
    """Map an original-grid voxel box onto the preprocessed grid (through world coordinates)."""
    edges = [(lo - 0.5, hi - 0.5) for lo, hi in box]  # voxel edges, (D, H, W)
    corners_dhw = np.array([[d, h, w] for d in edges[0] for h in edges[1] for w in edges[2]])
    world = pre.original_geometry.index_to_physical(corners_dhw[:, ::-1])
    index = pre.geometry.physical_to_index(world)[:, ::-1]  # back to (D, H, W)
    lo = np.floor(index.min(axis=0) + 0.5).astype(int) - margin
    hi = np.ceil(index.max(axis=0) + 0.5).astype(int) + margin
    return tuple((int(max(0, a)), int(min(s, b))) for a, b, s in zip(lo, hi, pre.shape))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Volumes


def _label_dtype(num_classes: int):
    return np.uint8 if num_classes <= 256 else np.uint16


def segment_volume(
    model,
    image: np.ndarray,
    geometry: Geometry,
    roi: ROI | None = None,
    mirror: bool | Sequence[int] = False,
    overlap: float | None = None,
    device: str | torch.device | None = "auto",
    return_probabilities: bool = False,
    reporter=None,
    *,
    amp: bool = False,
    sw_batch_size: int = 1,
    backend: str = "auto",
    precision: str = "auto",
    window: Sequence[int] | str | None = "auto",
    restore: str = "auto",
    postprocess: bool = True,
) -> SegmentationResult:
    """Segment one volume with a :class:`~ReCoKDLib.models.base.LoadedModel`.

    Args:
        model: a ``LoadedModel`` (``network`` + ``card``).
        image: ``(D, H, W)`` or ``(C, D, H, W)`` in (k, j, i) order, raw intensities.
        geometry: its geometry (the output's).
        roi: optional :class:`ROI`; only windows touching it run, background outside it.
        mirror: ``True`` for mirroring on all three axes, or a tuple of axes (0 = D, 1 = H, 2 = W).
        overlap: sliding-window overlap in ``[0, 1)``; ``None``: the model card's
            (``inference["overlap"]``), else :data:`DEFAULT_OVERLAP` (:func:`model_overlap`).
        device: ``"auto"``, ``"cpu"``, ``"cuda[:i]"``; the network is moved there.
        return_probabilities: also return ``(K, D, H, W)`` probabilities.
        reporter: a :class:`~ReCoKDLib.progress.Reporter` (stage ``"segment"``).
        amp: the same as ``precision="bf16"`` (kept for older callers).
        sw_batch_size: windows per forward pass.
        backend, precision: which engine runs the network (:mod:`ReCoKDLib.models.backends`:
            ``auto``, ``torch``, ``onnxruntime``, ``openvino``; ``auto``, ``fp32``, ``bf16``).
        window: the sliding window ``(D, H, W)``: ``"auto"`` (as large as memory allows,
            :func:`ReCoKDLib.models.window.choose_window`; with an ``roi`` the training patch, so that
            the box equals a whole-volume run with ``window="patch"``), ``"patch"`` or 3 sizes.
        restore: ``"fast"`` (labels from the probabilities without resampling every class map,
            :mod:`ReCoKDLib.restore`), ``"probabilities"`` (every class map resampled, then argmax) or
            ``"auto"`` (``probabilities`` when they are returned or the labels are regions, else ``fast``).
        postprocess: apply the card's ``postprocessing`` to the labels (:mod:`ReCoKDLib.postprocess`,
            e.g. keep the largest brain component); probabilities are never changed.

    Returns:
        a :class:`SegmentationResult`; ``info`` holds the backend (and why), window (and how),
        overlap, mirroring, restore mode, post-processing (voxels removed per class) and the
        seconds of each stage.

    Raises:
        ImageDimensionError: not a 3D volume. InferenceError: wrong channel count, empty ROI, a
        network whose output channels do not match the card's classes, or a backend that cannot run.
    """
    from ReCoKDLib.models.backends import prepare_runner
    from ReCoKDLib.models.window import choose_window

    t0 = time.perf_counter()
    card = model.card
    overlap = model_overlap(model, overlap)
    if not 0 <= overlap < 1:
        raise InferenceError(f"overlap must be in [0, 1); got {overlap}")
    image = as_channels(image)
    if image.shape[0] != card.in_channels:
        raise InferenceError(f"the model expects {card.in_channels} image channel(s); got {image.shape[0]} "
                             f"(image shape {image.shape})")
    from ReCoKDLib.restore import RESTORE_MODES, restore_labels

    if restore not in RESTORE_MODES:
        raise InferenceError(f"unknown restore mode {restore!r}; choose one of {RESTORE_MODES}")
    dev = resolve_device(device)
    if amp and precision == "auto":
        precision = "bf16"
    mirror_axes = (0, 1, 2) if mirror is True else (() if mirror is False else tuple(mirror))

    def log(line: str) -> None:
        if reporter is not None:
            reporter.log("segment", line)

    if getattr(model, "kind", None) == "nnunet":  # an nnU-Net folder: nnU-Net's own preprocessing and window
        from ReCoKDLib.nnunet.predict import segment_volume_nnunet

        runner = prepare_runner(model, backend, precision, dev, log=log)
        result = segment_volume_nnunet(model, image, geometry, roi=roi, mirror=mirror, overlap=overlap, device=dev,
                                       return_probabilities=return_probabilities, reporter=reporter,
                                       networks=runner.networks)
        result.info.update(backend=runner.record(), window=list(card.patch_size))
        return result
    if reporter is not None:
        reporter.start("segment", total=None, message="preprocessing")

    pre = preprocess_case(image, geometry, card.spacing, card.normalization)
    t_pre = time.perf_counter()
    roi_box = roi.voxel_box(geometry, image.shape) if roi is not None else None
    region = ((0, pre.shape[0]), (0, pre.shape[1]), (0, pre.shape[2]))
    target = region
    if roi_box is not None:
        target = _box_on_preprocessed(roi_box, pre, ROI_RESAMPLING_MARGIN)
        if any(b <= a for a, b in target):
            target = region  # the ROI lies outside the non-zero crop: nothing to compute there
            region = None
    if roi_box is not None and window in (None, "auto"):
        window = "patch"  # an ROI run equals a whole-volume run on the same (patch) window inside the box
    win, window_info = choose_window(model, [b - a for a, b in target], window)
    if region is not None and roi_box is not None:
        region = window_aligned_box(pre.shape, target, win, overlap)
    cval = 0.0 if tuple(win) == tuple(int(p) for p in card.patch_size) else float(pre.image.min())

    callback = None
    if reporter is not None:
        def callback(done: int, total: int) -> None:
            reporter.progress("segment", done, total)

    from ReCoKDLib.nnunet.labels import label_spec_from_card, regions_to_segmentation

    spec = label_spec_from_card(card)
    regions = spec is not None and spec.has_regions  # nnU-Net region heads: sigmoid, painted in order
    k = spec.num_heads if regions else card.num_classes
    runner = None
    probs = None
    if region is not None:
        sl = tuple(slice(a, b) for a, b in region)
        crop = torch.from_numpy(np.ascontiguousarray(pre.image[(slice(None),) + sl]))
        runner = prepare_runner(model, backend, precision, dev, probe=_probe_window(crop, win, cval), log=log)
        with aggregate_on_one_thread([runner.network]):
            logits = predict_logits(runner.network, crop, win, overlap, mirror_axes, runner.device, False,
                                    sw_batch_size, callback, cval=cval)
        if logits.shape[0] != k:
            raise InferenceError(
                f"the network outputs {logits.shape[0]} channels but its card names "
                + (f"{k} regions {spec.head_names}" if regions else f"{k} classes {card.classes}"))
        if tuple(logits.shape[1:]) != tuple(crop.shape[1:]):
            raise InferenceError(
                f"the {runner.backend} {runner.precision} backend gave logits of size {tuple(logits.shape[1:])} for a "
                f"{tuple(crop.shape[1:])} volume in {'x'.join(map(str, win))} windows"
                + ("; segment with --backend torch" if runner.backend != "torch" else ""))
        if regions:
            logits.sigmoid_()
        else:
            softmax_(logits)
        if tuple(crop.shape[1:]) == tuple(pre.shape):  # the whole preprocessed volume: no copy
            probs = logits.numpy()
        else:
            probs = _background_probabilities(k, pre.shape, regions)
            probs[(slice(None),) + sl] = logits.numpy()
        del logits  # the probabilities replace the logits in place: one (K, D, H, W) map at a time
    if probs is None:
        probs = _background_probabilities(k, pre.shape, regions)
    t_infer = time.perf_counter()
    mode = restore if restore != "auto" else ("probabilities" if return_probabilities or regions else "fast")
    full = None
    if regions:
        full = restore_to_original(probs, pre, fill="zero")
        labels = regions_to_segmentation(full, spec.regions_class_order)
    elif mode == "fast" and not return_probabilities:
        labels = restore_labels(probs, pre, _label_dtype(k))
    else:
        full = restore_to_original(probs, pre)
        labels = np.argmax(full, axis=0).astype(_label_dtype(k))
    del probs
    if roi_box is not None:
        inside = np.zeros(labels.shape, bool)
        inside[tuple(slice(a, b) for a, b in roi_box)] = True
        labels[~inside] = 0
        if return_probabilities:
            full[:, ~inside] = 0.0
            if not regions:
                full[0, ~inside] = 1.0
    postprocessing_info: dict[str, Any] = {}
    if postprocess and getattr(card, "postprocessing", None):
        from ReCoKDLib.postprocess import postprocess_labels

        labels, postprocessing_info = postprocess_labels(labels, card.postprocessing, card.classes)
    seconds = time.perf_counter() - t0
    backend_record = runner.record() if runner is not None else {"backend": None, "reason": "no window to compute"}
    if reporter is not None:
        reporter.log("segment", f"segmented {image.shape[1:]} in {seconds:.1f} s on {dev} "
                                f"({backend_record['backend']} {backend_record.get('precision', '')}, window "
                                f"{'x'.join(map(str, win))}, overlap {overlap:g})")
    return SegmentationResult(
        labels=labels, probabilities=full if return_probabilities else None, geometry=geometry,
        class_names=list(card.classes), seconds=seconds, roi_box=roi_box, device=str(dev),
        info={"preprocessed_shape": pre.shape, "computed_region": region, "mirror_axes": mirror_axes,
              "backend": backend_record, "window": list(win), "window_choice": window_info, "overlap": overlap,
              "restore": "regions" if regions else ("probabilities" if full is not None else "fast"),
              "postprocessing": postprocessing_info,
              "stage_seconds": {"preprocess": round(t_pre - t0, 4), "infer": round(t_infer - t_pre, 4),
                                "restore": round(time.perf_counter() - t_infer, 4)}},
    )


def softmax_(logits: Tensor, dim: int = 0) -> Tensor:
    """``torch.softmax(logits, dim)`` written into ``logits`` (no second ``(K, D, H, W)`` map: a
    12-class whole-scan window's is 77 MB); equal to it up to float rounding."""
    logits -= logits.amax(dim, keepdim=True)
    logits.exp_()
    logits /= logits.sum(dim, keepdim=True)
    return logits


def _background_probabilities(k: int, shape: Sequence[int], regions: bool) -> np.ndarray:
    """``(K, *shape)`` float32: certain background (every region head 0) where nothing is computed."""
    probs = np.zeros((k,) + tuple(shape), np.float32)
    if not regions:
        probs[0] = 1.0
    return probs


def _probe_window(crop: Tensor, window: Sequence[int], cval: float) -> Tensor:
    """``(1, C, *window)``: the centre of the volume ``crop`` ``(C, D, H, W)``, padded with ``cval``
    where the volume is smaller (what the backend check and timing run on)."""
    out = torch.full((1, crop.shape[0], *[int(w) for w in window]), float(cval), dtype=torch.float32)
    src, dst = [], []
    for size, w in zip(crop.shape[1:], window):
        n = min(int(size), int(w))
        a = (int(size) - n) // 2
        b = (int(w) - n) // 2
        src.append(slice(a, a + n))
        dst.append(slice(b, b + n))
    out[(0, slice(None), *dst)] = crop[(slice(None), *src)].float()
    return out


def segment_array(
    model,
    array: np.ndarray,
    ijk_to_ras: np.ndarray,
    roi: ROI | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """Segment a Slicer volume array: ``array`` in ``arrayFromVolume`` order ``(k, j, i)``, its 4x4
    IJK-to-RAS matrix. Returns the ``(k, j, i)`` label map (same shape); ``kwargs`` go to
    :func:`segment_volume`."""
    array = np.asarray(array)
    require_3d(array, "volume array", allow_channels=True)
    geometry = Geometry.from_ijk_to_ras(ijk_to_ras, array.shape[-3:])
    return segment_volume(model, array, geometry, roi=roi, **kwargs).labels


def segment_file(
    model,
    image_path: str | os.PathLike | Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    roi: ROI | None = None,
    mirror: bool | Sequence[int] = False,
    overlap: float | None = None,
    device: str | torch.device | None = "auto",
    probabilities_path: str | os.PathLike | None = None,
    reporter=None,
    **kwargs: Any,
) -> SegmentationResult:
    """Segment an image file (or one file per channel) and write the label map on its exact grid.

    Args:
        model: a model path (see :func:`ReCoKDLib.models.loading.load_model`) or a ``LoadedModel``.
        image_path: NIfTI/NRRD/MHA file or DICOM folder, or a list of them (one per channel).
        out_path: label map file (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``).
        probabilities_path: optional ``(K, D, H, W)`` float32 probability image (vector pixels).
    """
    from ReCoKDLib.data.io import ImageReadError, check_same_grid, image_suffix, read_image, write_image
    from ReCoKDLib.models.base import LoadedModel
    from ReCoKDLib.models.loading import load_model

    for target in (out_path, probabilities_path):
        if target is not None and image_suffix(target) not in (".nii.gz", ".nii", ".nrrd", ".mha"):
            raise ImageReadError(f"cannot write {target}: use one of .nii.gz, .nii, .nrrd, .mha (single-file formats)")
    if not isinstance(model, LoadedModel):
        model = load_model(model, device="cpu")
    paths = [image_path] if isinstance(image_path, (str, os.PathLike)) else list(image_path)
    arrays, geometry = [], None
    for path in paths:
        array, geo = read_image(path)
        if geometry is not None:
            check_same_grid(geometry, geo, arrays[0].shape, array.shape, str(paths[0]), str(path))
        geometry = geometry or geo
        arrays.append(as_channels(array, str(path)))
    image = np.concatenate(arrays, axis=0)
    result = segment_volume(model, image, geometry, roi=roi, mirror=mirror, overlap=overlap, device=device,
                            return_probabilities=probabilities_path is not None, reporter=reporter, **kwargs)
    write_image(result.labels, geometry, out_path)
    if probabilities_path is not None:
        write_image(result.probabilities.astype(np.float32), geometry, probabilities_path)
    result.info["out_path"] = str(Path(out_path))
    return result
