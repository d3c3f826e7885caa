"""Command-line options of the inference path, shared by ``segment``, ``evaluate``, ``inspect`` and ``serve``.

``--backend``, ``--precision``, ``--window`` and ``--restore`` map onto the keyword arguments of
:func:`ReCoKDLib.infer.segment_volume` (:func:`inference_kwargs`); the backend layer itself is
:mod:`ReCoKDLib.models.backends`.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_inference_arguments", "inference_kwargs", "parse_window"]

BACKEND_CHOICES = ("auto", "torch", "onnxruntime", "openvino")
PRECISION_CHOICES = ("auto", "fp32", "bf16")
RESTORE_CHOICES = ("auto", "fast", "probabilities")


def parse_window(text: str) -> str | list[int]:
    """``auto``, ``patch`` or ``D,H,W`` (``--window``)."""
    text = str(text).strip().lower()
    if text in ("auto", "patch"):
        return text
    try:
        sizes = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--window is auto, patch or D,H,W (e.g. 64,160,160); got {text!r}") from None
    if len(sizes) != 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--window needs 3 positive sizes D,H,W; got {text!r}")
    return sizes


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """``--backend``, ``--precision``, ``--window``, ``--restore``, ``--no-postprocess``."""
    group = parser.add_argument_group("inference engine")
    group.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                       help="what runs the network: auto (on the CPU, every installed backend is tried once on a window "
                            "of the scan, those disagreeing with PyTorch fp32 are refused, the fastest is used and "
                            "remembered beside the model; on CUDA PyTorch), torch, onnxruntime or openvino (default auto)")
    group.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                       help="fp32, bf16 (CPUs with bf16 instructions; checked against fp32) or auto (either, whichever "
                            "is faster and agrees) (default auto)")
    group.add_argument("--window", type=parse_window, default="auto", metavar="auto|patch|D,H,W",
                       help="sliding window in voxels of the model's grid: auto (as large as the free memory allows, "
                            "the whole scan when it fits), patch (the training patch) or D,H,W (default auto)")
    group.add_argument("--restore", choices=RESTORE_CHOICES, default="auto",
                       help="labels back on the input grid: fast (interpolates only near class boundaries; same labels) "
                            "or probabilities (every class map resampled) (default auto: fast unless probabilities are "
                            "written)")
    group.add_argument("--no-postprocess", dest="postprocess", action="store_false",
                       help="write the network's labels as they are, without the model card's post-processing "
                            "(e.g. HD-BET and its students keep only the largest brain component)")


def inference_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``segment_volume`` keyword arguments these options give (``amp`` maps to bf16)."""
    precision = getattr(args, "precision", "auto")
    if getattr(args, "amp", False) and precision == "auto":
        precision = "bf16"
    return {"backend": getattr(args, "backend", "auto"), "precision": precision,
            "window": getattr(args, "window", "auto"), "restore": getattr(args, "restore", "auto"),
            "postprocess": getattr(args, "postprocess", True)}
