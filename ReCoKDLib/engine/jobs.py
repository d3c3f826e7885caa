"""The two public jobs: :func:`train_teacher` and :func:`distill` (see :mod:`ReCoKDLib.engine`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ReCoKDLib import checkpoint as ckpt
from ReCoKDLib.data.sampling import CaseSet
from ReCoKDLib.engine.config import TrainConfig, TrainingError, TrainResult
from ReCoKDLib.engine.distributed import _barrier, _Dist
from ReCoKDLib.engine.loop import _Job, _check_patch, _prepare_run, _run, _run_scope, options_ignored_on_resume
from ReCoKDLib.engine.modules import _DistillModule, _SegModule, build_kd_module
from ReCoKDLib.engine.pairing import (OUTPUT_LEVEL_METHODS, teacher_size_step, _check_output_only_teacher, _check_teacher_labels, _dataset_spec, _kd_num_classes,
                                     _kd_taps, _label_spec_record, _output_channels, _student_config, _teacher_parts)
from ReCoKDLib.engine.parts import flush_denormals
from ReCoKDLib.engine.state import _versions
from ReCoKDLib.networks import UNetConfig, build_unet, encoder_tap_names
from ReCoKDLib.progress import Reporter


def _prepare_and_warn(config: TrainConfig, resume: bool, out_dir: Path, stage: str, reporter: Reporter):
    """:func:`~ReCoKDLib.engine.loop._prepare_run`, with a warning naming the options a resumed run
    ignores (a resumed run is the checkpoint's run: only its budget, device and logging may change)."""
    prepared = _prepare_run(config, resume, out_dir)
    ignored = options_ignored_on_resume(config, prepared[0]) if resume else []
    if ignored and prepared[1].main:
        reporter.warning(stage, f"resuming the run in {out_dir} with its own configuration: "
                                f"{', '.join(ignored)} differ from it and are ignored (a new --out starts a new run)")
    return prepared


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
    config, dist_ctx, device = _prepare_and_warn(config, resume, out_dir, "train-teacher", reporter)
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
            inference=_inference_record(config),
            provenance={"versions": _versions(), "train_config": config.to_dict(),
                        "cases": [c.case_id for c in train_set.cases], "source_sha256": dataset.source_hashes},
        )
        job = _Job("train-teacher", _SegModule(network), network, net_config, {}, False, card)
        return _run(job, config, train_set, val_set, out_dir, reporter, resume, device, dist_ctx)



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
    config, dist_ctx, device = _prepare_and_warn(config, resume, out_dir, "distill", reporter)
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
        needs_features = bool(set(config.kd) - OUTPUT_LEVEL_METHODS)
        if needs_features or config.teacher_outputs == "live":
            teacher_taps, student_taps = _kd_taps(config, teacher_card, student_config, getattr(teacher, "kind", None))
        else:  # logits only, read from the cache: nothing to tap
            teacher_taps, student_taps = [], []
        with flush_denormals():  # the pair probes the teacher once: a big trained one is minutes slower with subnormals
            pair = DistillationPair(teacher_net.to(device), student.to(device), teacher_taps, student_taps,
                                    (dataset.in_channels, *config.patch_size))
        kd_module = build_kd_module(config.kd, pair.teacher_channels, pair.student_channels, _kd_num_classes(dataset))
        train_set, val_set = dataset.split(config.num_val_cases)
        if val_set is not None and val_set.unlabelled_cases:
            reporter.warning("distill", f"held-out cases {val_set.unlabelled_cases} have no labels: no validation; "
                                        "they are trained on (put labelled cases last to validate on them)")
            train_set, val_set = dataset, None
        train_set, outputs_record = _teacher_outputs(config, pair, teacher_card, teacher_sha, train_set, out_dir,
                                                     device, reporter, dist_ctx, needs_features)
        warmup = config.kd_warmup_steps if config.kd_warmup_steps is not None else int(round(0.6 * config.steps))
        kd_record = {"methods": config.kd, "kd_weight": config.kd_weight, "kd_warmup_steps": warmup,
                     "frozen_aux": config.frozen_aux, "teacher_taps": teacher_taps, "student_taps": student_taps,
                     "teacher_outputs": outputs_record,
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
            postprocessing=dict(teacher_card.postprocessing),  # the same classes: segmented as the teacher is
            inference=_inference_record(config),
            provenance={"teacher_sha256": teacher_sha, "versions": _versions(), "train_config": config.to_dict(),
                        "cases": [c.case_id for c in train_set.cases], "source_sha256": dataset.source_hashes,
                        **nnunet_record},
        )
        job = _Job("distill", _DistillModule(pair, kd_module, _kd_num_classes(dataset), _dataset_spec(dataset)),
                   student, student_config, {"adapters": pair.adapters, "kd_loss": kd_module}, not config.frozen_aux,
                   card, warmup, {"teacher_sha256": teacher_sha})
        return _run(job, config, train_set, val_set, out_dir, reporter, resume, device, dist_ctx)


