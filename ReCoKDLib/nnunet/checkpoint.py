"""Safe loading of nnU-Net v2 checkpoints: ``weights_only=True`` plus an explicit allowlist.

``nnUNetTrainer.save_checkpoint`` pickles, besides tensors and plain containers, a few numpy
objects (``logging`` and ``_best_ema`` hold ``numpy.float32`` scalars; numpy 1.x files may hold
arrays) and ``torch.device``. ``torch.load(weights_only=True)`` refuses those until they are
allowed. :data:`NNUNET_SAFE_GLOBALS` allows exactly them: numpy scalars, dtypes (and their
``numpy.dtypes.*DType`` classes, which the dtype's BUILD step needs) and arrays, under both the
numpy 2 (``numpy._core``) and numpy 1 (``numpy.core``) module names. Everything else (a
``__reduce__`` payload, a pickled module) is refused before any of it runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ReCoKDLib.nnunet import NNUNetError

__all__ = ["NNUNET_SAFE_GLOBALS", "load_nnunet_checkpoint", "REQUIRED_KEYS"]

#: the checkpoint keys the predictor reads
REQUIRED_KEYS = ("network_weights",)

_multiarray = getattr(np, "_core", None)
_multiarray = (_multiarray if _multiarray is not None else np.core).multiarray
_DTYPE_CLASSES = ("Float16DType", "Float32DType", "Float64DType", "Int8DType", "Int16DType", "Int32DType",
                  "Int64DType", "UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType", "BoolDType")


def _safe_globals() -> list:
    allowed: list = [np.dtype, np.ndarray, _multiarray.scalar, _multiarray._reconstruct]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed.append((_multiarray.scalar, f"{module}.scalar"))
        allowed.append((_multiarray._reconstruct, f"{module}._reconstruct"))
    dtypes = getattr(np, "dtypes", None)
    allowed += [getattr(dtypes, name) for name in _DTYPE_CLASSES if dtypes is not None and hasattr(dtypes, name)]
    return allowed


#: the non-tensor globals an nnU-Net v2 checkpoint may name (``torch.device`` and ``OrderedDict``
#: are allowed by torch itself)
NNUNET_SAFE_GLOBALS = _safe_globals()


def load_nnunet_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, Any]:
    """Read an nnU-Net v2 ``checkpoint_*.pth`` with ``weights_only=True`` and :data:`NNUNET_SAFE_GLOBALS`.

    Returns:
        the checkpoint dict (``network_weights``, ``trainer_name``, ``init_args``,
        ``inference_allowed_mirroring_axes``, ...).

    Raises:
        NNUNetError: missing or truncated file, an object outside the allowlist (nothing of it was
            run), or no ``network_weights`` state dict inside.
    """
    import torch

    from ReCoKDLib.checkpoint import CheckpointError, UnsafeCheckpointError, safe_torch_load

    path = Path(path)
    if not path.is_file():
        raise NNUNetError(f"nnU-Net checkpoint {path} does not exist (expected fold_<k>/checkpoint_final.pth "
                          f"or checkpoint_best.pth written by nnUNetTrainer)")
    try:
        payload = safe_torch_load(path, map_location, safe_globals=NNUNET_SAFE_GLOBALS)
    except UnsafeCheckpointError as exc:
        raise NNUNetError(
            f"refused to load {path}: it holds an object outside the nnU-Net allowlist"
            f"{' (' + exc.culprit + ')' if exc.culprit else ''}; nothing of it was run. An nnU-Net checkpoint holds "
            f"tensors, plain containers and numpy scalars only; this file was not written by nnUNetTrainer "
            f"or was tampered with") from None
    except CheckpointError as exc:
        raise NNUNetError(f"cannot read nnU-Net checkpoint {path}: {exc}") from None
    if not isinstance(payload, dict):
        raise NNUNetError(f"{path} holds a {type(payload).__name__}, not an nnU-Net checkpoint dict")
    weights = payload.get("network_weights")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise NNUNetError(f"{path} has no 'network_weights' state dict; keys found: {sorted(payload)[:12]}")
    return payload
