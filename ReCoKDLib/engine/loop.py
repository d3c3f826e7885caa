"""The run loop shared by teacher training and distillation: sample, step, validate, checkpoint, resume,
cancel (see :mod:`ReCoKDLib.engine`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ReCoKDLib import checkpoint as ckpt
from ReCoKDLib import stopping
from ReCoKDLib.data.sampling import AugmentationConfig, CaseSet, PatchSampler
from ReCoKDLib.engine.config import CHECKPOINT_NAME, STOP_FILE, TRAIN_STATE_FORMAT, TrainConfig, TrainingDivergedError, TrainingError, TrainResult
from ReCoKDLib.engine.distributed import _Dist, _all_max, _finish_dist, _gather, _init_distributed
from ReCoKDLib.engine.parts import (ModelEMA, flush_denormals, _autocast, _autocast_dtype, build_seg_loss, kd_lambda,
                                    poly_lr, resolve_device, training_precision)
from ReCoKDLib.engine.pseudo_labels import pseudo_weighted_seg_loss
from ReCoKDLib.engine.state import _rng_state, _set_rng_state
from ReCoKDLib.engine.validation import validate
from ReCoKDLib.networks import UNetConfig, build_unet, count_parameters, split_deep_supervision
from ReCoKDLib.progress import Reporter


FP32_AFTER_OVERFLOW = 100
"""Steps trained in float32 after a bf16 autocast step gave NaN/Inf (that step is redone in float32)."""


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
        stopping.note_signal(signum)  # the CLI ends with 143 and the resume command

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _checkpoint_state(ckpt_path: Path, saved_step: int) -> str:
    """What is left to resume from after a failure: only a checkpoint that exists is called intact."""
    if saved_step >= 0:
        return f"The last good checkpoint {ckpt_path} (step {saved_step}) is intact: resume from it with --resume."
    if ckpt_path.is_file():
        return f"The checkpoint {ckpt_path} this run started from is intact: resume from it with --resume."
    return "No checkpoint was written before it (there is nothing to resume): start the run again."


def _fresh(job: _Job) -> nn.Module:
    """A new network of the job's architecture on CPU (no hooks, no cached outputs)."""
    build = getattr(job.network_config, "build", None)  # nnU-Net students (nnunet.student.NNUNetStudentConfig)
    return build() if build is not None else build_unet(job.network_config)



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
    if config.bf16 and device.type == "cpu" and dtype is None:
        say.warning(stage, "bf16 asked for, but this CPU has no bf16 kernels (AVX-512 BF16 or AMX): training in "
                           "float32 (bf16 would be many times slower here)")
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
    fp32_until = 0  # after a bf16 overflow: float32 up to this step
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
        fp32_until = int(state.get("fp32_until", 0))
        history = json.loads(state["history"])
        last_metrics = json.loads(state.get("metrics", "{}"))
        say.log(stage, f"resumed from {ckpt_path} at step {step}")
    elif resume:
        say.log(stage, f"no checkpoint in {out_dir}; starting a new run")

    fp32_redone: list[int] = history.setdefault("fp32_redone", [])  # steps whose bf16 pass overflowed
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
        card = dataclasses.replace(job.card, metrics={**job.card.metrics, **metrics, "step": step,
                                                      "training_precision": training_precision(device, config)},
                                   patch_size=list(config.patch_size))
        return ckpt.save_model(path, eval_network().state_dict(), card)

    def forward_backward(images: Tensor, labels: Tensor, cached: dict[str, Any], step: int,
                         step_dtype: torch.dtype | None) -> tuple[bool, Tensor, Tensor, float, Tensor | None, dict]:
        """One forward and backward pass under ``step_dtype`` autocast (``None``: float32). Returns
        whether the loss and the gradients are finite on every process, then the loss, its
        segmentation part, the KD weight, the KD loss and its terms. Gradients are left for the
        optimizer only when finite (with fp16 loss scaling the scaler judges them itself)."""
        with _autocast(device, step_dtype):
            out, kd_loss, kd_terms, *targets = wrapped(images, labels, **cached)
        seg_labels, unlabelled = targets[0] if targets else (labels, None)  # label-free: teacher argmax
        seg = pseudo_weighted_seg_loss(seg_loss, [o.float() for o in split_deep_supervision(out)], seg_labels,
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
                # a finite loss can still give NaN/Inf gradients (bf16 autocast): stepping would poison
                # the weights for good (with fp16 loss scaling the scaler skips the step itself)
                (bad_grads,) = _all_max([0.0 if bool(torch.isfinite(norm).item()) else 1.0], dist_ctx)
                finite_all = bad_grads == 0.0
        elif dist_ctx.active:
            # DDP expects a backward after each forward: run one whose gradients are dropped
            (loss * 0.0).backward()
        if not finite_all:
            optimizer.zero_grad(set_to_none=True)
        return bool(finite_all), loss, seg, lam, kd_loss, kd_terms

    saved_at = [-1]  # step of the last checkpoint written

    def save_state() -> Path:
        samplers = _gather(sampler.state_dict(), dist_ctx)  # every rank takes part
        saved_at[0] = step
        if dist_ctx.main:
            payload = {
                "format": TRAIN_STATE_FORMAT, "version": 1, "job": stage, "identity": job.identity,
                "config": json.dumps(config.to_dict()), "step": step, "best_metric": best, "best_step": best_step,
                "bad_validations": bad_vals, "nonfinite": nonfinite,
                "fp32_until": fp32_until,
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
    with _CancelFlag() as cancel, flush_denormals():  # subnormals slow CPU arithmetic 30x
        while step < total:
            stop_now, early = _all_max([float(cancel.set or stop_path.exists()), float(stopped_early)], dist_ctx)
            if stop_now or early:
                cancelled, stopped_early = bool(stop_now), bool(early)
                break
            lr = poly_lr(config.lr, step, total, config.poly_power)
            for group in optimizer.param_groups:
                group["lr"] = lr
            drawn = sampler.draw(config.batch_size)
            images, labels = drawn.images.to(device), drawn.labels.to(device)
            cached = {} if drawn.teacher_logits is None else {  # the teacher's outputs from its cache
                "teacher_logits": drawn.teacher_logits.to(device),
                "teacher_features": [f.to(device) for f in drawn.teacher_features]}
            try:
                step_dtype = dtype if step >= fp32_until else None
                finite_all, loss, seg, lam, kd_loss, kd_terms = forward_backward(images, labels, cached, step, step_dtype)
                if not finite_all and step_dtype is not None and not scaler.is_enabled():
                    # bf16 autocast (no loss scaling) can overflow in a convolution's backward even when the
                    # float32 step is fine (seen with ReCo-KD: NaN weight gradients for several steps in a
                    # row): redo this step in float32 and stay there for a while instead of skipping steps
                    # until the run is stopped as diverged
                    fp32_until = step + FP32_AFTER_OVERFLOW
                    fp32_redone.append(step + 1)
                    finite_all, loss, seg, lam, kd_loss, kd_terms = forward_backward(images, labels, cached, step, None)
                    outcome = "finite" if finite_all else "still not finite"
                    say.warning(stage, f"{str(dtype).removeprefix('torch.')} autocast gave NaN/Inf at step {step + 1}: "
                                       f"step redone in float32 ({outcome}); float32 until step {fp32_until}", step=step)
                if finite_all:
                    scaler.step(optimizer)
                else:
                    optimizer.zero_grad(set_to_none=True)
                scaler.update()
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
                        f"{nonfinite} consecutive steps had a NaN/Inf loss or gradients (last at step {step + 1}); stopped. "
                        f"{_checkpoint_state(ckpt_path, saved_at[0])} Lower --lr or the KD weight, check the inputs for "
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


#: what a resumed run takes from the caller; everything else comes from the checkpoint
RESUME_OVERRIDES = ("steps", "device", "log_every")


def options_ignored_on_resume(asked: TrainConfig, resumed: TrainConfig) -> list[str]:
    """The fields of ``asked`` that a resumed run does not take (they differ from the checkpoint's
    configuration ``resumed``, and are not :data:`RESUME_OVERRIDES`)."""
    a, r = asked.to_dict(), resumed.to_dict()
    return [k for k in a if k not in RESUME_OVERRIDES and json.dumps(a[k], sort_keys=True) != json.dumps(r.get(k), sort_keys=True)]


def _prepare_run(config: TrainConfig, resume: bool, out_dir: Path) -> tuple[TrainConfig, _Dist, torch.device]:
    """Stored configuration on resume, process group, device, seeds and determinism."""
    stored = out_dir / CHECKPOINT_NAME
    if resume and stored.exists():
        state = ckpt.safe_torch_load(stored)
        if isinstance(state, dict) and "config" in state:
            stored_config = json.loads(state["config"])
            stored_config.setdefault("teacher_outputs", "live")  # written before the teacher cache existed
            saved = TrainConfig.from_dict(stored_config)
            # the budget and the device may change on resume; everything else is the stored run's
            config = saved.replace(**{k: getattr(config, k) for k in RESUME_OVERRIDES})
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



@contextlib.contextmanager
def _run_scope(stage: str, reporter: Reporter, dist_ctx: _Dist) -> Iterator[None]:
    """Around a whole run: a bad-input error is reported once (on the main process) and marked so
    the CLI does not print it again; the process group is torn down however the run ends."""
    try:
        yield
    except (TrainingError, ValueError) as exc:
        from ReCoKDLib.trust import error_fields

        (reporter if dist_ctx.main else Reporter()).error(stage, str(exc), **error_fields(exc))
        exc.recokd_reported = True  # type: ignore[attr-defined]
        raise
    finally:
        _finish_dist(dist_ctx)
