"""Evaluate models on a test set: per-class Dice and HD95, size, FLOPs, CPU latency, and a report.

Metrics (MONAI ``compute_dice`` and ``compute_hausdorff_distance(percentile=95)``) are computed
per foreground class on the exact grid of each test label, HD95 in millimetres (the label's
spacing). Undefined cases are explicit, never NaN:

=======================  ==========  ===========
prediction vs reference  Dice        HD95
=======================  ==========  ===========
both empty               1.0         0.0
one of them empty        0.0         ``None`` (null in JSON: no surface to measure from)
both present             MONAI       MONAI (mm)
=======================  ==========  ===========

Means over cases skip ``None``; a class with no defined value has mean ``None``. ``mean_dice`` is
the mean over foreground classes of the per-class means.

**Classes are matched by name**, not by label value: a reference label map numbered differently
from the model (liver = 5 in the reference, 1 in the model) is renumbered through the names of the
model card's ``classes`` and the reference's label table (a dataset's ``dataset.json`` ``labels``,
a ``reference_labels`` table, or the segment names a Slicer ``.seg.nrrd`` carries), compared
without case and with spaces, hyphens and underscores alike. A model class the reference does not
name is refused (its Dice would be meaningless); reference classes the model does not have count
as background, with a warning. Without any label table the values are taken to be the model's,
with a warning.

:func:`evaluate_models` writes ``metrics.json`` (one entry per model, see its docstring) and a
self-contained ``report.html`` (PNG figures embedded as base64, also written under ``figures/``):
a table, loss curves when training logs are given, and overlays of prediction vs label on a few
slices per model.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import statistics
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ReCoKDLib.data.io import InputWarning
from ReCoKDLib.models.base import InferenceError

__all__ = [
    "EvaluationError",
    "EvaluationWarning",
    "class_lookup",
    "reference_label_table",
    "read_label_table",
    "dice_hd95",
    "evaluate_models",
    "load_loss_curves",
    "write_report",
]


class EvaluationError(ValueError):
    """Evaluation cannot run: no models or cases, mismatched label grids or class names, unreadable logs."""


class EvaluationWarning(InputWarning):
    """Reference classes left out of the scores, or a reference without class names."""


# --------------------------------------------------------------------------------------------
# Class names: the model's classes against the reference's label table


def _key(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def class_lookup(model_classes: Sequence[str], reference: Mapping[str, int], where: str = "the reference"
                 ) -> tuple[np.ndarray, list[str]]:
    """Renumbering of reference label values into the model's class ids, matched by name.

    Args:
        model_classes: the card's class names, index = class id, ``[0]`` the background.
        reference: ``{name: label value}`` of the reference label maps (value 0 = background).
        where: how messages name the reference.

    Returns:
        ``(lookup, dropped)``: ``lookup[v]`` is the model class id of reference value ``v`` (0 for
        background and for classes the model does not have), ``dropped`` the reference names that
        count as background.

    Raises:
        EvaluationError: a model class has no reference class of the same name, or two names collide.
    """
    by_key: dict[str, tuple[str, int]] = {}
    for name, value in reference.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise EvaluationError(f"{where}: label {name!r} must have a non-negative integer value; got {value!r}")
        key = _key(name)
        if key in by_key and by_key[key][1] != int(value):
            raise EvaluationError(f"{where}: labels {by_key[key][0]!r} and {name!r} cannot be told apart by name")
        by_key[key] = (str(name), int(value))
    missing = [c for c in model_classes[1:] if _key(c) not in by_key]
    if missing:
        named = [n for n, v in sorted(by_key.values(), key=lambda nv: nv[1]) if v]
        raise EvaluationError(
            f"the model's classes {missing} are not in {where}'s label table {named}: Dice cannot be computed for "
            "classes the reference does not name. Give a reference with the model's class names (or a label table "
            "that names its values: recokd evaluate --reference-labels)")
    lookup = np.zeros(max([v for _, v in by_key.values()] + [0]) + 1, dtype=np.int64)
    model_ids = {_key(c): i for i, c in enumerate(model_classes)}
    dropped = []
    for key, (name, value) in by_key.items():
        if value == 0:
            continue
        if key in model_ids:
            lookup[value] = model_ids[key]
        else:
            dropped.append(name)
    return lookup, dropped


def read_label_table(source: str | os.PathLike | Mapping[str, int] | Sequence[str]) -> dict[str, int]:
    """A reference label table ``{name: value}`` from a mapping, a list of names (index = value),
    a JSON text or file holding either, or a ``dataset.json`` (its ``labels``)."""
    data: Any = source
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        path = Path(text).expanduser()
        try:
            data = json.loads(path.read_text() if path.is_file() else text)
        except (OSError, json.JSONDecodeError) as exc:
            raise EvaluationError(f"reference labels {text!r} are neither a JSON file nor JSON text: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("labels"), dict):
        data = data["labels"]
    if isinstance(data, (list, tuple)):
        data = {str(n): i for i, n in enumerate(data)}
    if not isinstance(data, Mapping):
        raise EvaluationError(f"reference labels must map names to values ({{\"liver\": 1, ...}}) or list the names; "
                              f"got {type(data).__name__}")
    return {str(k): v for k, v in data.items() if str(k) != "ignore" and not isinstance(v, (list, tuple))}


def reference_label_table(label_path: str | os.PathLike) -> dict[str, int] | None:
    """The segment names and label values a Slicer segmentation file (``.seg.nrrd``: ``SegmentN_Name``,
    ``SegmentN_LabelValue``) carries, or ``None`` (other files; the header only is read)."""
    from ReCoKDLib.data.io import read_header

    reader = read_header(label_path) if str(label_path).lower().endswith(".nrrd") else None
    if reader is None:
        return None
    keys = set(reader.GetMetaDataKeys())
    table, n = {}, 0
    while f"Segment{n}_Name" in keys and f"Segment{n}_LabelValue" in keys:
        try:
            table[reader.GetMetaData(f"Segment{n}_Name")] = int(reader.GetMetaData(f"Segment{n}_LabelValue"))
        except ValueError:
            return None
        n += 1
    if not table:
        return None
    return {"background": 0, **table}


# --------------------------------------------------------------------------------------------
# Metrics


def dice_hd95(
    prediction: np.ndarray,
    reference: np.ndarray,
    num_classes: int,
    spacing: Sequence[float] | None = None,
    ignored: np.ndarray | None = None,
) -> tuple[list[float], list[float | None]]:
    """Per foreground class Dice and HD95 of two ``(D, H, W)`` label maps.

    Args:
        prediction, reference: integer label maps on the same grid.
        num_classes: ``K`` (background included); classes ``1..K-1`` are scored.
        spacing: ``(D, H, W)`` voxel size in mm for HD95 (voxels when ``None``).
        ignored: ``(D, H, W)`` bool, voxels that count nowhere (nnU-Net's ignore label): both maps
            are set to background there before scoring.

    Returns:
        ``(dice, hd95)``, each a list of ``K - 1`` values (see the module table for empty classes).
    """
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance
    from monai.networks.utils import one_hot

    prediction, reference = np.asarray(prediction), np.asarray(reference)
    if prediction.shape != reference.shape or prediction.ndim != 3:
        raise EvaluationError(f"prediction {prediction.shape} and reference {reference.shape} must be (D, H, W) on one grid")
    if ignored is not None:
        ignored = np.asarray(ignored, bool)
        prediction, reference = np.where(ignored, 0, prediction), np.where(ignored, 0, reference)
    p = one_hot(torch.as_tensor(prediction.astype(np.int64))[None, None], num_classes)
    r = one_hot(torch.as_tensor(reference.astype(np.int64))[None, None], num_classes)
    dice = compute_dice(p, r, include_background=False, ignore_empty=False)[0].tolist()
    present_p = p[0, 1:].flatten(1).any(dim=1).tolist()
    present_r = r[0, 1:].flatten(1).any(dim=1).tolist()
    both = [a and b for a, b in zip(present_p, present_r)]
    hd = [None] * (num_classes - 1)
    if any(both):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = compute_hausdorff_distance(
                p, r, include_background=False, percentile=95,
                spacing=None if spacing is None else [float(s) for s in spacing])[0].tolist()
        hd = [float(v) if ok and np.isfinite(v) else None for v, ok in zip(values, both)]
    for c in range(num_classes - 1):
        if not present_p[c] and not present_r[c]:
            dice[c], hd[c] = 1.0, 0.0
        dice[c] = float(dice[c]) if np.isfinite(dice[c]) else 0.0
    return dice, hd


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


# --------------------------------------------------------------------------------------------
# Cases


def _case_fields(case: Any) -> tuple[str, list[Path], Path]:
    """(case_id, image paths, label path) of a ``layout.Case`` or a ``(id, image(s), label)`` tuple."""
    if hasattr(case, "image_paths"):
        case_id, images, label = case.case_id, case.image_paths, case.label_path
    else:
        try:
            case_id, images, label = case
        except (TypeError, ValueError):
            raise EvaluationError(f"a test case is a layout.Case or (case_id, image path(s), label path); got {case!r}") from None
    if label is None:
        raise EvaluationError(f"test case {case_id} has no label; evaluation needs reference labels")
    images = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    return str(case_id), [Path(p) for p in images], Path(label)


def _read_case(images: list[Path], label_path: Path):
    from ReCoKDLib.data.io import check_same_grid, read_image
    from ReCoKDLib.data.preprocess import as_channels

    arrays, geometry = [], None
    for path in images:
        array, geo = read_image(path)
        geometry = geometry or geo
        arrays.append(as_channels(array, str(path)))
    label, label_geometry = read_image(label_path, allow_channels=False)
    check_same_grid(geometry, label_geometry, arrays[0].shape, label.shape, str(images[0]), str(label_path))
    return np.concatenate(arrays, axis=0), label, geometry


def _renumber(label: np.ndarray, classes: Sequence[str], label_path: Path, model_name: str,
              reference_labels: Mapping[str, int] | None, told: set[str]) -> np.ndarray:
    """The reference ``label`` in the model's class ids (matched by name; see the module docstring)."""
    import warnings

    table = reference_label_table(label_path) or reference_labels
    label = np.asarray(label)
    values = np.unique(label)
    if table is None:
        if "unnamed" not in told:
            told.add("unnamed")
            warnings.warn(EvaluationWarning(
                f"the reference labels ({label_path}) come without class names: their values are taken to be the "
                f"model's class ids {dict(enumerate(classes))}; give --reference-labels to match them by name"),
                stacklevel=3)
        if int(values.max()) >= len(classes) or int(values.min()) < 0:
            raise EvaluationError(
                f"label {label_path} holds values up to {int(values.max())} but model {model_name!r} has classes {classes}")
        return label
    lookup, dropped = class_lookup(classes, table, f"the reference {label_path}")
    unknown = [int(v) for v in values if v < 0 or v >= len(lookup) or (v and v not in table.values())]
    if unknown:
        raise EvaluationError(f"label {label_path} holds values {unknown[:10]} that its label table "
                              f"{table} does not name")
    if dropped and f"dropped:{model_name}" not in told:
        told.add(f"dropped:{model_name}")
        warnings.warn(EvaluationWarning(
            f"model {model_name!r} has no class {dropped}: those reference labels count as background"), stacklevel=3)
    lookup = lookup.astype(np.min_scalar_type(len(classes) - 1))
    return lookup[label if np.issubdtype(label.dtype, np.integer) else label.astype(np.int64)]


# --------------------------------------------------------------------------------------------
# Figures


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def load_loss_curves(path: str | os.PathLike) -> dict[str, tuple[list[float], list[float]]]:
    """Loss curves ``{name: (steps, values)}`` from a training log.

    Reads JSON lines of progress events (``recokd ... --progress json``: ``event == "progress"``
    with ``step`` and ``losses``), or a JSON list of records (or ``{"history": [...]}``) with
    ``step``/``epoch`` and either a ``losses`` dict or numeric ``*loss*`` fields.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise EvaluationError(f"cannot read training log {path}: {exc}") from None
    try:
        data = json.loads(text)
        records = data.get("history", []) if isinstance(data, dict) else data
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"training log {path} is neither JSON nor JSON lines: {exc}") from None
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for n, record in enumerate(records if isinstance(records, list) else []):
        if not isinstance(record, dict) or record.get("event", "progress") != "progress":
            continue
        step = record.get("step", record.get("epoch", n))
        losses = record.get("losses")
        if not isinstance(losses, dict):
            losses = {k: v for k, v in record.items() if "loss" in k and isinstance(v, (int, float))}
        for name, value in losses.items():
            if isinstance(value, (int, float)) and step is not None and np.isfinite(value):
                xs, ys = curves.setdefault(name, ([], []))
                xs.append(float(step))
                ys.append(float(value))
    return curves


def _loss_figure(logs: Mapping[str, Any]) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    series = {name: load_loss_curves(path) for name, path in logs.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
    for ax, (model, curves) in zip(axes[0], series.items()):
        for name, (xs, ys) in curves.items():
            ax.plot(xs, ys, label=name)
        ax.set_title(model)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    return _png(fig)


def _slicer_overlay(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, geometry, classes,
                    cache: list) -> bytes | None:
    """The prediction (fill) and label (outline) drawn by 3D Slicer's own slice views
    (:func:`ReCoKDLib.mrml.views.render_overlay_png`); ``None`` without the ``render`` extra or
    when offscreen rendering fails (the matplotlib figure is used instead). ``cache`` keeps the
    offscreen scene between calls."""
    try:
        from ReCoKDLib.mrml.views import OffscreenViews, render_overlay_png
    except ImportError:
        return None
    try:
        if not cache:
            cache.append(OffscreenViews(size=(320, 320)))
        return render_overlay_png(image, geometry, prediction, label, classes, views=cache[0])
    except Exception as exc:  # noqa: BLE001 - a picture must never fail an evaluation (e.g. no EGL driver)
        warnings.warn(f"Slicer offscreen rendering failed ({exc}); the report uses matplotlib pictures", stacklevel=2)
        return None


def _overlay_figure(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, geometry, title: str, n_slices: int = 3) -> bytes:
    """Slices ``k`` of ``(D, H, W)`` arrays in radiological display (anterior up, patient's right on
    the left) when the volume is roughly axial, with the prediction filled and the label outlined."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    foreground = np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1))
    if foreground.size == 0:
        foreground = np.arange(label.shape[0])
    picks = sorted(set(int(foreground[int(q * (foreground.size - 1))]) for q in np.linspace(0.2, 0.8, n_slices)))
    k = int(max(label.max(), prediction.max())) + 1
    colors = plt.get_cmap("tab10" if k <= 10 else "tab20")(np.arange(max(k, 2)) % (10 if k <= 10 else 20))
    colors[0, 3] = 0.0
    cmap = ListedColormap(colors)
    lo, hi = np.percentile(image, [1, 99])
    aspect = geometry.spacing[1] / geometry.spacing[0]
    code = geometry.orientation_code()
    flip_rows, flip_cols = code[1] == "A", code[0] == "R"

    def show(a):
        a = a[::-1] if flip_rows else a
        return a[:, ::-1] if flip_cols else a

    fig, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 4), squeeze=False)
    for ax, z in zip(axes[0], picks):
        ax.imshow(show(image[z]), cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        ax.imshow(show(prediction[z]), cmap=cmap, vmin=0, vmax=max(k, 2) - 1, alpha=0.45, aspect=aspect, interpolation="nearest")
        for c in np.unique(label[z])[1:]:
            edge = colors[c].copy()
            edge[3] = 1.0
            ax.contour(show(label[z] == c), levels=[0.5], colors=[edge], linewidths=1.6)
        ax.set_title(f"{title}: slice {z}", fontsize=9)
        ax.axis("off")
    return _png(fig)


# --------------------------------------------------------------------------------------------
# The job


def _latency(model, image, geometry, repeats: int, overlap: float | None, amp: bool = False,
             inference: Mapping[str, Any] | None = None) -> float | None:
    """Median seconds of a whole-volume ``segment_volume`` on the CPU, through the backend layer
    (``inference``: ``backend``/``precision``/``window``/``restore``; ``amp``: bf16 only)."""
    from ReCoKDLib.infer import segment_volume

    if repeats <= 0:
        return None
    options = dict(inference or {})
    if amp:
        from ReCoKDLib.models.backends import cpu_supports_bf16

        if not cpu_supports_bf16() or options.get("backend") == "onnxruntime":
            return None  # no bf16 here
        options["precision"] = "bf16"
    try:
        times = [segment_volume(model, image, geometry, overlap=overlap, device="cpu", **options).seconds
                 for _ in range(repeats)]
    except InferenceError:
        if not amp:
            raise
        return None  # bf16 changes this model's classes on the scan (refused by the backend layer): no bf16 latency
    return float(statistics.median(times))


def _ignored_voxels(card: Any, label: np.ndarray) -> np.ndarray | None:
    """``(D, H, W)`` bool where ``label`` holds the ignore label of the model's card (nnU-Net
    ``"ignore"``), or ``None`` when the card has no ignore label."""
    from ReCoKDLib.nnunet.labels import label_spec_from_card

    spec = label_spec_from_card(card)
    if spec is None or spec.ignore_label is None:
        return None
    return np.asarray(label) == spec.ignore_label


def evaluate_models(
    models: Mapping[str, Any],
    cases: Sequence[Any],
    out_dir: str | os.PathLike,
    *,
    device: str = "auto",
    overlap: float | None = None,
    mirror: bool = False,
    latency_repeats: int = 3,
    training_logs: Mapping[str, str | os.PathLike] | None = None,
    overlay_slices: int = 3,
    reporter=None,
    reference_labels: Mapping[str, int] | Sequence[str] | str | os.PathLike | None = None,
    inference: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate every model on every case; write ``metrics.json`` and ``report.html`` in ``out_dir``.

    Args:
        models: ``{name: model path or LoadedModel}`` (e.g. ``teacher``, ``student``, ``distilled``).
        cases: ``layout.Case`` objects (``case_id``, ``image_paths``, ``label_path``) or
            ``(case_id, image path(s), label path)`` tuples.
        device: where the evaluation inference runs; latency is always measured on the CPU.
        overlap, mirror: sliding-window settings of the evaluation runs (``overlap=None``: each model card's,
            else 0.5).
        inference: ``backend``, ``precision``, ``window``, ``restore`` of every run
            (:func:`ReCoKDLib.infer.segment_volume`; default: auto, the fastest agreeing backend).
        latency_repeats: whole-volume CPU runs on the first case; the median is reported (0: skip).
        training_logs: ``{name: training log}`` for the loss curves (see :func:`load_loss_curves`).
        reference_labels: the label table ``{name: value}`` of the reference label maps (see
            :func:`read_label_table`; a dataset's ``labels``); a ``.seg.nrrd`` reference's own segment
            names win. Classes are matched by these names (module docstring).

    Returns:
        The ``metrics.json`` content: ``{name: {"dice": {class: mean}, "mean_dice": v, "hd95":
        {class: mean mm}, "mean_hd95": v, "params": n, "flops": n (one forward pass on the card's
        patch), "latency_s": v (the inference settings), "latency_bf16_s": v (bf16; null without bf16), "patch_size": [...], "classes": [...], "kind": ..., "source": ...,
        "cases": {case_id: {"dice": {...}, "hd95": {...}, "seconds": s}}}}``; undefined values are null.
    """
    from ReCoKDLib.checkpoint import atomic_write_text
    from ReCoKDLib.infer import segment_volume
    from ReCoKDLib.networks import count_flops, count_parameters
    from ReCoKDLib.teachers import LoadedModel, load_model

    if not models:
        raise EvaluationError("no model to evaluate; give at least one NAME=PATH")
    case_list = [_case_fields(c) for c in cases]
    if not case_list:
        raise EvaluationError("no test case to evaluate on (a dataset's test cases need labels: labelsTs)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if reference_labels is not None:
        reference_labels = read_label_table(reference_labels)
    told: set[str] = set()  # warnings already given
    total = len(models) * len(case_list)
    if reporter is not None:
        reporter.start("evaluate", total=total)

    results: dict[str, dict[str, Any]] = {}
    overlays: dict[str, bytes] = {}
    slicer_views: list = []  # one offscreen Slicer scene for every model's picture (render extra)
    step = 0
    for name, source in models.items():
        model = source if isinstance(source, LoadedModel) else load_model(source, device="cpu")
        classes = list(model.card.classes)
        per_case: dict[str, Any] = {}
        first = None
        for case_id, images, label_path in case_list:
            image, label, geometry = _read_case(images, label_path)
            ignored = _ignored_voxels(model.card, label)
            if ignored is not None:
                label = np.where(ignored, 0, label)
            label = _renumber(label, classes, label_path, name, reference_labels, told)
            result = segment_volume(model, image, geometry, mirror=mirror, overlap=overlap, device=device,
                                    **dict(inference or {}))
            spacing_dhw = tuple(reversed(geometry.spacing))
            dice, hd = dice_hd95(result.labels, label, len(classes), spacing_dhw, ignored)
            per_case[case_id] = {
                "dice": dict(zip(classes[1:], dice)), "hd95": dict(zip(classes[1:], hd)), "seconds": result.seconds}
            if first is None:
                first = (image, label, geometry, result.labels)
            step += 1
            if reporter is not None:
                reporter.progress("evaluate", step, total, message=f"{name} {case_id}")
        dice_mean = {c: _mean([per_case[k]["dice"][c] for k in per_case]) for c in classes[1:]}
        hd_mean = {c: _mean([per_case[k]["hd95"][c] for k in per_case]) for c in classes[1:]}
        network = model.network
        try:
            flops = count_flops(network.to("cpu"), model.card.patch_size, model.card.in_channels)
        except Exception:  # noqa: BLE001 - FLOP counting is best effort for foreign (TorchScript) code
            flops = None
        image, label, geometry, prediction = first
        results[name] = {
            "dice": dice_mean,
            "mean_dice": _mean(list(dice_mean.values())),
            "hd95": hd_mean,
            "mean_hd95": _mean(list(hd_mean.values())),
            "params": int(count_parameters(network)),
            "flops": flops,
            "latency_s": _latency(model, image, geometry, latency_repeats, overlap, inference=inference),
            "latency_bf16_s": _latency(model, image, geometry, latency_repeats, overlap, amp=True, inference=inference),
            "latency_repeats": latency_repeats,
            "patch_size": list(model.card.patch_size),
            "classes": classes,
            "kind": model.kind,
            "source": model.source,
            "cases": per_case,
        }
        overlays[name] = (_slicer_overlay(image[0], label, prediction, geometry, classes, slicer_views)
                          or _overlay_figure(image[0], label, prediction, geometry, name, overlay_slices))
        if reporter is not None:
            reporter.metrics("evaluate", {"model": name, "mean_dice": results[name]["mean_dice"], "dice": dice_mean})

    metrics_path = atomic_write_text(out_dir / "metrics.json", json.dumps(results, indent=2, sort_keys=False) + "\n")
    loss_png = _loss_figure(training_logs) if training_logs else None
    report = write_report(results, out_dir, overlays=overlays, loss_curves=loss_png)
    if reporter is not None:
        reporter.done("evaluate", path=str(report), message=f"wrote {metrics_path} and {report}")
    return results


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_report(
    results: Mapping[str, Mapping[str, Any]],
    out_dir: str | os.PathLike,
    overlays: Mapping[str, bytes] | None = None,
    loss_curves: bytes | None = None,
) -> Path:
    """Write ``report.html`` (self-contained: figures as base64 PNG) and the PNGs under ``figures/``."""
    from ReCoKDLib.checkpoint import atomic_write_bytes, atomic_write_text

    out_dir = Path(out_dir)
    figures = out_dir / "figures"
    classes = next(iter(results.values()))["dice"].keys() if results else []

    def img(png: bytes, name: str, alt: str) -> str:
        atomic_write_bytes(figures / name, png)
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'

    head = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
    rows = []
    for name, r in results.items():
        cells = "".join(f"<td>{_fmt(r['dice'].get(c))}</td>" for c in classes)
        gflops = None if r.get("flops") is None else r["flops"] / 1e9
        params = r["params"] / 1e6
        rows.append(
            f"<tr><th>{html.escape(name)}</th><td><b>{_fmt(r['mean_dice'])}</b></td>{cells}"
            f"<td>{_fmt(r['mean_hd95'], 1)}</td><td>{params:.2f}</td><td>{_fmt(gflops, 2)}</td>"
            f"<td>{_fmt(r.get('latency_s'), 2)}</td><td>{_fmt(r.get('latency_bf16_s'), 2)}</td></tr>")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>ReCoKD evaluation</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}</style></head><body>",
        "<h1>ReCoKD evaluation</h1>",
        "<h2>Dice per class (mean over test cases), HD95, size and CPU latency</h2>",
        f"<table><tr><th>model</th><th>mean Dice</th>{head}<th>mean HD95 (mm)</th><th>params (M)</th>"
        f"<th>GFLOPs / patch</th><th>CPU latency fp32 (s)</th><th>CPU latency bf16 (s)</th></tr>{''.join(rows)}</table>",
        "<p>Dice of a class absent from both prediction and label is 1, HD95 0; HD95 is undefined (–) when "
        "one of them is empty. Latency: median whole-volume run (preprocessing, sliding window, restore) on "
        "the CPU, in float32 and with bf16 autocast.</p>",
    ]
    if loss_curves is not None:
        parts += ["<h2>Loss curves</h2>", img(loss_curves, "loss_curves.png", "loss curves")]
    if overlays:
        parts.append("<h2>Prediction (colour) vs label (contours)</h2>")
        for n, (name, png) in enumerate(overlays.items()):
            parts += [f"<h3>{html.escape(name)}</h3>", img(png, f"overlay_{n}_{_safe(name)}.png", f"overlay {name}")]
    parts.append("</body></html>")
    return atomic_write_text(out_dir / "report.html", "\n".join(parts) + "\n")


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
