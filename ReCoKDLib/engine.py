"""Teacher training and distillation: one loop of small stages, exact resume, DDP, progress.

Two jobs share the loop: :func:`train_teacher` (a network trained with Dice + CE) and
:func:`distill` (a student trained with Dice + CE + ``lambda(step)`` times a KD loss from a frozen
teacher). A step is::

    batch   = sampler.batch(B)                     # (B, C, *patch) images, (B, 1, *patch) labels
    out, kd = module(images, labels)               # student (+ frozen teacher, taps, KD loss)
    loss    = seg_loss(out, labels) + lambda(step) * kd
    skip if not finite (all ranks agree); else backward, clip, optimiser step, EMA update

The learning rate is a pure function of the step (poly, :func:`poly_lr`), so resuming at step
``s`` gives exactly the schedule of an uninterrupted run. Every ``checkpoint_every`` steps, at
each validation, on cancel and at the end, :func:`save_train_state` atomically writes
``<out>/checkpoint.pt``: network, EMA, adapters, KD-loss modules, optimiser, AMP scaler, step,
best metric, history, configuration and the RNG states of torch, numpy, python and every rank's
patch sampler. ``resume=True`` restores all of it. Model files (``model_best.pt``,
``model_last.pt``; EMA weights, with a :class:`~ReCoKDLib.checkpoint.ModelCard`) are written with
:func:`~ReCoKDLib.checkpoint.save_model`.

Cancel: ``SIGTERM`` or a file ``<out>/STOP`` makes the run write its checkpoint and last model
and return with ``cancelled=True`` (the ``done`` event says ``"cancelled": true``; the CLI exits
0). The stop file is removed once honoured, so ``--resume`` continues.

Distributed: start with ``torchrun`` (``WORLD_SIZE > 1``); the module holding student, adapters
and KD-loss modules is wrapped in ``DistributedDataParallel`` so all their gradients are
all-reduced; every rank samples with its own seed (``seed + rank``); rank 0 validates, writes
files and reports.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import random
import signal
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ReCoKDLib import checkpoint as ckpt
from ReCoKDLib.data.sampling import UNLABELLED, AugmentationConfig, CaseSet, PatchSampler
from ReCoKDLib.networks import (
    UNetConfig,
    build_unet,
    count_parameters,
    derive_student_config,
    encoder_tap_names,
    split_deep_supervision,
)
from ReCoKDLib.progress import Reporter

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "TrainingDivergedError",
    "train_teacher",
    "distill",
    "poly_lr",
    "kd_lambda",
    "deep_supervision_weights",
    "build_seg_loss",
    "resolve_device",
    "ModelEMA",
    "TRAIN_STATE_FORMAT",
    "merge_pseudo_labels",
    "merge_region_pseudo_labels",
    "unlabelled_samples",
    "pseudo_weighted_seg_loss",
]

TRAIN_STATE_FORMAT = "recokd-train-state"
CHECKPOINT_NAME = "checkpoint.pt"
STOP_FILE = "STOP"


class TrainingError(ValueError):
    """A training run cannot start or go on (configuration, inputs, resources)."""


class TrainingDivergedError(TrainingError):
    """Too many consecutive steps had a NaN or infinite loss."""


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in checkpoints and model cards (:meth:`to_dict`).

    Data and budget:
        patch_size: training patch ``(D, H, W)``; each a multiple of the network's divisor.
        batch_size: patches per step (per process under DDP).
        steps: optimiser steps of the whole run (the budget: steps, not wall time).
        num_val_cases: cases held out (the last ones) for validation; 0 = no validation.
        val_every: validate (and checkpoint) every this many steps, and at the end.
        val_overlap: sliding-window overlap of validation inference.
        checkpoint_every: write the resumable checkpoint every this many steps.
        patience: stop after this many validations without a better mean Dice (0 = never).
        oversample_foreground: share of patches centred on foreground (nnU-Net 0.33).
        augmentation: :class:`~ReCoKDLib.data.sampling.AugmentationConfig` as a dict.
        seed: seeds model initialisation and the patch samplers.
    Optimisation:
        optimizer: ``"sgd"`` (momentum, Nesterov) or ``"adamw"``.
        lr, momentum, weight_decay, poly_power: poly LR ``lr * (1 - step/steps) ** poly_power``.
        grad_clip: max gradient norm (0 = none).
        ema_decay: EMA of the trained weights (with warm-up ``min(decay, (1+n)/(10+n))``); the
            EMA weights are validated and written to the model files. 0 = no EMA.
        max_nonfinite: this many consecutive NaN/Inf losses stop the run.
    Devices:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:i"``.
        amp: autocast on CUDA (bf16 where supported, else fp16 with a gradient scaler).
        bf16: bf16 autocast on CPU (fp32 by default).
        deterministic: ``torch.use_deterministic_algorithms`` (as far as the device allows).
        log_every: progress event every this many steps.
    Networks and KD (``distill`` only, except ``network``):
        network: architecture of ``train_teacher`` as ``UNetConfig.to_dict()``.
        student_reduction, min_channels: the student's widths ``max(C // r, min_channels)``.
        student_config: explicit student ``UNetConfig`` dict (overrides the reduction).
        teacher_taps, student_taps: distilled module names (default: encoder stages).
        kd: ``{method: {"weight": w, **options}}`` (see ``losses.registry``).
        kd_weight: ``lambda`` after warm-up (ReCo-KD: 0.01).
        kd_warmup_steps: linear warm-up of ``lambda`` from 0; ``None`` = 60 % of ``steps``
            (ReCo-KD: 600 of 1000 epochs).
        frozen_aux: keep adapters and KD-loss modules at their initialisation (ablation of the
            authors' release); by default they are optimised.
    Label-free distillation (``distill`` with unlabelled cases, see :func:`merge_pseudo_labels`):
        pseudo_label_weight: weight of the segmentation loss (Dice + CE) on the teacher's argmax
            for samples without annotation (hard targets); 0 = none, so those samples learn only
            from the KD losses (soft targets: add ``logit`` to ``kd``). Real labels always win.
    """

    patch_size: tuple[int, int, int] = (32, 32, 32)
    batch_size: int = 2
    steps: int = 1000
    num_val_cases: int = 1
    val_every: int = 250
    val_overlap: float = 0.5
    checkpoint_every: int = 50
    patience: int = 0
    oversample_foreground: float = 0.33
    augmentation: dict[str, Any] = field(default_factory=lambda: AugmentationConfig().to_dict())
    seed: int = 42
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.99
    weight_decay: float = 3e-5
    poly_power: float = 0.9
    grad_clip: float = 12.0
    ema_decay: float = 0.999
    max_nonfinite: int = 5
    device: str = "auto"
    amp: bool = True
    bf16: bool = False
    deterministic: bool = False
    log_every: int = 1
    network: dict[str, Any] | None = None
    student_reduction: int = 4
    min_channels: int = 8
    student_config: dict[str, Any] | None = None
    teacher_taps: list[str] | None = None
    student_taps: list[str] | None = None
    kd: dict[str, dict[str, Any]] = field(default_factory=lambda: {"recokd": {"weight": 1.0}})
    kd_weight: float = 0.01
    kd_warmup_steps: int | None = None
    frozen_aux: bool = False
    pseudo_label_weight: float = 1.0

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
        problems = []
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            problems.append(f"patch_size must be 3 positive ints, got {self.patch_size}")
        for name in ("batch_size", "steps", "val_every", "checkpoint_every", "log_every", "max_nonfinite"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.optimizer not in ("sgd", "adamw"):
            problems.append(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.kd_weight < 0 or (self.kd_warmup_steps is not None and self.kd_warmup_steps < 0):
            problems.append("kd_weight and kd_warmup_steps must be >= 0")
        if self.pseudo_label_weight < 0:
            problems.append(f"pseudo_label_weight must be >= 0, got {self.pseudo_label_weight}")
        if self.num_val_cases < 0 or self.patience < 0:
            problems.append("num_val_cases and patience must be >= 0")
        if problems:
            raise TrainingError("invalid training configuration: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise TrainingError(f"unknown training options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


@dataclass
class TrainResult:
    """What a run returns.

    Attributes:
        last_model: ``model_last.pt`` (EMA weights and card), always written.
        best_model: ``model_best.pt`` (best validation mean Dice), ``None`` without validation.
        checkpoint: the resumable ``checkpoint.pt``.
        metrics: the last validation metrics (``mean_dice``, ``dice`` per class) and ``best_mean_dice``.
        step: steps done. cancelled / stopped_early: why it ended before ``steps``.
        network: the trained network (raw weights, on CPU); ema_network: the EMA copy (or ``network``).
        history: ``{"train": [...], "val": [...]}`` as written to ``history.json``.
    """

    last_model: Path
    best_model: Path | None
    checkpoint: Path
    metrics: dict[str, Any]
    step: int
    cancelled: bool
    stopped_early: bool
    network: nn.Module
    ema_network: nn.Module
    history: dict[str, list]


# ---------------------------------------------------------------------------------------------
# Pure pieces


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
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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
        self.module = copy if copy is not None else _deepcopy(module)
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


# ---------------------------------------------------------------------------------------------
# Distributed context


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def _init_distributed(device_name: str) -> _Dist:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE > 1``), if any."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), owns_group=True)


def _all_max(values: Sequence[float], dist_ctx: _Dist) -> list[float]:
    """Element-wise maximum over ranks (identity in one process)."""
    if not dist_ctx.active:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def _gather(obj: Any, dist_ctx: _Dist) -> list[Any]:
    if not dist_ctx.active:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist_ctx.world
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------
# The trainable module (what DDP wraps)


class _SegModule(nn.Module):
    """Teacher training: the network alone. ``forward -> (output, kd_loss None, {})``."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: Tensor, labels: Tensor):
        return self.network(images), None, {}


def unlabelled_samples(labels: Tensor) -> Tensor:
    """``(B,)`` bool: which samples of ``labels`` ``(B, 1, D, H, W)`` come from unlabelled cases
    (any voxel equal to ``data.sampling.UNLABELLED``; padding and augmentation may add zeros)."""
    return (labels == UNLABELLED).flatten(1).any(dim=1)


def merge_pseudo_labels(labels: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Label-free distillation: the teacher's argmax wherever a sample has no annotation.

    Samples from unlabelled cases (:func:`unlabelled_samples`) take the teacher's argmax
    (``losses.masks.pseudo_labels_from_teacher``) as their labels, whole; samples with real labels
    keep them unchanged (real labels take precedence). ReCo-KD's class-aware region masks and the
    hard segmentation target are then built from the result.

    Args:
        labels: ``(B, 1, D, H, W)`` integer class ids, :data:`UNLABELLED` for unannotated cases.
        teacher_logits: ``(B, K, D, H, W)``.

    Returns:
        ``(merged labels (B, 1, D, H, W) int64, unlabelled (B,) bool)``.
    """
    from ReCoKDLib.losses.masks import pseudo_labels_from_teacher

    unlabelled = unlabelled_samples(labels)
    if not bool(unlabelled.any()):
        return labels, unlabelled
    pseudo = pseudo_labels_from_teacher(teacher_logits).to(labels.dtype)
    return torch.where(unlabelled[:, None, None, None, None], pseudo, labels), unlabelled


def pseudo_weighted_seg_loss(seg_loss: nn.Module, heads: list[Tensor], labels: Tensor, unlabelled: Tensor | None,
                             pseudo_weight: float) -> Tensor:
    """Segmentation loss with the samples on teacher pseudo-labels weighted by ``pseudo_weight``.

    ``heads``: deep-supervision logits ``[(B, K, D, H, W), ...]``; ``labels`` the merged labels;
    ``unlabelled`` ``(B,)`` bool (``None``: all labelled). The loss is the sample-count-weighted
    mean of the labelled part and ``pseudo_weight`` times the pseudo-labelled part.
    """
    if unlabelled is None or not bool(unlabelled.any()):
        return seg_loss(heads, labels)
    total = labels.shape[0]
    parts = []
    for mask, weight in ((~unlabelled, 1.0), (unlabelled, float(pseudo_weight))):
        n = int(mask.sum())
        if n and weight > 0:
            parts.append(seg_loss([h[mask] for h in heads], labels[mask]) * (weight * n / total))
    return sum(parts) if parts else heads[0].sum() * 0.0


def merge_region_pseudo_labels(labels: Tensor, teacher_logits: Tensor,
                               regions_class_order: Sequence[int]) -> tuple[Tensor, Tensor]:
    """:func:`merge_pseudo_labels` for region (sigmoid) teachers: unlabelled samples take the
    teacher's regions painted into class ids (``nnunet.labels.paint_regions``, later regions
    overwrite); ``teacher_logits`` ``(B, R, D, H, W)``. Returns ``(labels (B, 1, D, H, W), unlabelled (B,))``."""
    from ReCoKDLib.nnunet.labels import paint_regions

    unlabelled = unlabelled_samples(labels)
    if not bool(unlabelled.any()):
        return labels, unlabelled
    pseudo = paint_regions(teacher_logits.detach(), regions_class_order).to(labels.dtype)
    return torch.where(unlabelled[:, None, None, None, None], pseudo, labels), unlabelled


class _DistillModule(nn.Module):
    """Student + adapters + KD loss around a frozen teacher (a ``DistillationPair``).

    ``forward(images (B, C, D, H, W), labels (B, 1, D, H, W)) -> (student output, kd loss, terms,
    (merged labels, unlabelled (B,)))``: unlabelled samples take the teacher's argmax
    (:func:`merge_pseudo_labels`) before the KD loss reads the labels.
    """

    def __init__(self, pair: nn.Module, kd_loss: nn.Module, num_classes: int, label_spec: Any = None) -> None:
        super().__init__()
        self.pair = pair
        self.kd_loss = kd_loss
        self.num_classes = num_classes
        self.label_spec = label_spec  # nnunet.labels.LabelSpec; region-based: KD on region maps

    def forward(self, images: Tensor, labels: Tensor):
        out, batch = self.pair(images, labels=labels, num_classes=self.num_classes)
        spec = self.label_spec
        if spec is not None and spec.has_regions:
            # sigmoid heads: pseudo-labels painted from the teacher's regions; the KD losses read
            # one binary map per region (class-aware masks per region, binary logit KD)
            from ReCoKDLib.nnunet.labels import labels_to_regions

            merged, unlabelled = merge_region_pseudo_labels(labels, batch.teacher_logits, spec.regions_class_order)
            batch.labels, batch.regions = labels_to_regions(merged, spec.regions), True
        else:
            merged, unlabelled = merge_pseudo_labels(labels, batch.teacher_logits)
            batch.labels = merged
        kd = self.kd_loss(batch)
        return out, kd.loss, kd.terms, (merged, unlabelled)


# ---------------------------------------------------------------------------------------------
# Checkpoint helpers


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


def _state_sha256(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                      if value.numel() else b"")
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    import monai

    from ReCoKDLib import __version__

    return {"recokd": __version__, "torch": torch.__version__, "monai": monai.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0]}


# ---------------------------------------------------------------------------------------------
# Validation


def _sliding_window_logits(network: nn.Module, image: Tensor, patch_size: Sequence[int], overlap: float,
                           device: torch.device, dtype: torch.dtype | None) -> Tensor:
    """``(C, D, H, W)`` -> ``(K, D, H, W)`` logits on CPU; through ``ReCoKDLib.infer`` when present."""
    try:
        from ReCoKDLib.infer import predict_logits
    except ImportError:
        predict_logits = None
    if predict_logits is not None:
        return predict_logits(network, image, patch_size, overlap=overlap, device=device,
                              amp=dtype is not None).float().cpu()
    from monai.inferers import sliding_window_inference

    with torch.no_grad(), _autocast(device, dtype):
        out = sliding_window_inference(image[None].to(device), tuple(patch_size), 1, network,
                                       overlap=overlap, mode="gaussian")
    return out[0].float().cpu()


def dice_per_class(prediction: np.ndarray, label: np.ndarray, num_classes: int) -> list[float]:
    """Dice of classes ``1..K-1`` between two ``(D, H, W)`` id maps; NaN where both are empty.
    Voxels whose label is negative (nnU-Net's ignore label, read as -1) count nowhere."""
    scores = []
    valid = np.asarray(label) >= 0
    for c in range(1, num_classes):
        p, t = (prediction == c) & valid, label == c
        denom = int(p.sum()) + int(t.sum())
        scores.append(float("nan") if denom == 0 else 2.0 * int((p & t).sum()) / denom)
    return scores


def validate(network: nn.Module, val_set: CaseSet, patch_size: Sequence[int], device: torch.device,
             dtype: torch.dtype | None, overlap: float = 0.5) -> dict[str, Any]:
    """Mean Dice per class over the held-out cases (sliding window, Gaussian weighting).

    Ignored voxels (label -1) count nowhere. With nnU-Net region-based labels
    (``val_set.label_spec.has_regions``) the Dice is per region (``sigmoid > 0.5`` against the
    region's label values), keyed by the region names, as nnU-Net validates region models.
    """
    was_training = network.training
    network.eval()
    per_case = []
    spec = getattr(val_set, "label_spec", None)
    regions = spec.regions if spec is not None and spec.has_regions else None
    try:
        for case in val_set.cases:
            image = torch.from_numpy(np.ascontiguousarray(case.image, dtype=np.float32))
            logits = _sliding_window_logits(network, image, patch_size, overlap, device, dtype)
            label = np.asarray(case.label)[0]
            if regions is not None:
                from ReCoKDLib.nnunet.labels import region_dice

                per_case.append(region_dice((logits > 0).numpy(), label, regions))
            else:
                per_case.append(dice_per_class(logits.argmax(0).numpy(), label, val_set.num_classes))
    finally:
        network.train(was_training)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of classes absent everywhere
        per_class = np.nanmean(np.asarray(per_case, dtype=float), axis=0)
        mean = float(np.nanmean(per_class)) if np.any(np.isfinite(per_class)) else 0.0
    names = spec.head_names if regions is not None else val_set.class_names[1:]
    return {"mean_dice": mean, "dice": {n: (None if not np.isfinite(v) else float(v)) for n, v in zip(names, per_class)},
            "cases": len(per_case)}


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class _Job:
    """What differs between teacher training and distillation."""

    stage: str
    module: nn.Module                 # what DDP wraps (forward -> out, kd, terms)
    network: nn.Module                # the trained network (teacher or student)
    network_config: UNetConfig
    aux: dict[str, nn.Module]         # extra checkpointed modules (adapters, kd_loss)
    aux_trainable: bool
    card: ckpt.ModelCard              # template of the model cards
    kd_warmup: int = 0
    identity: dict[str, Any] = field(default_factory=dict)  # checked on resume (teacher hash)


class _CancelFlag:
    """SIGTERM sets the flag (main thread only); restored on exit."""

    def __init__(self) -> None:
        self.set = False
        self._previous = None

    def __enter__(self) -> "_CancelFlag":
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.set = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _fresh(job: _Job) -> nn.Module:
    """A new network of the job's architecture on CPU (no hooks, no cached outputs)."""
    build = getattr(job.network_config, "build", None)  # nnU-Net students (nnunet.student.NNUNetStudentConfig)
    return build() if build is not None else build_unet(job.network_config)


def _deepcopy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


def _check_patch(config: TrainConfig, net_config: UNetConfig) -> None:
    bad = [p for p, d in zip(config.patch_size, net_config.divisor) if p % d]
    if bad:
        raise TrainingError(
            f"patch_size {tuple(config.patch_size)} must be a multiple of {net_config.divisor} (the product of the "
            f"network's strides per axis); e.g. {tuple(max(d, round(p / d) * d) for p, d in zip(config.patch_size, net_config.divisor))}"
        )


def _optimizer(config: TrainConfig, network: nn.Module, aux_params: list[nn.Parameter]) -> torch.optim.Optimizer:
    groups = [{"params": [p for p in network.parameters() if p.requires_grad], "weight_decay": config.weight_decay}]
    if aux_params:
        groups.append({"params": aux_params, "weight_decay": 0.0})
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    return torch.optim.AdamW(groups, lr=config.lr)


def _shrink_for_oom(config: TrainConfig, divisor: Sequence[int]) -> TrainConfig | None:
    """A smaller batch, else a smaller patch (largest axis minus one divisor step), else ``None``."""
    if config.batch_size > 1:
        return config.replace(batch_size=config.batch_size // 2)
    patch = list(config.patch_size)
    axis = int(np.argmax([p / d for p, d in zip(patch, divisor)]))
    if patch[axis] - divisor[axis] >= max(divisor[axis], 16):
        patch[axis] -= divisor[axis]
        return config.replace(patch_size=tuple(patch))
    return None


def _run(job: _Job, config: TrainConfig, train_set: CaseSet, val_set: CaseSet | None, out_dir: Path,
         reporter: Reporter, resume: bool, device: torch.device, dist_ctx: _Dist) -> TrainResult:
    stage = job.stage
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, stop_path = out_dir / CHECKPOINT_NAME, out_dir / STOP_FILE
    last_path, best_path = out_dir / "model_last.pt", out_dir / "model_best.pt"
    say = reporter if dist_ctx.main else Reporter()  # other ranks stay silent

    if ckpt_path.exists() and not resume:
        raise TrainingError(
            f"{out_dir} already holds a run ({ckpt_path.name}); pass resume (--resume) to continue it, "
            "or choose another output folder"
        )
    dtype = _autocast_dtype(device, config)
    _check_patch(config, job.network_config)

    job.module.to(device)
    job.network.train()
    aux_params = [p for m in job.aux.values() for p in m.parameters() if p.requires_grad] if job.aux_trainable else []
    if not job.aux_trainable:
        for m in job.aux.values():
            m.requires_grad_(False)
    optimizer = _optimizer(config, job.network, aux_params)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    ema = ModelEMA(job.network, config.ema_decay, _fresh(job)) if config.ema_decay > 0 else None
    sampler = PatchSampler(train_set, config.patch_size, config.oversample_foreground,
                           AugmentationConfig.from_dict(config.augmentation), seed=config.seed + dist_ctx.rank)

    step, best, best_step, bad_vals, nonfinite = 0, -1.0, -1, 0, 0
    history: dict[str, list] = {"train": [], "val": []}
    last_metrics: dict[str, Any] = {}
    if resume and ckpt_path.exists():
        state = ckpt.safe_torch_load(ckpt_path)
        if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT or state.get("job") != stage:
            raise TrainingError(f"{ckpt_path} is not a {stage} training checkpoint; cannot resume from it")
        for key, value in job.identity.items():
            if state.get("identity", {}).get(key) not in (None, value):
                raise TrainingError(f"cannot resume: {key} differs from the checkpoint's ({ckpt_path}); "
                                    "use the same teacher, or a new output folder")
        job.network.load_state_dict(state["network"])
        for name, module in job.aux.items():
            module.load_state_dict(state["aux"][name])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        samplers = state["samplers"]
        if len(samplers) == dist_ctx.world:
            sampler.load_state_dict(samplers[dist_ctx.rank])
        else:
            say.warning(stage, f"checkpoint written by {len(samplers)} process(es), resumed with {dist_ctx.world}: "
                               "patch sampling restarts from new seeds")
        _set_rng_state(state["rng"])
        step, best, best_step = int(state["step"]), float(state["best_metric"]), int(state["best_step"])
        bad_vals, nonfinite = int(state["bad_validations"]), int(state["nonfinite"])
        history = json.loads(state["history"])
        last_metrics = json.loads(state.get("metrics", "{}"))
        say.log(stage, f"resumed from {ckpt_path} at step {step}")
    elif resume:
        say.log(stage, f"no checkpoint in {out_dir}; starting a new run")

    wrapped: nn.Module = job.module
    if dist_ctx.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        wrapped = DDP(job.module, device_ids=ids, find_unused_parameters=True)

    spec = getattr(train_set, "label_spec", None)  # nnU-Net regions / ignore label (nnunet.labels.LabelSpec)
    seg_loss = build_seg_loss(job.network_config.deep_supr_num + 1 if job.network_config.deep_supervision else 1,
                              regions=spec.regions if spec is not None and spec.has_regions else None,
                              ignore=spec is not None and spec.ignore_label is not None,
                              multiscale=hasattr(job.network_config, "build"))
    trained_params = [p for p in job.network.parameters() if p.requires_grad] + aux_params

    def eval_network() -> nn.Module:
        return ema.module if ema is not None else job.network

    def write_model(path: Path, metrics: dict[str, Any]) -> Path:
        card = dataclasses.replace(job.card, metrics={**job.card.metrics, **metrics, "step": step},
                                   patch_size=list(config.patch_size))
        return ckpt.save_model(path, eval_network().state_dict(), card)

    saved_at = [-1]  # step of the last checkpoint written

    def save_state() -> Path:
        samplers = _gather(sampler.state_dict(), dist_ctx)  # every rank takes part
        saved_at[0] = step
        if dist_ctx.main:
            payload = {
                "format": TRAIN_STATE_FORMAT, "version": 1, "job": stage, "identity": job.identity,
                "config": json.dumps(config.to_dict()), "step": step, "best_metric": best, "best_step": best_step,
                "bad_validations": bad_vals, "nonfinite": nonfinite,
                "network": job.network.state_dict(),
                "aux": {name: m.state_dict() for name, m in job.aux.items()},
                "ema": ema.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "rng": _rng_state(), "samplers": samplers,
                "history": json.dumps(history), "metrics": json.dumps(last_metrics),
            }
            ckpt.atomic_torch_save(payload, ckpt_path)
            ckpt.atomic_write_text(out_dir / "history.json", json.dumps(history, indent=1) + "\n")
            say.checkpoint(stage, str(ckpt_path), step=step)
        return ckpt_path

    total = config.steps
    kd_terms_last: dict[str, float] = {}
    say.start(stage, total=total, step=step, message=f"{stage}: {count_parameters(job.network) / 1e6:.3f} M trained "
              f"parameters, patch {tuple(config.patch_size)}, batch {config.batch_size}, {dist_ctx.world} process(es), {device}")
    cancelled = stopped_early = False
    with _CancelFlag() as cancel:
        while step < total:
            stop_now, early = _all_max([float(cancel.set or stop_path.exists()), float(stopped_early)], dist_ctx)
            if stop_now or early:
                cancelled, stopped_early = bool(stop_now), bool(early)
                break
            lr = poly_lr(config.lr, step, total, config.poly_power)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, labels = sampler.batch(config.batch_size)
            images, labels = images.to(device), labels.to(device)
            try:
                with _autocast(device, dtype):
                    out, kd_loss, kd_terms, *targets = wrapped(images, labels)
                labels, unlabelled = targets[0] if targets else (labels, None)  # label-free: teacher argmax
                seg = pseudo_weighted_seg_loss(seg_loss, [o.float() for o in split_deep_supervision(out)], labels,
                                               unlabelled, config.pseudo_label_weight)
                lam = kd_lambda(step, config.kd_weight, job.kd_warmup)
                loss = seg if kd_loss is None else seg + lam * kd_loss.float()
                finite = bool(torch.isfinite(loss.detach()).item())
                (finite_all,) = [1.0 - v for v in _all_max([0.0 if finite else 1.0], dist_ctx)]
                optimizer.zero_grad(set_to_none=True)
                if finite_all:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(
                        trained_params, config.grad_clip if config.grad_clip > 0 else float("inf"))
                    if not scaler.is_enabled():
                        # a finite loss can still give NaN/Inf gradients (bf16 autocast): stepping would
                        # poison the weights for good, so such a step is skipped like a NaN loss (with fp16
                        # loss scaling the scaler skips it and lowers its scale itself)
                        (bad_grads,) = _all_max([0.0 if bool(torch.isfinite(norm).item()) else 1.0], dist_ctx)
                        finite_all = bad_grads == 0.0
                    if finite_all:
                        scaler.step(optimizer)
                    else:
                        optimizer.zero_grad(set_to_none=True)
                    scaler.update()
                elif dist_ctx.active:
                    # DDP expects a backward after each forward: run one whose gradients are dropped
                    (loss * 0.0).backward()
                    optimizer.zero_grad(set_to_none=True)
            except torch.cuda.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                smaller = _shrink_for_oom(config, job.network_config.divisor)
                if smaller is None or dist_ctx.active:
                    raise TrainingError(
                        f"CUDA out of memory at batch {config.batch_size}, patch {tuple(config.patch_size)}: use a "
                        "smaller --patch or --batch, a smaller student, --device cpu, or a GPU with more memory"
                    ) from None
                say.warning(stage, f"CUDA out of memory: retrying with batch {smaller.batch_size}, patch "
                                   f"{tuple(smaller.patch_size)}")
                config = smaller
                sampler.patch_size = tuple(config.patch_size)
                continue
            if not finite_all:
                nonfinite += 1
                say.warning(stage, f"non-finite loss or gradients at step {step + 1}; step skipped ({nonfinite} in a row)",
                            step=step)
                if nonfinite >= config.max_nonfinite:
                    raise TrainingDivergedError(
                        f"{nonfinite} consecutive steps had a NaN/Inf loss or gradients (last at step {step + 1}); stopped. The last "
                        f"good checkpoint {ckpt_path} is intact. Lower --lr or the KD weight, check the inputs for "
                        "NaN, or use fp32 instead of bf16/AMP"
                    )
            else:
                nonfinite = 0
                if ema is not None:
                    ema.update(job.network)
            step += 1
            if finite_all:
                kd_terms_last = {k: float(v) for k, v in kd_terms.items()}
                losses = {"total": float(loss.detach()), "seg": float(seg.detach())}
                if kd_loss is not None:
                    losses.update(kd=float(kd_loss.detach()), kd_lambda=lam, **kd_terms_last)
                if step % config.log_every == 0 or step == total:
                    history["train"].append({"step": step, "lr": lr, **losses})
                    say.progress(stage, step, total, losses=losses, lr=lr)
            validating = val_set is not None and (step % config.val_every == 0 or step == total)
            if validating:
                if dist_ctx.main:
                    metrics = validate(eval_network(), val_set, config.patch_size, device, dtype, config.val_overlap)
                    last_metrics = metrics
                    history["val"].append({"step": step, **metrics})
                    say.metrics("validate", metrics, step=step)
                    if metrics["mean_dice"] > best:
                        best, best_step, bad_vals = metrics["mean_dice"], step, 0
                        say.checkpoint(stage, str(write_model(best_path, {"validation": metrics})), step=step, best=True)
                    else:
                        bad_vals += 1
                        if config.patience and bad_vals >= config.patience:
                            stopped_early = True
                            say.log(stage, f"early stop: no better validation Dice in {bad_vals} validations "
                                           f"(best {best:.4f} at step {best_step})")
            if validating or step % config.checkpoint_every == 0:
                save_state()
        if saved_at[0] != step:
            save_state()
        if dist_ctx.main:
            write_model(last_path, {"validation": last_metrics} if last_metrics else {})
            if cancelled and stop_path.exists():
                stop_path.unlink()
    metrics = dict(last_metrics, best_mean_dice=best if best >= 0 else None, best_step=best_step if best >= 0 else None)
    say.done(stage, path=str(last_path), best_path=str(best_path) if best >= 0 else None, step=step,
             cancelled=cancelled, stopped_early=stopped_early, metrics=metrics,
             message="cancelled: checkpoint written, resume with --resume" if cancelled else None)
    raw, averaged = _fresh(job), _fresh(job)
    raw.load_state_dict(job.network.state_dict())
    averaged.load_state_dict(eval_network().state_dict())
    return TrainResult(last_path, best_path if best >= 0 else None, ckpt_path, metrics, step, cancelled, stopped_early,
                       raw, averaged, history)


def _prepare_run(config: TrainConfig, resume: bool, out_dir: Path) -> tuple[TrainConfig, _Dist, torch.device]:
    """Stored configuration on resume, process group, device, seeds and determinism."""
    stored = out_dir / CHECKPOINT_NAME
    if resume and stored.exists():
        state = ckpt.safe_torch_load(stored)
        if isinstance(state, dict) and "config" in state:
            saved = TrainConfig.from_dict(json.loads(state["config"]))
            # the budget and the device may change on resume; everything else is the stored run's
            config = saved.replace(steps=config.steps, device=config.device, log_every=config.log_every)
    dist_ctx = _init_distributed(config.device)
    device = resolve_device(config.device, dist_ctx.local_rank if dist_ctx.active else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    return config, dist_ctx, device


def _finish_dist(dist_ctx: _Dist) -> None:
    if dist_ctx.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Public jobs


@contextlib.contextmanager
def _run_scope(stage: str, reporter: Reporter, dist_ctx: _Dist) -> Iterator[None]:
    """Around a whole run: a bad-input error is reported once (on the main process) and marked so
    the CLI does not print it again; the process group is torn down however the run ends."""
    try:
        yield
    except (TrainingError, ValueError) as exc:
        (reporter if dist_ctx.main else Reporter()).error(stage, str(exc))
        exc.recokd_reported = True  # type: ignore[attr-defined]
        raise
    finally:
        _finish_dist(dist_ctx)


def train_teacher(config: TrainConfig, dataset: CaseSet, out_dir: str | os.PathLike, reporter: Reporter | None = None,
                  resume: bool = False, role: str = "teacher") -> TrainResult:
    """Train the built-in 3D U-Net (``config.network``, default ``preset("nnunet")``) with Dice + CE.

    Args:
        config: the run (see :class:`TrainConfig`).
        dataset: preprocessed cases; the last ``config.num_val_cases`` are held out for validation.
        out_dir: folder of ``checkpoint.pt``, ``model_best.pt``, ``model_last.pt``, ``history.json``.
        reporter: progress events (stages ``train-teacher`` and ``validate``).
        resume: continue the run in ``out_dir`` exactly where it stopped.
        role: the model card's role: ``"teacher"``, or ``"student"`` for a student trained
            without distillation (the baseline distillation is compared with).

    Returns:
        :class:`TrainResult`.
    """
    out_dir = Path(out_dir)
    reporter = reporter or Reporter()
    config, dist_ctx, device = _prepare_run(config, resume, out_dir)
    with _run_scope("train-teacher", reporter, dist_ctx):
        if dataset.unlabelled_cases:
            raise TrainingError(f"training a network needs labels; cases {dataset.unlabelled_cases[:5]} have none "
                                "(use them with distill, which takes the teacher's predictions as their targets)")
        net_dict = dict(config.network or UNetConfig().to_dict())
        net_dict.update(in_channels=dataset.in_channels, num_classes=_output_channels(dataset))
        net_config = UNetConfig.from_dict(net_dict)
        network = build_unet(net_config)
        train_set, val_set = dataset.split(config.num_val_cases)
        card = ckpt.ModelCard(
            architecture={"kind": "dynunet", "config": net_config.to_dict()},
            classes=list(dataset.class_names), spacing=list(dataset.spacing), normalization=dict(dataset.normalization),
            patch_size=list(config.patch_size), in_channels=dataset.in_channels, role=role,
            tap_names=encoder_tap_names(net_config), label_spec=_label_spec_record(dataset),
            provenance={"versions": _versions(), "train_config": config.to_dict(),
                        "cases": [c.case_id for c in train_set.cases], "source_sha256": dataset.source_hashes},
        )
        job = _Job("train-teacher", _SegModule(network), network, net_config, {}, False, card)
        return _run(job, config, train_set, val_set, out_dir, reporter, resume, device, dist_ctx)


def _dataset_spec(dataset: CaseSet) -> Any:
    """The dataset's ``nnunet.labels.LabelSpec`` when it has regions or an ignore label, else ``None``."""
    spec = getattr(dataset, "label_spec", None)
    return spec if spec is not None and (spec.has_regions or spec.ignore_label is not None) else None


def _output_channels(dataset: CaseSet) -> int:
    """Network outputs for ``dataset``: one sigmoid head per nnU-Net region, else one per class."""
    from ReCoKDLib.nnunet.labels import output_channels

    return output_channels(_dataset_spec(dataset), dataset.num_classes)


def _kd_num_classes(dataset: CaseSet) -> int:
    """``num_classes`` of the KD losses: classes, or background + regions (one mask per region)."""
    spec = _dataset_spec(dataset)
    return spec.num_heads + 1 if spec is not None and spec.has_regions else dataset.num_classes


def _label_spec_record(dataset: CaseSet) -> dict[str, Any]:
    """What a model card records of the dataset's label semantics (``ModelCard.label_spec``)."""
    from ReCoKDLib.nnunet.labels import card_label_spec

    spec = _dataset_spec(dataset)
    return card_label_spec(spec) if spec is not None else {}


def _check_teacher_labels(teacher_card: ckpt.ModelCard, dataset: CaseSet) -> None:
    """The teacher's outputs must mean what the dataset's labels mean (classes, or the same regions)."""
    from ReCoKDLib.nnunet.labels import label_spec_from_card

    teacher_spec, spec = label_spec_from_card(teacher_card), _dataset_spec(dataset)
    teacher_regions = teacher_spec is not None and teacher_spec.has_regions
    if teacher_regions or (spec is not None and spec.has_regions):
        if not (teacher_regions and spec is not None and spec.has_regions and teacher_spec.regions == spec.regions):
            raise TrainingError(
                f"the teacher's outputs are {'regions ' + str(teacher_spec.regions) if teacher_regions else 'classes'} "
                f"but the dataset's labels are {'regions ' + str(spec.regions) if spec and spec.has_regions else 'classes'}; "
                "distil on a dataset with the teacher's label definition (dataset.json 'labels')")
        return
    if list(teacher_card.classes) != list(dataset.class_names) and len(teacher_card.classes) != dataset.num_classes:
        raise TrainingError(
            f"the dataset has {dataset.num_classes} classes {dataset.class_names} but the teacher predicts "
            f"{len(teacher_card.classes)} {teacher_card.classes}; label maps must use the teacher's class ids"
        )


def _teacher_parts(teacher: Any) -> tuple[nn.Module, ckpt.ModelCard, str]:
    """``(network, card, sha256)`` of a teacher given as a model file path or a loaded model."""
    if isinstance(teacher, (str, os.PathLike)):
        path = Path(teacher)
        try:
            from ReCoKDLib.teachers import load_model
        except ImportError:
            load_model = None
        if load_model is not None:
            loaded = load_model(path, "cpu")
            sha = ckpt.sha256_file(path) if path.is_file() else getattr(loaded, "sha256", None)  # dir: nnU-Net folder
            return loaded.network, loaded.card, sha or _state_sha256(loaded.network)
        card, state = ckpt.load_model_file(path)
        if card.architecture.get("kind") != "dynunet":
            raise TrainingError(f"{path}: only built-in (dynunet) teachers can be loaded without ReCoKDLib.teachers")
        network = build_unet(UNetConfig.from_dict(card.architecture["config"]))
        network.load_state_dict(state)
        return network, card, ckpt.sha256_file(path)
    network, card = getattr(teacher, "network", None), getattr(teacher, "card", None)
    if network is None or card is None:
        raise TrainingError("teacher must be a model file path or an object with .network and .card (teachers.LoadedModel)")
    source = getattr(teacher, "source", "")
    sha = getattr(teacher, "sha256", None) or (ckpt.sha256_file(source) if source and Path(source).is_file() else None)
    return network, card, sha or card.provenance.get("sha256") or _state_sha256(network)


def _student_config(config: TrainConfig, teacher_card: ckpt.ModelCard) -> UNetConfig:
    from ReCoKDLib.nnunet.student import NNUNetStudentConfig, is_nnunet_architecture, student_architecture

    if is_nnunet_architecture(config.student_config):
        return NNUNetStudentConfig(config.student_config)  # type: ignore[return-value]
    if config.student_config is not None:
        return UNetConfig.from_dict(dict(config.student_config))
    if is_nnunet_architecture(teacher_card.architecture):  # nnU-Net teacher: its plans network, widths / 2**t
        return NNUNetStudentConfig(student_architecture(  # type: ignore[return-value]
            teacher_card.architecture, config.student_reduction, config.min_channels))
    if teacher_card.architecture.get("kind") != "dynunet":
        raise TrainingError(
            "the teacher is not a built-in U-Net, so the student cannot be derived from it: give the student "
            "architecture (student_config / --student-json) and the taps of both networks"
        )
    teacher_config = UNetConfig.from_dict(teacher_card.architecture["config"])
    return derive_student_config(teacher_config, config.student_reduction, config.min_channels)


#: KD methods that read only the logits (all others read tapped features)
OUTPUT_LEVEL_METHODS = frozenset({"logit"})


def _check_output_only_teacher(teacher: Any, card: ckpt.ModelCard, spec: Mapping[str, Any]) -> None:
    """A TorchScript teacher has no named modules to tap: refuse feature-level KD methods clearly."""
    kind = getattr(teacher, "kind", None) or card.architecture.get("kind")
    feature_methods = sorted(set(spec) - OUTPUT_LEVEL_METHODS)
    if kind == "torchscript" and feature_methods:
        raise TrainingError(
            f"the teacher is a TorchScript file: only output-level distillation (--kd logit) applies, but "
            f"{feature_methods} need its intermediate features. Give the eager architecture instead (an entry point "
            "with a state dict, or a teacher preset) to use feature methods")


def _kd_taps(config: TrainConfig, teacher_card: ckpt.ModelCard, student_config: Any,
             teacher_kind: str | None = None) -> tuple[list[str], list[str]]:
    """The teacher's and the student's module names whose features are distilled, paired in order.

    Explicit taps win, then the teacher card's; otherwise the encoder stages of a built-in or
    nnU-Net teacher. A TorchScript teacher distilled at the output level only (``logit``) has no
    taps at all.
    """
    kind = teacher_card.architecture.get("kind")
    teacher_taps = list(config.teacher_taps or teacher_card.tap_names or [])
    if not teacher_taps:
        if "torchscript" in (kind, teacher_kind) and not set(config.kd) - OUTPUT_LEVEL_METHODS:
            return [], []
        if kind == "nnunet":
            from ReCoKDLib.nnunet.network import encoder_tap_names as nnunet_tap_names

            teacher_taps = nnunet_tap_names(teacher_card.architecture)
        elif kind == "dynunet":
            teacher_taps = encoder_tap_names(UNetConfig.from_dict(teacher_card.architecture["config"]))
        else:
            raise TrainingError("give the teacher's tap names (teacher_taps / --teacher-taps) for this architecture")
    nnunet_student = hasattr(student_config, "build")  # nnunet.student.NNUNetStudentConfig
    student_taps = list(config.student_taps or (student_config.tap_names() if nnunet_student
                                                else _default_student_taps(teacher_card, teacher_taps, student_config)))
    if len(student_taps) != len(teacher_taps):
        raise TrainingError(f"{len(teacher_taps)} teacher taps but {len(student_taps)} student taps; pair them one to one")
    return teacher_taps, student_taps


def _default_student_taps(teacher_card: ckpt.ModelCard, teacher_taps: Sequence[str], student_config: UNetConfig) -> list[str]:
    """The student's encoder stages; for a preset teacher whose card records its taps' strides,
    the stages at those strides (``teacher_presets.student_taps_for``)."""
    strides = teacher_card.provenance.get("tap_strides") if isinstance(teacher_card.provenance, dict) else None
    if strides and list(teacher_taps) == list(teacher_card.tap_names):
        from ReCoKDLib.teacher_presets import student_taps_for

        return student_taps_for(strides, student_config)
    return encoder_tap_names(student_config)


def build_kd_module(spec: Mapping[str, Mapping[str, Any]], teacher_channels: Sequence[int],
                    student_channels: Sequence[int], num_classes: int) -> nn.Module:
    """The weighted KD loss of ``spec`` (``losses.registry.build_combined_kd_loss``)."""
    from ReCoKDLib.losses.registry import build_combined_kd_loss

    return build_combined_kd_loss(spec, teacher_channels=teacher_channels, student_channels=student_channels,
                                  num_classes=num_classes)


def distill(config: TrainConfig, teacher: Any, dataset: CaseSet, out_dir: str | os.PathLike,
            reporter: Reporter | None = None, resume: bool = False) -> TrainResult:
    """Distill a student from a frozen ``teacher`` on ``dataset``.

    Loss: Dice + CE (deep supervision) + ``kd_lambda(step) * KD``, the KD loss built from
    ``config.kd`` on the features tapped at ``config.teacher_taps`` / ``config.student_taps``
    (default: encoder stages without the bottleneck) and both networks' logits.

    Args:
        config: the run (see :class:`TrainConfig`); the student is ``config.student_config`` or the
            teacher's architecture with widths divided by ``config.student_reduction``.
        teacher: a ReCoKD model file path, or a loaded model with ``.network`` and ``.card``
            (``teachers.LoadedModel``). Frozen, eval mode, run under ``torch.no_grad``.
        dataset: preprocessed cases on the teacher's spacing and normalisation; the last
            ``config.num_val_cases`` are held out.
        out_dir, reporter, resume: as in :func:`train_teacher` (stage ``distill``).

    Returns:
        :class:`TrainResult` (``model_last.pt``/``model_best.pt`` hold the student).
    """
    from ReCoKDLib.taps import DistillationPair

    out_dir = Path(out_dir)
    reporter = reporter or Reporter()
    config, dist_ctx, device = _prepare_run(config, resume, out_dir)
    with _run_scope("distill", reporter, dist_ctx):
        teacher_net, teacher_card, teacher_sha = _teacher_parts(teacher)
        _check_teacher_labels(teacher_card, dataset)
        if teacher_card.in_channels != dataset.in_channels:
            raise TrainingError(f"the teacher takes {teacher_card.in_channels} channel(s), the dataset has {dataset.in_channels}")
        _check_output_only_teacher(teacher, teacher_card, config.kd)
        student_config = _student_config(config, teacher_card)
        _check_patch(config, student_config)
        nnunet_student = hasattr(student_config, "build")  # nnunet.student.NNUNetStudentConfig
        student = student_config.build() if nnunet_student else build_unet(student_config)
        teacher_taps, student_taps = _kd_taps(config, teacher_card, student_config, getattr(teacher, "kind", None))
        pair = DistillationPair(teacher_net.to(device), student.to(device), teacher_taps, student_taps,
                                (dataset.in_channels, *config.patch_size))
        kd_module = build_kd_module(config.kd, pair.teacher_channels, pair.student_channels, _kd_num_classes(dataset))
        train_set, val_set = dataset.split(config.num_val_cases)
        if val_set is not None and val_set.unlabelled_cases:
            reporter.warning("distill", f"held-out cases {val_set.unlabelled_cases} have no labels: no validation "
                                        "(put labelled cases last, or --val-cases 0)")
            val_set = None
        warmup = config.kd_warmup_steps if config.kd_warmup_steps is not None else int(round(0.6 * config.steps))
        kd_record = {"methods": config.kd, "kd_weight": config.kd_weight, "kd_warmup_steps": warmup,
                     "frozen_aux": config.frozen_aux, "teacher_taps": teacher_taps, "student_taps": student_taps,
                     "student_reduction": config.student_reduction if config.student_config is None else None}
        nnunet_record = {}
        if nnunet_student:  # what `recokd export --nnunet` needs: the teacher's plans and dataset.json
            from ReCoKDLib.nnunet.student import nnunet_context

            nnunet_record = {"nnunet": nnunet_context(teacher_card, getattr(teacher, "source", None) or
                                                      (teacher if isinstance(teacher, (str, os.PathLike)) else None))}
        card = ckpt.ModelCard(
            architecture=(student_config.to_dict() if nnunet_student
                          else {"kind": "dynunet", "config": student_config.to_dict()}),
            classes=list(teacher_card.classes), spacing=list(teacher_card.spacing),
            normalization=dict(teacher_card.normalization), patch_size=list(config.patch_size),
            in_channels=dataset.in_channels, role="student", tap_names=student_taps, kd=kd_record,
            label_spec=_label_spec_record(dataset) or dict(teacher_card.label_spec),
            provenance={"teacher_sha256": teacher_sha, "versions": _versions(), "train_config": config.to_dict(),
                        "cases": [c.case_id for c in train_set.cases], "source_sha256": dataset.source_hashes,
                        **nnunet_record},
        )
        job = _Job("distill", _DistillModule(pair, kd_module, _kd_num_classes(dataset), _dataset_spec(dataset)),
                   student, student_config, {"adapters": pair.adapters, "kd_loss": kd_module}, not config.frozen_aux,
                   card, warmup, {"teacher_sha256": teacher_sha})
        return _run(job, config, train_set, val_set, out_dir, reporter, resume, device, dist_ctx)