def _inference_record(config: TrainConfig) -> dict[str, Any]:
    """The card's ``inference`` record: the overlap ``recokd segment`` uses for this model, when set."""
    return {} if config.inference_overlap is None else {"overlap": float(config.inference_overlap)}


def _teacher_outputs(config: TrainConfig, pair: Any, teacher_card: ckpt.ModelCard, teacher_sha: str,
                     train_set: CaseSet, out_dir: Path, device: Any, reporter: Reporter, dist_ctx: _Dist,
                     needs_features: bool) -> tuple[CaseSet, dict[str, Any]]:
    """The training cases with their teacher outputs cached (``engine.teacher_cache``), or unchanged
    when the teacher runs live; and the record the model card keeps of the choice."""
    from ReCoKDLib.engine.teacher_cache import CachePlan, TeacherCacheError, attach_teacher_targets, choose_mode

    reporter = reporter if dist_ctx.main else Reporter()  # other ranks stay silent
    taps = tuple(pair.teacher_taps) if needs_features else ()
    strides = tuple(pair.teacher_strides) if needs_features else ()
    if any(s is None for s in strides):
        if config.teacher_outputs == "cache":
            raise TrainingError(f"cannot cache the teacher's features: their strides are not whole on the patch "
                                f"{tuple(config.patch_size)}; use teacher_outputs 'live'")
        strides, taps = (), ()
    plan = CachePlan(teacher_sha, taps, strides, tuple(int(p) for p in teacher_card.patch_size),  # type: ignore[arg-type]
                     teacher_size_step(teacher_card, pair.teacher, strides))
    mode, why = choose_mode(config.teacher_outputs, plan, [c.shape for c in train_set.cases])
    if needs_features and not taps and mode == "cache":
        mode, why = "live", "the teacher's feature strides are not whole multiples of the patch"
    if mode == "live":
        reporter.log("distill", f"teacher outputs: live ({why})")
        return train_set, {"mode": "live", "why": why}
    cache_dir = Path(config.teacher_cache_dir) if config.teacher_cache_dir else out_dir / "teacher_cache"
    reporter.log("distill", f"teacher outputs: cached in {cache_dir} ({why})")
    try:
        for turn in (True, False):  # under DDP the main process computes, the others read
            if dist_ctx.main == turn:
                cached, record = attach_teacher_targets(train_set, pair.teacher_forward, plan, cache_dir, device,
                                                        reporter)
            _barrier(dist_ctx)
    except (TeacherCacheError, RuntimeError) as exc:
        if config.teacher_outputs == "cache" or isinstance(exc, TeacherCacheError) and "write" in str(exc):
            raise TrainingError(f"caching the teacher's outputs failed: {exc}") from exc
        reporter.warning("distill", f"the teacher cannot run on a whole volume ({exc}); teacher outputs: live")
        return train_set, {"mode": "live", "why": f"whole-volume pass failed: {exc}"}
    pair.release_teacher()
    return cached, {**record, "why": why}
