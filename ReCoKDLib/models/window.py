"""The inference window: as large as memory allows when the network is fully convolutional.

A U-Net trained on ``16 x 96 x 96`` patches runs on any input whose sizes are multiples of its
total stride. Sliding a training-patch window with overlap 0.5 computes every voxel about 8 times
(3D); one window over the whole scan computes it once. :func:`choose_window` picks, for a
preprocessed volume, the window that covers it in as few windows as the free memory allows:

1. the volume's size rounded up to the network's size step (:func:`size_step`), never below the
   training patch;
2. while the estimated peak memory (:func:`activation_bytes_per_voxel` times the window's voxels)
   is above ``budget`` (half the available memory by default), the longest axis (relative to the
   patch) shrinks by one step, down to the patch.

Networks that normalise over the window (instance or group normalisation, as nnU-Net-like U-Nets
and HD-BET do) are *not* window-independent: their statistics, and so their labels, change with the
window (:func:`window_dependent_layer`; measured on the demo's CT teacher: Dice 0.60 between the
whole-scan window and the training patch). They keep the training patch, as do networks whose size
step is unknown (TorchScript, foreign entry points) and nnU-Net folders (whose inference reproduces
``nnUNetPredictor``); ``--window`` overrides.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ReCoKDLib.models.base import InferenceError, LoadedModel

__all__ = ["size_step", "activation_bytes_per_voxel", "available_memory_bytes", "choose_window", "check_window"]

#: share of the available memory the window's activations may take
MEMORY_SHARE = 0.5


def size_step(model: LoadedModel) -> tuple[int, int, int] | None:
    """The multiple every window size must be (``(D, H, W)``), or ``None`` when unknown."""
    card = model.card
    arch = card.architecture or {}
    if arch.get("kind") == "dynunet":
        from ReCoKDLib.networks import UNetConfig

        return tuple(int(d) for d in UNetConfig.from_dict(dict(arch.get("config", {}))).divisor)  # type: ignore[return-value]
    if arch.get("kind") == "preset":  # PresetNetwork pads inputs itself; keep its multiple for efficiency
        pad = getattr(model.network, "pad_multiple", None)
        return tuple(int(p) for p in pad) if pad else None  # type: ignore[return-value]
    if getattr(model, "kind", None) == "onnx":
        multiple = (card.provenance.get("export") or {}).get("spatial_multiple")
        return tuple(int(m) for m in multiple) if multiple else None  # type: ignore[return-value]
    return None


#: layers whose output depends on the whole window (statistics over space), by class name
_WINDOW_DEPENDENT = ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "GroupNorm", "LayerNorm")


def window_dependent_layer(model: LoadedModel) -> str | None:
    """The class name of the first layer whose output depends on the window's extent (instance or
    group normalisation over space), or ``None`` when the network is fully convolutional.

    Measured (``benchmarks/segment_speed.py``, the demo's CT teacher, instance norm): one window over
    the whole S1 scan instead of its 16 x 96 x 96 training patch gives labels with mean Dice 0.60
    against the patch-window result, so such networks keep their training patch.
    """
    network = getattr(model, "network", None)
    if getattr(model, "kind", None) in ("onnx", "torchscript") or network is None:
        arch = (model.card.architecture or {}) if hasattr(model, "card") else {}
        if arch.get("kind") == "dynunet" and (arch.get("config") or {}).get("norm") == "batch":
            return None  # an exported batch-norm U-Net: fixed statistics, fully convolutional
        return "InstanceNorm3d" if arch.get("kind") in ("dynunet", "nnunet", "preset") or arch.get("graph") else "unknown layers"
    for layer in network.modules():
        name = type(layer).__name__
        if name in _WINDOW_DEPENDENT:
            # LayerNorm over channels only (transformers) does not depend on the window; over space it does
            if name == "LayerNorm" and len(getattr(layer, "normalized_shape", ())) <= 1:
                continue
            return name
    return None


def activation_bytes_per_voxel(model: LoadedModel) -> float:
    """Bytes of layer outputs per input voxel of one forward pass (a generous peak estimate: the sum
    of every leaf module's output, measured once on the card's patch with forward hooks)."""
    from ReCoKDLib.models.backends import _runner_cache

    memo = _runner_cache(model)
    cached = memo.get("_bytes_per_voxel")
    if cached is not None:
        return cached
    network = model.network
    if getattr(model, "kind", None) == "onnx" or not any(True for _ in network.modules()):
        arch = model.card.architecture or {}
        if arch.get("kind") != "dynunet":
            return 4.0 * 256  # unknown graph: assume 256 fp32 values per voxel
        from ReCoKDLib.networks import UNetConfig, build_unet

        network = build_unet(UNetConfig.from_dict(dict(arch["config"]))).eval()
    total = [0]

    def hook(_module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            total[0] += output.numel() * output.element_size()

    leaves = [m for m in network.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    patch = [int(p) for p in model.card.patch_size]
    try:
        with torch.no_grad():
            network(torch.zeros((1, model.card.in_channels, *patch), device=next(network.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    value = max(total[0] / math.prod(patch), 4.0)
    memo["_bytes_per_voxel"] = value
    return value


def available_memory_bytes() -> int:
    """Memory this process may still use: ``MemAvailable``, bounded by a cgroup limit when there is one."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < (1 << 60):
            room = max(0, int(limit) - usage)
            available = room if available is None else min(available, room)
    if available is None:
        available = 8 << 30
    return int(available)


def check_window(window: Sequence[int], step: Sequence[int] | None) -> tuple[int, int, int]:
    """``window`` as 3 positive ints, each a multiple of ``step`` when known."""
    values = tuple(int(w) for w in window)
    if len(values) != 3 or min(values) < 1:
        raise InferenceError(f"a window is 3 positive sizes D, H, W; got {tuple(window)}")
    if step is not None and any(w % s for w, s in zip(values, step)):
        raise InferenceError(f"window {values} is not a multiple of the network's size step {tuple(step)} "
                             f"(its total stride) on every axis")
    return values  # type: ignore[return-value]


def choose_window(model: LoadedModel, shape: Sequence[int], requested: Sequence[int] | str | None = "auto", *,
                  budget_bytes: int | None = None) -> tuple[tuple[int, int, int], dict[str, Any]]:
    """The window for a preprocessed volume of ``shape`` ``(D, H, W)`` (see the module docstring).

    Args:
        requested: ``"auto"``/``None`` (choose), ``"patch"`` (the card's training patch), or 3 sizes.
        budget_bytes: memory the window's activations may take (default: half the available memory).

    Returns:
        ``(window, info)``; ``info`` says how it was chosen (``how``, ``bytes_per_voxel``,
        ``budget_bytes``, ``estimated_bytes``).
    """
    patch = tuple(int(p) for p in model.card.patch_size)
    step = size_step(model)
    if requested not in (None, "auto"):
        if requested == "patch":
            return patch, {"how": "the card's training patch (asked for)"}  # type: ignore[return-value]
        window = check_window(requested, step)  # type: ignore[arg-type]
        return window, {"how": "asked for (--window)"}
    kind = getattr(model, "kind", None)
    norm = window_dependent_layer(model)
    if norm is not None:
        return patch, {"how": f"the card's training patch: the network normalises over the window ({norm}), so a "  # type: ignore[return-value]
                              f"larger window changes its statistics and its answer; --window overrides"}
    if step is None or kind == "nnunet":
        why = "nnU-Net folder: nnU-Net's own patch" if kind == "nnunet" else \
            "the network's size step is unknown (not a built-in or preset network): the card's patch"
        return patch, {"how": why}  # type: ignore[return-value]
    budget = int(budget_bytes if budget_bytes is not None else MEMORY_SHARE * available_memory_bytes())
    per_voxel = activation_bytes_per_voxel(model)
    window = [max(p, int(math.ceil(s / st)) * st) for s, p, st in zip(shape, patch, step)]
    window = [max(w, st) for w, st in zip(window, step)]

    def estimate(w: Sequence[int]) -> int:
        return int(per_voxel * math.prod(w))

    while estimate(window) > budget:
        shrinkable = [a for a in range(3) if window[a] - step[a] >= patch[a]]
        if not shrinkable:
            break
        axis = max(shrinkable, key=lambda a: window[a] / patch[a])
        window[axis] -= step[axis]
    info = {"how": "largest window covering the volume that the free memory allows", "bytes_per_voxel": round(per_voxel, 1),
            "budget_bytes": budget, "estimated_bytes": estimate(window), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}
    return tuple(window), info  # type: ignore[return-value]
