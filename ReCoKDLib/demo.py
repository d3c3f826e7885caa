"""The CT demo end to end: teacher, plain student, ReCo-KD student, evaluation, report.

``recokd demo`` runs :func:`ReCoKDLib.demo_heads.run_heads_demo` (a real pretrained teacher, HD-BET,
distilled label-free); :func:`run_ct_demo` is ``recokd demo --task ct``, the whole job with a teacher
trained here (a small one, so its Dice is low on 2 cores: it shows the pipeline, not a strong teacher):

1. fetch the real CT organ dataset (TotalSegmentator reference scans S1 and S3, see
   ``ReCoKDLib.data.fetch``) and preprocess its training scan (3 mm, CT normalisation);
2. train a small nnU-Net-like teacher (``networks.PRESETS["ct_demo"]``, 4 M parameters), or
   reuse the one a previous run left in ``out/teacher`` when its configuration is the same;
3. train the ×4-thinner student without distillation: the teacher's stages with widths ÷4 (0.26 M
   parameters) and batch norm, so that it segments a CT in one window over the whole scan, several
   times faster on a CPU than in overlapping patches (``benchmarks/segment_speed.py``);
   ``student_norm=None`` gives the student as derived from the teacher (instance norm);
4. distill the same student from the teacher with ReCo-KD (MS-SARD + MS-CA), same steps and seed;
5. evaluate all three on the held-out scan S3 (per-class Dice and HD95, parameters, FLOPs, CPU
   latency), write ``out/metrics.json`` and ``out/report.html``, print the table.

Every stage is resumable: the training runs write atomic checkpoints, and a second ``recokd
demo --task ct --out DIR`` continues or reuses what the first one finished.

The default configuration is sized for 2 CPU cores within 15 minutes (steps, not wall time, set
the budget); ``full=True`` is the longer configuration for a workstation or a GPU.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ReCoKDLib.progress import Reporter

STAGE = "demo"
MODEL_NAMES = ("teacher", "student", "distilled")


@dataclass(frozen=True)
class DemoConfig:
    """Budget and settings of the demo. Steps set the budget (wall time varies with the machine).

    Attributes:
        teacher_steps / student_steps: optimiser steps of the teacher and of each student run.
        patch_size: training patch ``(D, H, W)`` at 3 mm (S3 covers only 40 mm in z).
        batch_size: patches per step.
        spacing: target spacing ``(D, H, W)`` in mm.
        reduction: the student's width divisor (2**t).
        student_norm: the students' normalisation: ``"batch"`` (default: fixed statistics, so ``recokd
            segment`` runs them in one window over the whole scan) or ``None`` (the teacher's instance norm).
            On the efficacy benchmark's CT task (4,000 steps, 3 seeds) the plain batch-norm ÷4 student
            scored test Dice 0.256 / 0.267 / 0.338 against 0.217 / 0.261 / 0.313 with instance norm.
        student_stem: ``"full"`` (default: the teacher's stages) or ``"strided"`` (no full-resolution
            stage, :func:`~ReCoKDLib.networks.derive_student_config`: faster still; with batch norm it
            scored 0.248 / 0.235 on seeds 0 and 2 of the same benchmark).
        kd: the KD method(s) of the distilled student (``losses.registry`` spec).
        kd_weight: lambda of the KD term after warm-up.
        lr: AdamW learning rate (poly decay).
        bf16: bf16 autocast on CPU (measured ~2x faster on AVX-512 bf16 CPUs).
        seed: same seed for both students, so the only difference is distillation.
        latency_repeats: whole-volume CPU runs per model for the latency (median).
    """

    teacher_steps: int = 550
    student_steps: int = 350
    patch_size: tuple[int, int, int] = (16, 96, 96)
    batch_size: int = 2
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    reduction: int = 4
    student_norm: str | None = "batch"
    student_stem: str = "full"
    kd: str = "recokd"
    kd_weight: float = 0.01
    lr: float = 2e-3
    bf16: bool = True
    seed: int = 42
    latency_repeats: int = 3


FULL = DemoConfig(teacher_steps=4000, student_steps=3000, patch_size=(16, 128, 128), batch_size=2)


def _train_config(config: DemoConfig, steps: int, device: str, **extra: Any):
    from ReCoKDLib.engine import TrainConfig

    return TrainConfig(
        patch_size=config.patch_size, batch_size=config.batch_size, steps=steps, num_val_cases=0,
        val_every=steps, checkpoint_every=50, optimizer="adamw", lr=config.lr, weight_decay=1e-4,
        ema_decay=0.0, seed=config.seed, device=device, bf16=config.bf16, log_every=5, **extra,
    )


#: TrainConfig fields that say where something is kept, not what is trained: a finished run reached
#: by another path (a moved or copied output folder, relative vs absolute) is still the same run
LOCATION_FIELDS = ("teacher_cache_dir",)


def _training_part(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (JSON types) without :data:`LOCATION_FIELDS`."""
    return {k: v for k, v in json.loads(json.dumps(config)).items() if k not in LOCATION_FIELDS}  # tuples -> lists


def _finished_model(out_dir: Path, expected_config: dict[str, Any]) -> Path | None:
    """``out_dir/model_last.pt`` when a finished run with the same configuration (where things are
    kept aside: :data:`LOCATION_FIELDS`) left it there."""
    from ReCoKDLib.checkpoint import CheckpointError, read_model_card

    model = out_dir / "model_last.pt"
    done = out_dir / "DONE.json"
    if not (model.is_file() and done.is_file()):
        return None
    try:
        recorded = json.loads(done.read_text())
        read_model_card(model)
    except (OSError, ValueError, CheckpointError):
        return None
    return model if _same_run(recorded.get("train_config") or {}, expected_config) else None


def _with_new_defaults(recorded: dict[str, Any]) -> dict[str, Any]:
    """A recorded ``TrainConfig`` dict with the defaults of fields added since it was written (a
    run finished before ``student_stem`` existed is the same run as one with ``"full"``)."""
    import dataclasses

    from ReCoKDLib.engine.config import TrainConfig

    added = {f.name: f.default for f in dataclasses.fields(TrainConfig)
             if f.name not in recorded and f.default is not dataclasses.MISSING}
    return {**added, **recorded}


def _checkpoint_config(path: Path) -> dict[str, Any] | None:
    """The ``TrainConfig`` dict a training checkpoint was written with, or ``None`` when unreadable."""
    from ReCoKDLib.checkpoint import CheckpointError, safe_torch_load

    try:
        state = safe_torch_load(path)
        return json.loads(state["config"]) if isinstance(state, dict) and "config" in state else None
    except (OSError, ValueError, KeyError, TypeError, CheckpointError):
        return None


def _same_run(recorded: dict[str, Any] | None, expected: dict[str, Any], ignoring: tuple[str, ...] = ()) -> bool:
    """A recorded configuration (``DONE.json``'s or a checkpoint's) names the run ``expected``
    describes, up to ``ignoring``, :data:`LOCATION_FIELDS` and fields added since it was written."""
    if recorded is None:
        return False

    def part(config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in _training_part(config).items() if k not in ignoring}

    return part(_with_new_defaults(recorded)) == part(expected)


def run_or_reuse(name: str, out_dir: Path, train_config, start, reporter: Reporter) -> Path:
    """Reuse a finished run with the same configuration, resume an interrupted one, or start it."""
    from ReCoKDLib.checkpoint import atomic_write_text
    from ReCoKDLib.engine.loop import RESUME_OVERRIDES

    expected = train_config.to_dict()
    reused = _finished_model(out_dir, expected)
    if reused is not None:
        reporter.log(STAGE, f"{name}: reusing the finished run in {out_dir}")
        return reused
    checkpoint = out_dir / "checkpoint.pt"
    resume = checkpoint.is_file()
    if resume and not _same_run(_checkpoint_config(checkpoint), expected, ignoring=RESUME_OVERRIDES):
        # The engine resumes a checkpoint's own configuration: one of another configuration (a run
        # with other options, finished or not) would be continued instead of the run asked for.
        reporter.warning(STAGE, f"{name}: the checkpoint in {out_dir} is from another configuration; starting afresh")
        checkpoint.unlink()
        (out_dir / "DONE.json").unlink(missing_ok=True)
        resume = False
    if resume:
        reporter.log(STAGE, f"{name}: resuming the interrupted run in {out_dir}")
    else:
        reporter.log(STAGE, f"{name}: training ({train_config.steps} steps)")
    result = start(resume)
    if result.cancelled:
        raise KeyboardInterrupt(f"{name} was cancelled; run the same command again to resume")
    atomic_write_text(out_dir / "DONE.json", json.dumps({"train_config": expected, "step": result.step}, indent=2))
    return result.last_model


def format_table(metrics: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: Dice per class and mean, parameters and CPU latency per model."""
    names = [n for n in MODEL_NAMES if n in metrics] + [n for n in metrics if n not in MODEL_NAMES]
    classes = list(next(iter(metrics.values()))["dice"].keys())
    width = max(len(c) for c in classes + ["mean Dice", "parameters", "CPU latency bf16 (s)"]) + 2
    head = "".ljust(width) + "".join(n.rjust(12) for n in names)

    def cell(value: Any, fmt: str) -> str:
        return (format(value, fmt) if isinstance(value, (int, float)) else "n/a").rjust(12)

    rows = [head, "-" * len(head)]
    for cls in classes:
        rows.append(cls.ljust(width) + "".join(cell(metrics[n]["dice"].get(cls), ".3f") for n in names))
    rows.append("-" * len(head))
    rows.append("mean Dice".ljust(width) + "".join(cell(metrics[n].get("mean_dice"), ".3f") for n in names))
    rows.append("parameters".ljust(width) + "".join(cell(metrics[n].get("params"), ",d") for n in names))
    rows.append("CPU latency fp32 (s)".ljust(width) + "".join(cell(metrics[n].get("latency_s"), ".2f") for n in names))
    rows.append("CPU latency bf16 (s)".ljust(width) + "".join(cell(metrics[n].get("latency_bf16_s"), ".2f") for n in names))
    return "\n".join(rows)


def run_ct_demo(
    out_dir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    config: DemoConfig = DemoConfig(),
    device: str = "auto",
    reporter: Reporter | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the whole job; returns the content of ``out_dir/metrics.json``.

    Args:
        out_dir: everything goes here: ``teacher/``, ``student/``, ``distilled/`` (runs with
            checkpoints and model files), ``preprocessed/`` (cache), ``metrics.json``,
            ``report.html``, ``summary.txt``.
        data_dir: where the sample data is fetched (default: ``recokd data fetch``'s default).
        config: the budget (:class:`DemoConfig`; :data:`FULL` for the long configuration).
        device: ``auto``, ``cpu`` or ``cuda[:i]`` for training; latency is measured on the CPU.
        reporter: progress events (stages ``fetch``, ``preprocess``, ``train-teacher``,
            ``distill``, ``evaluate``, ``demo``).
    """
    from ReCoKDLib.checkpoint import atomic_write_text
    from ReCoKDLib.data.fetch import fetch_datasets
    from ReCoKDLib.data.layout import RawDataset
    from ReCoKDLib.data.preprocess import compute_normalization, preprocess_case
    from ReCoKDLib.data.sampling import prepare_cases
    from ReCoKDLib.engine import distill, train_teacher
    from ReCoKDLib.evaluate import evaluate_models
    from ReCoKDLib.networks import derive_student_config, preset

    reporter = reporter or Reporter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reporter.start(STAGE, total=5, message=f"writing to {out}")

    # 1. Data ---------------------------------------------------------------------------------
    datasets = fetch_datasets(data_dir, only="ct", reporter=reporter)
    raw = RawDataset.open(next(iter(datasets.values())))
    if not raw.test_cases():
        raise ValueError(f"{raw.root} has no test case; re-run 'recokd data fetch --force --only ct'")
    images, labels = [], []
    for case in raw.training_cases():
        image, label, _ = raw.load_case(case)
        images.append(image)
        labels.append(label)
    normalization = compute_normalization(images, labels, scheme="ct")
    del images, labels
    reporter.start("preprocess", total=len(raw.training_cases()))
    case_set = prepare_cases(
        raw.training_cases(), raw.class_names, preprocess_case,
        {"spacing": list(config.spacing), "normalization": normalization}, out / "preprocessed",
        lambda i, n, cid, cached: reporter.progress("preprocess", i, n, message=f"{cid} ({'cache' if cached else 'new'})"),
    )
    reporter.done("preprocess", path=str(out / "preprocessed"))
    reporter.progress(STAGE, 1, 5, message=f"data: {raw.name}, {len(raw.training_cases())} training / "
                      f"{len(raw.test_cases())} test scan(s), {raw.num_classes - 1} organs")

    # 2. Teacher -------------------------------------------------------------------------------
    teacher_net = preset("ct_demo").to_dict()
    teacher_cfg = _train_config(config, config.teacher_steps, device, network=teacher_net)
    teacher = run_or_reuse("teacher", out / "teacher", teacher_cfg,
                            lambda resume: train_teacher(teacher_cfg, case_set, out / "teacher", reporter, resume=resume),
                            reporter)
    reporter.progress(STAGE, 2, 5, message=f"teacher: {teacher}")

    # 3. Plain student: the teacher's architecture, widths / reduction, no distillation ---------
    student_net = derive_student_config(preset("ct_demo", num_classes=raw.num_classes), config.reduction,
                                        norm=config.student_norm, stem=config.student_stem).to_dict()
    student_cfg = _train_config(config, config.student_steps, device, network=student_net)
    student = run_or_reuse("student", out / "student", student_cfg,
                            lambda resume: train_teacher(student_cfg, case_set, out / "student", reporter, resume=resume,
                                                         role="student"),
                            reporter)
    reporter.progress(STAGE, 3, 5, message=f"plain student: {student}")

    # 4. Distilled student: same architecture, steps and seed, plus ReCo-KD ----------------------
    from ReCoKDLib.losses.registry import parse_kd_spec

    distill_cfg = _train_config(config, config.student_steps, device, student_reduction=config.reduction,
                                student_norm=config.student_norm, student_stem=config.student_stem,
                                kd=parse_kd_spec(config.kd), kd_weight=config.kd_weight)
    distilled = run_or_reuse("distilled", out / "distilled", distill_cfg,
                              lambda resume: distill(distill_cfg, teacher, case_set, out / "distilled", reporter, resume=resume),
                              reporter)
    reporter.progress(STAGE, 4, 5, message=f"distilled student: {distilled}")

    # 5. Evaluation on the held-out scan -------------------------------------------------------
    models = {"teacher": teacher, "student": student, "distilled": distilled}
    logs = {name: Path(path).parent / "history.json" for name, path in models.items()}
    metrics = evaluate_models(models, raw.test_cases(), out, device=device, latency_repeats=config.latency_repeats,
                              training_logs={k: v for k, v in logs.items() if v.is_file()}, reporter=reporter)
    table = format_table(metrics)
    summary = (f"ReCoKD demo: {raw.name}, trained on {', '.join(c.case_id for c in raw.training_cases())}, "
               f"tested on held-out {', '.join(c.case_id for c in raw.test_cases())}\n\n{table}\n\n"
               f"metrics: {out / 'metrics.json'}\nreport:  {out / 'report.html'}\n")
    atomic_write_text(out / "summary.txt", summary)
    reporter.done(STAGE, path=str(out / "metrics.json"), message=summary)
    return metrics


def quick_config(scale: float) -> DemoConfig:
    """The default configuration with every step budget multiplied by ``scale`` (tests, smoke runs)."""
    base = DemoConfig()
    return replace(base, teacher_steps=max(1, round(base.teacher_steps * scale)),
                   student_steps=max(1, round(base.student_steps * scale)))
