"""What every model loader and every inference path share: the loaded model, its errors, devices,
network outputs and the segmentation result.

This module imports nothing else of ReCoKD's model or inference layers, so loaders (below
inference) and inference (above them) both depend on it without an import running back up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ReCoKDLib.checkpoint import CheckpointError, ModelCard
from ReCoKDLib.data.io import Geometry

__all__ = [
    "ModelLoadError",
    "InferenceError",
    "LoadedModel",
    "SegmentationResult",
    "resolve_device",
    "network_logits",
]

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


class ModelLoadError(CheckpointError):
    """A model cannot be loaded: unknown kind, bad entry point, weights that do not fit, class mismatch."""


class InferenceError(ValueError):
    """Segmentation cannot run on this input (shapes, ROI, classes, device, backend)."""


@dataclass
class LoadedModel:
    """A network ready for inference or distillation.

    Attributes:
        network: the module, in eval mode, on the requested device.
        card: how to feed it (classes, spacing, normalisation, patch size).
        kind: ``"recokd"``, ``"torchscript"``, ``"entry_point"``, ``"nnunet"`` or ``"onnx"``.
        source: the file it came from.
        runners: inference runners already prepared for this model (backend, window, device), so a
            Slicer session, a web server or a batch prepares each one once
            (:func:`ReCoKDLib.models.backends.prepare_runner`).
    """

    network: nn.Module
    card: ModelCard
    kind: str
    source: str = ""
    runners: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def feature_kd(self) -> bool:
        """Whether intermediate features can be tapped (eager modules); TorchScript and ONNX: logits only."""
        return self.kind not in ("torchscript", "onnx")


@dataclass
class SegmentationResult:
    """What ``segment_volume`` returns.

    Attributes:
        labels: ``(D, H, W)`` uint8 (uint16 above 255 classes) on the exact input grid.
        probabilities: ``(K, D, H, W)`` float32 class probabilities, or ``None``; for a model with
            nnU-Net region-based labels (card ``label_spec``) ``(R, D, H, W)`` region probabilities
            (sigmoid), ``labels`` then painted in ``regions_class_order`` (later regions overwrite).
        geometry: the input geometry (also that of ``labels``).
        class_names: the card's classes, index = label value.
        seconds: wall time of the whole call.
        roi_box: the computed box ``((k0, k1), (j0, j1), (i0, i1))`` on the input grid, or ``None``.
        device: where the network ran.
        info: how it ran (backend and why, window, overlap, mirroring, restore mode, seconds per stage).
    """

    labels: np.ndarray
    probabilities: np.ndarray | None
    geometry: Geometry
    class_names: list[str]
    seconds: float
    roi_box: Box | None = None
    device: str = "cpu"
    info: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` -> CUDA when available else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:1"`` as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InferenceError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"device {device!r} asked for but CUDA is not available here; use --device cpu or auto")
    return dev


def network_logits(output: Any) -> Tensor:
    """The full-resolution logits ``(B, K, D, H, W)`` of a network output.

    Accepts a tensor, MONAI ``DynUNet``'s stacked training output ``(B, 1 + S, K, D, H, W)``, or a
    tuple/list/dict whose first element is the full-resolution output (deep supervision).
    """
    if isinstance(output, dict) and output:
        output = next(iter(output.values()))
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, Tensor):
        raise InferenceError(f"the network returned {type(output).__name__}; expected a tensor of logits")
    if output.dim() == 6:
        output = output[:, 0]
    if output.dim() != 5:
        raise InferenceError(f"expected network logits of shape (B, K, D, H, W); got {tuple(output.shape)}")
    return output
