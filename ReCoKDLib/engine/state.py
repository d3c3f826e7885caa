"""What a checkpoint records besides weights: RNG states, a weight hash, library versions."""

from __future__ import annotations

import hashlib
import json
import random
import sys
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = json.loads(state["numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_sha256(module: nn.Module) -> str:
    """SHA-256 of ``module.state_dict()``: names and raw bytes of every tensor, 0-dim buffers included
    (the identity of weights that come without a file of their own, e.g. a teacher preset's)."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                      if value.numel() else b"")
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    import monai

    from ReCoKDLib import __version__

    return {"recokd": __version__, "torch": torch.__version__, "monai": monai.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0]}
