"""What defines a run and what it returns: :class:`TrainConfig`, :class:`TrainResult`, the errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from ReCoKDLib.data.sampling import AugmentationConfig
from ReCoKDLib.networks import STEMS

TRAIN_STATE_FORMAT = "recokd-train-state"
CHECKPOINT_NAME = "checkpoint.pt"
STOP_FILE = "STOP"


class TrainingError(ValueError):
    """A training run cannot start or go on (configuration, inputs, resources)."""


class TrainingDivergedError(TrainingError):
    """Too many consecutive steps had a NaN or infinite loss."""



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
        inference_overlap: the sliding-window overlap ``recokd segment`` uses for the model made,
            written to its card (``ModelCard.inference``); ``None``: the default, 0.5. Lower is faster
            (0.25 slides 3/4 of a window instead of half); measure the labels it costs first.
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
        bf16: bf16 autocast on CPU where oneDNN has bf16 kernels (AVX-512 BF16 or AMX); float32 with a
            warning elsewhere (an AVX2-only CPU runs bf16 convolutions ~40x slower). fp32 by default.
        deterministic: ``torch.use_deterministic_algorithms`` (as far as the device allows).
        log_every: progress event every this many steps.
    Networks and KD (``distill`` only, except ``network``):
        network: architecture of ``train_teacher`` as ``UNetConfig.to_dict()``.
        student_reduction, min_channels: the student's widths ``max(C // r, min_channels)``.
        student_config: explicit student ``UNetConfig`` dict (overrides the reduction).
        student_norm: the derived student's normalisation, ``"instance"`` or ``"batch"`` (``None``: the
            teacher's). ``"batch"`` makes the student fully convolutional at inference: it segments a
            scan in the largest window memory allows (``UNetConfig.norm``). Built-in U-Net teachers only.
        student_stem: ``"full"`` (the teacher's stages) or ``"strided"``: the derived student without
            the teacher's full-resolution stage (``networks.derive_student_config``); its KD taps are
            the teacher's taps at the student's strides. Built-in U-Net teachers only.
        teacher_taps, student_taps: distilled module names (default: encoder stages).
        kd: ``{method: {"weight": w, **options}}`` (see ``losses.registry``).
        kd_weight: ``lambda`` after warm-up (ReCo-KD: 0.01).
        kd_warmup_steps: linear warm-up of ``lambda`` from 0; ``None`` = 60 % of ``steps``
            (ReCo-KD: 600 of 1000 epochs).
        frozen_aux: keep adapters and KD-loss modules at their initialisation (ablation of the
            authors' release); by default they are optimised.
        teacher_outputs: ``"auto"`` (default), ``"cache"`` or ``"live"``: the frozen teacher's outputs
            computed once per training case on the whole volume and read with each patch
            (``engine.teacher_cache``; ``2 * (K + sum_l C_l / s_l^3)`` bytes per voxel on disk), or the
            teacher run on every patch. ``auto`` caches when every case fits one exact whole-volume
            pass, else stays live.
        teacher_cache_dir: folder of that cache (default ``<out>/teacher_cache``); share one across runs.
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
    inference_overlap: float | None = None
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
    student_norm: str | None = None
    student_stem: str = "full"
    teacher_taps: list[str] | None = None
    student_taps: list[str] | None = None
    kd: dict[str, dict[str, Any]] = field(default_factory=lambda: {"recokd": {"weight": 1.0}})
    kd_weight: float = 0.01
    kd_warmup_steps: int | None = None
    frozen_aux: bool = False
    pseudo_label_weight: float = 1.0
    teacher_outputs: str = "auto"
    teacher_cache_dir: str | None = None

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
        if self.inference_overlap is not None and not 0 <= self.inference_overlap < 1:
            problems.append(f"inference_overlap must be in [0, 1), got {self.inference_overlap}")
        if self.pseudo_label_weight < 0:
            problems.append(f"pseudo_label_weight must be >= 0, got {self.pseudo_label_weight}")
        if self.teacher_outputs not in ("auto", "cache", "live"):
            problems.append(f"teacher_outputs must be 'auto', 'cache' or 'live', got {self.teacher_outputs!r}")
        if self.student_norm not in (None, "instance", "batch"):
            problems.append(f"student_norm must be None, 'instance' or 'batch', got {self.student_norm!r}")
        if self.student_stem not in STEMS:
            problems.append(f"student_stem must be one of {', '.join(STEMS)}, got {self.student_stem!r}")
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
