"""Export a model (normally the distilled student) as TorchScript and ONNX, with its model card.

Files written to ``out_dir`` for a model file ``student.pt``:

* ``student.ts``: TorchScript of the eval-mode network (``torch.jit.script``, falling back to
  ``torch.jit.trace`` when the network cannot be scripted), loadable without ReCoKD by
  ``torch.jit.load`` and by :func:`ReCoKDLib.models.loading.load_model` (which finds the card beside it).
* ``student.onnx``: ONNX (``torch.onnx.export``, input ``image`` ``(B, C, D, H, W)``, output
  ``logits`` ``(B, K, D, H, W)``), with dynamic batch and spatial axes. Spatial sizes must be
  multiples of ``card.provenance["export"]["spatial_multiple"]`` (the network's total stride, and
  16 at least: the exporter's dynamic shapes are checked there). The export is verified once with
  ONNX Runtime against torch on that size (max absolute difference recorded in the card).
* ``student.json``: the model card (classes, spacing, normalisation, patch size, metrics, the KD
  configuration) with ``provenance["export"]``: SHA-256 of the student weights and of the
  teacher's (from the card's provenance/kd or ``teacher_path``), of each exported file, and the
  library versions.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["ExportError", "EXPORT_FORMATS", "export_model", "library_versions"]

EXPORT_FORMATS = ("torchscript", "onnx")


class ExportError(ValueError):
    """An export cannot be made: unknown format, missing exporter, or a network that does not export."""


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that made the export (``None`` for those not installed)."""
    from importlib import metadata

    from ReCoKDLib import __version__

    out: dict[str, str | None] = {"recokd": __version__, "python": sys.version.split()[0]}
    for name in ("torch", "monai", "numpy", "SimpleITK", "onnx", "onnxruntime", "onnxscript", "openvino"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _spatial_multiple(card) -> list[int]:
    """Per axis, the size step an exported network accepts: lcm(total stride, 16)."""
    divisor = (1, 1, 1)
    if card.architecture.get("kind") == "dynunet":
        from ReCoKDLib.networks import UNetConfig

        divisor = UNetConfig.from_dict(card.architecture["config"]).divisor
    return [math.lcm(int(d), 16) for d in divisor]


def _torchscript(network: torch.nn.Module, example: torch.Tensor, path: Path) -> str:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module, how = torch.jit.script(network), "script"
        except Exception:  # noqa: BLE001 - scripting fails on many foreign architectures; tracing is the fallback
            module, how = torch.jit.trace(network, example, check_trace=False), "trace"
        tmp = path.with_name(f".{path.name}.tmp")
        module.save(str(tmp))
    os.replace(tmp, path)
    return how


def _onnx(network: torch.nn.Module, example: torch.Tensor, path: Path) -> float:
    """Export (dynamic batch and spatial axes) and check with ONNX Runtime; returns the max absolute
    difference to torch."""
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'recokd[export]'") from None
    from ReCoKDLib.models.base import InferenceError, network_logits
    from ReCoKDLib.models.runtimes import export_onnx

    try:
        export_onnx(network, example, path, dynamic_axes=True)
    except InferenceError as exc:
        raise ExportError(str(exc)) from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run(None, {"image": example.numpy()})[0]
    with torch.no_grad():
        reference = network_logits(network(example)).numpy()
    return float(np.max(np.abs(ours - reference)))


def export_model(
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    formats: Sequence[str] = EXPORT_FORMATS,
    *,
    teacher_path: str | os.PathLike | None = None,
    reporter=None,
) -> dict[str, Path]:
    """Export a ReCoKD model file; returns ``{"torchscript": path, "onnx": path, "card": path}``
    (only the formats asked for, and always the card). See the module docstring.

    Raises:
        ExportError: unknown format, or the network cannot be exported.
        CheckpointError: the model file is missing or unsafe.
    """
    from ReCoKDLib.checkpoint import atomic_write_text, sha256_file
    from ReCoKDLib.models.loading import load_model
    from ReCoKDLib.networks import plain_convolutions

    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats:
        raise ExportError(f"unknown export format(s) {unknown or formats}; choose from {EXPORT_FORMATS}")
    model_path = Path(model_path)
    model = load_model(model_path, device="cpu")
    card = model.card
    network = model.network.eval()
    multiple = _spatial_multiple(card)
    example = torch.randn((1, card.in_channels, *multiple), generator=torch.Generator().manual_seed(0))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = model_path.name.split(".")[0]
    if reporter is not None:
        reporter.start("export", total=len(formats))

    written: dict[str, Path] = {}
    record: dict[str, Any] = {"files": {}, "spatial_multiple": multiple, "onnx_input": "image", "onnx_output": "logits"}
    for n, fmt in enumerate(formats, 1):
        with plain_convolutions(network):  # the exporters see plain nn.Conv3d layers
            if fmt == "torchscript":
                path = out_dir / f"{stem}.ts"
                record["torchscript_method"] = _torchscript(network, example, path)
            else:
                path = out_dir / f"{stem}.onnx"
                record["onnx_max_abs_diff"] = _onnx(network, example, path)
        written[fmt] = path
        record["files"][path.name] = {"format": fmt, "sha256": sha256_file(path)}
        if reporter is not None:
            reporter.progress("export", n, len(formats), message=f"wrote {path}")

    provenance = dict(card.provenance)
    teacher_sha = provenance.get("teacher_sha256") or card.kd.get("teacher_sha256")
    if teacher_path is not None:
        teacher_sha = sha256_file(teacher_path)
    record.update({
        "student_sha256": sha256_file(model_path),
        "teacher_sha256": teacher_sha,
        "source": model_path.name,
        "library_versions": library_versions(),
    })
    provenance["export"] = record
    card.provenance = provenance
    written["card"] = atomic_write_text(out_dir / f"{stem}.json", card.to_json() + "\n")
    if reporter is not None:
        reporter.done("export", path=str(written["card"]))
    return written
