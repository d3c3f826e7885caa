"""The pure parts of a run: learning-rate and KD-weight schedules, the segmentation loss, the device,
autocast and the EMA of the trained weights."""

from __future__ import annotations

import contextlib
from copy import deepcopy
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from ReCoKDLib.engine.config import TrainConfig, TrainingError


def poly_lr(base_lr: float, step: int, total: int, power: float = 0.9) -> float:
    """nnU-Net's poly schedule: ``base_lr * (1 - step / total) ** power``."""
    return base_lr * (1.0 - min(step, total) / float(total)) ** power


def kd_lambda(step: int, weight: float, warmup_steps: int) -> float:
    """``weight`` after a linear warm-up from 0 over ``warmup_steps`` (none when 0)."""
    if warmup_steps <= 0:
        return float(weight)
    return float(weight) * min(1.0, step / float(warmup_steps))


def deep_supervision_weights(num_heads: int) -> list[float]:
    """nnU-Net's halving weights ``1, 1/2, 1/4, ...`` normalised to sum 1 (full resolution first)."""
    raw = [0.5**i for i in range(num_heads)]
    total = sum(raw)
    return [w / total for w in raw]


def build_seg_loss(num_heads: int, regions: Sequence[Sequence[int]] | None = None, ignore: bool = False,
                   multiscale: bool = False) -> nn.Module:
    """Dice + CE (MONAI ``DiceCELoss``, softmax, one-hot labels, batch Dice, background excluded
    from the Dice term as in nnU-Net) over ``num_heads`` deep-supervision heads with
    :func:`deep_supervision_weights`; labels are resized (nearest) to any head that is smaller.

    Called with a list of logits ``[(B, K, D, H, W), ...]`` and labels ``(B, 1, D, H, W)``.

    With ``regions`` (nnU-Net region-based labels: sigmoid Dice + BCE per region), ``ignore``
    (labels hold -1 where nnU-Net's ignore label was: those voxels count nowhere) or
    ``multiscale`` (heads at their own resolution, as dynamic-network-architectures' decoder
    returns them) the loss is :class:`ReCoKDLib.nnunet.labels.DeepSupervisionSegLoss`.
    """
    if regions or ignore or multiscale:
        from ReCoKDLib.nnunet.labels import DeepSupervisionSegLoss

        return DeepSupervisionSegLoss(num_heads, regions=regions)
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    dice_ce = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                         smooth_nr=1e-5, smooth_dr=1e-5)
    return DeepSupervisionLoss(dice_ce, weights=deep_supervision_weights(num_heads))


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` -> ``cuda`` (the local rank's GPU under DDP) when available, else ``cpu``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
        if name == "cuda" and local_rank is not None:
            name = f"cuda:{local_rank}"
        index = torch.device(name).index or 0
        if index >= torch.cuda.device_count():
            raise TrainingError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif name != "cpu":
        raise TrainingError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return torch.device(name)


def _autocast_dtype(device: torch.device, config: TrainConfig) -> torch.dtype | None:
    if device.type == "cuda" and config.amp:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and config.bf16:
        from ReCoKDLib.models.backends import cpu_supports_bf16

        # without oneDNN bf16 kernels (AVX2-only CPUs) a bf16 convolution runs ~40x slower than float32
        return torch.bfloat16 if cpu_supports_bf16() else None
    return None


def training_precision(device: str | torch.device, config: TrainConfig) -> str:
    """The precision a run of ``config`` trains in on ``device``: ``"bf16"``, ``"fp16"`` or ``"fp32"``
    (``bf16=True`` on a CPU without bf16 kernels trains in ``"fp32"``). Steps redone in float32 after
    an overflow are listed apart (``history["fp32_redone"]``)."""
    dtype = _autocast_dtype(torch.device(device), config)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat subnormal floats as zero on the CPU for the duration (restored afterwards).

    Subnormal activations (values below ~1e-38, common deep in trained networks) make x86 float
    arithmetic one to two orders of magnitude slower: a forward pass of HD-BET on 64^3 took 136 s with
    them and 4.1 s without on this project's 2-core CPU. Flushing them changes results by less than
    1e-38 per value. Nested uses keep flushing until the outermost one ends (torch has no getter
    for the flag, so the depth is counted here).
    """
    global _flush_depth
    if _flush_depth == 0:
        _flush_supported[0] = torch.set_flush_denormal(True)  # returns whether the CPU supports it
    _flush_depth += 1
    try:
        yield
    finally:
        _flush_depth -= 1
        if _flush_depth == 0 and _flush_supported[0]:
            torch.set_flush_denormal(False)


_flush_depth = 0
_flush_supported = [False]


class ModelEMA:
    """Exponential moving average of a module's parameters and buffers (kept on the same device).

    ``decay_n = min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so short runs are not
    dominated by the initial weights.


    Args:
        module: the trained module (its current weights start the average).
        decay: the EMA decay.
        copy: a fresh module of the same architecture to hold the average (default: a deep copy;
            pass one for modules that carry hooks or cached tensors, such as a tapped DynUNet).
    """

    def __init__(self, module: nn.Module, decay: float, copy: nn.Module | None = None) -> None:
        self.decay = float(decay)
        self.module = copy if copy is not None else deepcopy(module)
        first = next(module.parameters(), None)
        if first is not None:
            self.module.to(first.device)
        self.module.load_state_dict(module.state_dict())
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        self.updates += 1
        source = module.state_dict()
        for name, value in self.module.state_dict().items():
            new = source[name].detach()
            if value.dtype.is_floating_point:
                value.mul_(d).add_(new.to(value.dtype), alpha=1.0 - d)
            else:
                value.copy_(new)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
