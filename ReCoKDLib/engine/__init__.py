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

The package, one job per module: :mod:`.config` (what defines a run), :mod:`.parts` (schedules,
segmentation loss, device, EMA), :mod:`.distributed`, :mod:`.pseudo_labels` (label-free targets),
:mod:`.modules` (what DDP wraps), :mod:`.pairing` (teacher/student/taps decisions), :mod:`.state`
(RNG and hashes in checkpoints), :mod:`.validation`, :mod:`.loop` (the run loop) and :mod:`.jobs`
(:func:`train_teacher`, :func:`distill`).
"""

from __future__ import annotations

from ReCoKDLib.engine.config import (CHECKPOINT_NAME, STOP_FILE, TRAIN_STATE_FORMAT, TrainConfig, TrainingDivergedError,
                                     TrainingError, TrainResult)
from ReCoKDLib.engine.jobs import distill, train_teacher
from ReCoKDLib.engine.modules import build_kd_module
from ReCoKDLib.engine.modules import _DistillModule, _SegModule  # noqa: F401  (tests and tools import them here)
from ReCoKDLib.engine.pairing import OUTPUT_LEVEL_METHODS
from ReCoKDLib.engine.pairing import _teacher_parts  # noqa: F401
from ReCoKDLib.engine.parts import (ModelEMA, build_seg_loss, deep_supervision_weights, kd_lambda, poly_lr,
                                    resolve_device, training_precision)
from ReCoKDLib.engine.pseudo_labels import (merge_pseudo_labels, merge_region_pseudo_labels, pseudo_weighted_seg_loss,
                                            unlabelled_samples)
from ReCoKDLib.engine.validation import dice_per_class, validate

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
    "training_precision",
    "ModelEMA",
    "TRAIN_STATE_FORMAT",
    "merge_pseudo_labels",
    "merge_region_pseudo_labels",
    "unlabelled_samples",
    "pseudo_weighted_seg_loss",
    "dice_per_class",
    "validate",
    "build_kd_module",
    "OUTPUT_LEVEL_METHODS",
    "CHECKPOINT_NAME",
    "STOP_FILE",
]
