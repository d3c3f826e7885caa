"""Efficacy benchmark: does distillation help a ÷4 student on real data, once every model has converged?

Per dataset (both from ``recokd data fetch``):

* ``ct``: ``Dataset901_CTAbdomenOrgans``, train on TotalSegmentator S1, test on the held-out S3
  (11 organs, 3 mm, the demo's anisotropic ``ct_demo`` teacher);
* ``brain``: ``Dataset902_BrainSubcortical``, train on Colin27 with augmentation (stronger affine
  and intensity augmentation than the default, one training volume), test on MNI ICBM152 2009a
  (12 subcortical structures, silver labels; 2 mm, an isotropic U-Net of the same widths).

**Validation split (not the test case).** Each dataset has one training volume, so the
validation split is carved out of it: every 4th block of 8 axial slices (CT, 24 mm) or of 4
slices (brain, 8 mm, so that every structure has validation voxels; :attr:`Budget.val_blocks`)
has its labels withheld from training (nnU-Net's ignore label: those voxels count in no loss) and
is the validation case (labels only there). The test scan (S3, MNI152) is never seen before the
final evaluation.

**Training to the plateau.** The teacher and every student are trained with validation every
:attr:`Budget.val_every` steps and stop when the validation mean Dice has not improved for
:attr:`Budget.patience` validations (or at the step cap); the best validation checkpoint
(``model_best.pt``) is the one evaluated. Every student has the same step cap, patience and seeds.
The teacher is trained once and cached under ``--work-dir`` (reused while its configuration and
the data's hashes are the same).

**KD hyper-parameters chosen on validation, the same way for every method.** Each KD method has
three candidate settings (:attr:`Method.candidates`: the loss weight lambda over a decade around
the published default, and the temperature for logit KD); seed 0 of each candidate is trained, the
candidate with the best *validation* Dice is kept, and seeds 1.. are trained with it (seed 0's run
of the chosen candidate is reused). The plain student has nothing to choose.

**Statistics.** Per method over seeds: mean ± sd of the test mean Dice, gap recovery per seed
(against the plain student of the same seed), and the paired difference to the plain student
(mean and a 95 % t-interval over seeds). Learning curves (validation Dice vs step) of every run
are in the JSON (``curve``) and in the report.

Output (``benchmarks/results/efficacy.json``; ``efficacy_gpu_<gpu>.json`` with ``--gpu``):
``date``, ``machine``, ``git_commit``, ``command``, ``config``, ``gap_recovery_definition``,
``validation_split`` and per dataset ``teacher`` (scores, parameters, steps, curve), ``selection``
(per KD method: candidates with their validation Dice, the chosen one), ``runs`` (one record per
method and seed: per-class Dice/HD95 on the test case, mean Dice/HD95, best validation Dice,
steps, training seconds, curve, gap recovery) and ``summary`` (per method ``n``, ``mean_dice``,
``sd_dice``, ``gap_recovery_per_seed``, ``paired_diff_vs_plain``).

Resuming: every finished run is written to the JSON (atomic) as soon as it is evaluated; a second
start with the same configuration reuses finished runs (their ``DONE.json``) and resumes an
interrupted one from its checkpoint in ``--work-dir``.

Usage::

    python benchmarks/efficacy.py                          # CPU configuration: both datasets, default methods, 3 seeds
    python benchmarks/efficacy.py --datasets ct --methods none,recokd --seeds 0,1
    python benchmarks/efficacy.py --workers 2              # two runs side by side (1 thread each)
    python benchmarks/efficacy.py --gpu                    # on a CUDA machine
    python benchmarks/efficacy.py --smoke --work-dir /tmp/eff --output /tmp/eff/efficacy.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # as a script and when imported by the tests
import _measure  # noqa: E402
from _measure import BenchmarkError  # noqa: E402

from _efficacy_setup import (  # noqa: E402,F401  (re-exported: efficacy.METHODS, efficacy.CPU, ...)
    CPU, DEFAULT_METHODS, GPU, METHODS, SMOKE, Budget, Candidate, DatasetSetup, Method, dataset_setups)
from _efficacy_stats import (  # noqa: E402,F401
    GAP_RECOVERY_DEFINITION, MIN_GAP, gap_recovery, mean_sd, paired_difference, select_candidate, summarize)


# ---------------------------------------------------------------------------------------------
# Data, training, evaluation


@dataclass
class PreparedData:
    setup: DatasetSetup
    case_set: Any          # training volume(s) with the validation blocks' labels withheld + the validation case
    class_names: list[str]
    train_ids: list[str]
    test_cases: list[Any]
    validation: dict[str, Any]


def validation_blocks(depth: int, block: int, every: int) -> list[tuple[int, int]]:
    """Axial slice ranges ``[start, stop)`` held out for validation: blocks ``every-1, 2*every-1, ...``."""
    if block < 1 or every < 2:
        raise BenchmarkError(f"validation blocks need block >= 1 and every >= 2, got {block}, {every}")
    return [(i * block, min((i + 1) * block, depth)) for i in range(every - 1, math.ceil(depth / block), every)]


def holdout_split(case_set, block: int, every: int):
    """``(training + validation CaseSet, record)`` from labelled volumes: the labels of the
    :func:`validation_blocks` of each volume are withheld from its training copy (ignore label,
    -1) and kept, alone, in a validation copy appended at the end (``num_val_cases`` = the number
    of volumes). The images are shared; nothing of the test case is involved.
    """
    import numpy as np

    from ReCoKDLib.data.sampling import CaseArrays, CaseSet
    from ReCoKDLib.nnunet.labels import LabelSpec

    train, val, record = [], [], {}
    for case in case_set.cases:
        depth = case.label.shape[1]
        blocks = validation_blocks(depth, block, every)
        held = np.zeros(depth, bool)
        for start, stop in blocks:
            held[start:stop] = True
        train_label = case.label.copy()
        train_label[:, held] = -1
        val_label = case.label.copy()
        val_label[:, ~held] = -1
        train.append(CaseArrays(case.case_id, case.image, train_label, meta=dict(case.meta)))
        val.append(CaseArrays(f"{case.case_id}_val", case.image, val_label, meta=dict(case.meta)))
        present = sorted(int(v) for v in np.unique(case.label[:, held]) if v > 0)
        record[case.case_id] = {"depth": depth, "blocks": blocks, "held_out_fraction": float(held.mean()),
                                "classes_in_validation": [case_set.class_names[v] for v in present]}
    names = list(case_set.class_names)
    spec = LabelSpec(tuple(names), tuple((i,) for i in range(len(names))), ignore_label=len(names))
    split = CaseSet(train + val, names, spacing=case_set.spacing, normalization=case_set.normalization,
                    source_hashes=case_set.source_hashes, label_spec=spec)
    return split, {"method": f"every {every}th block of {block} axial slices of each training volume: labels "
                             "withheld from training (ignore label), used for validation; the test case is never seen",
                   "volumes": record}


def prepare_data(setup: DatasetSetup, budget: Budget, data_dir: Path | None, work_dir: Path, reporter) -> PreparedData:
    """Fetch (idempotent) and preprocess the training case(s) of one dataset (cached in ``work_dir``),
    and carve out the validation split (:func:`holdout_split`)."""
    from ReCoKDLib.data.fetch import fetch_datasets
    from ReCoKDLib.data.layout import RawDataset
    from ReCoKDLib.data.preprocess import compute_normalization, preprocess_case
    from ReCoKDLib.data.sampling import prepare_cases

    datasets = fetch_datasets(data_dir, only=setup.key, reporter=reporter)
    folder = next((Path(p) for p in datasets.values() if Path(p).name == setup.raw_name), None)
    if folder is None:
        raise BenchmarkError(f"recokd data fetch did not give {setup.raw_name} (got {list(datasets)})")
    raw = RawDataset.open(folder)
    if not raw.test_cases():
        raise BenchmarkError(f"{raw.root} has no test case; run 'recokd data fetch --force --only {setup.key}'")
    images, labels = [], []
    for case in raw.training_cases():
        image, label, _ = raw.load_case(case)
        images.append(image)
        labels.append(label)
    normalization = compute_normalization(images, labels, scheme=setup.normalization)
    del images, labels
    case_set = prepare_cases(raw.training_cases(), raw.class_names, preprocess_case,
                             {"spacing": list(setup.spacing), "normalization": normalization},
                             work_dir / "preprocessed")
    split, record = holdout_split(case_set, *budget.val_blocks[setup.key])
    return PreparedData(setup, split, list(raw.class_names), [c.case_id for c in raw.training_cases()],
                        list(raw.test_cases()), record)


def config_key(*parts: Any, cfg) -> str:
    """Cache key of a run: ``parts`` plus the configuration's fields that differ from the engine's
    defaults (so a new engine option with a default does not invalidate finished runs)."""
    from ReCoKDLib.engine import TrainConfig

    defaults = TrainConfig().to_dict()
    changed = {k: v for k, v in cfg.to_dict().items() if k not in defaults or defaults[k] != v}
    return _measure.config_hash(*parts, changed)


def train_config(budget: Budget, setup: DatasetSetup, steps: int, seed: int, device: str, num_val: int,
                 student: bool = False, **extra: Any):
    from ReCoKDLib.engine import TrainConfig

    aug = {} if setup.augmentation is None else {"augmentation": dict(setup.augmentation)}
    val_every = budget.student_val_every if student else budget.val_every
    return TrainConfig(patch_size=budget.patches[setup.key], batch_size=budget.batch_size, steps=steps,
                       num_val_cases=num_val, val_every=val_every, val_overlap=budget.overlap,
                       patience=budget.student_patience if student else budget.patience, checkpoint_every=val_every,
                       optimizer="adamw", lr=budget.lr, weight_decay=1e-4, ema_decay=0.0, seed=seed, device=device,
                       bf16=budget.bf16, log_every=max(1, val_every // 5), **aug, **extra)


def _curve(out_dir: Path) -> list[list[float]]:
    """``[[step, validation mean Dice], ...]`` from the run's ``history.json``."""
    path = out_dir / "history.json"
    if not path.is_file():
        return []
    history = _measure.read_json(path)
    return [[int(h["step"]), float(h["mean_dice"])] for h in history.get("val", []) if h.get("mean_dice") is not None]


def _train_or_reuse(out_dir: Path, key: str, start, log) -> dict[str, Any]:
    """Train (or reuse, or resume) one run in ``out_dir``; returns its ``DONE.json`` record:
    ``key``, ``model`` (best validation checkpoint, else the last), ``train_seconds``, ``step``,
    ``best_val_dice``, ``best_step``, ``stopped_early``, ``curve``.

    ``out_dir`` is reused when its ``DONE.json`` has ``key``; an interrupted run of the same key
    resumes from its checkpoint; a checkpoint of another key is removed.
    """
    done = out_dir / "DONE.json"
    if done.is_file():
        try:
            record = _measure.read_json(done)
        except BenchmarkError:
            record = {}
        if record.get("key") == key and Path(record.get("model", "")).is_file():
            return dict(record, reused=True)
    checkpoint = out_dir / "checkpoint.pt"
    stamp = out_dir / "KEY"
    resume = checkpoint.is_file() and stamp.is_file() and stamp.read_text().strip() == key
    if checkpoint.is_file() and not resume:
        log(f"{out_dir}: checkpoint of another configuration; starting afresh")
        checkpoint.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key + "\n")
    t0 = time.perf_counter()
    result = start(resume)
    seconds = time.perf_counter() - t0
    if result.cancelled:
        raise KeyboardInterrupt(f"{out_dir} was cancelled; run the same command again to resume")
    previous = out_dir / "SECONDS"  # training time of the interrupted attempts, so a resume reports the total
    total = seconds + (float(previous.read_text()) if resume and previous.is_file() else 0.0)
    record = {"key": key, "model": str(result.best_model or result.last_model), "train_seconds": total,
              "resumed": resume, "step": result.step, "best_val_dice": result.metrics.get("best_mean_dice"),
              "best_step": result.metrics.get("best_step"), "stopped_early": bool(result.stopped_early),
              "curve": _curve(out_dir)}
    _measure.write_json(done, record)
    return dict(record, reused=False)


def dice_hd95_cropped(prediction, reference, num_classes: int, spacing: Sequence[float] | None):
    """``evaluate.dice_hd95`` computed class by class on the bounding box of prediction ∪ reference.

    The same values as on the whole grid (voxels outside the box are true negatives, and a
    one-voxel margin keeps every surface voxel a surface voxel), but HD95 costs the box's size
    instead of the whole scan's: ~10x faster on a 20x512x512 CT with small organs. A class absent
    from both gives Dice 1 and HD95 0 (callers average over the classes the reference has).
    """
    import numpy as np

    from ReCoKDLib.evaluate import dice_hd95

    prediction, reference = np.asarray(prediction), np.asarray(reference)
    if prediction.shape != reference.shape or prediction.ndim != 3:
        raise BenchmarkError(f"prediction {prediction.shape} and reference {reference.shape} must be (D, H, W) on one grid")
    dice, hd95 = [], []
    for c in range(1, num_classes):
        p, r = prediction == c, reference == c
        union = p | r
        if not union.any():
            dice.append(1.0)
            hd95.append(0.0)
            continue
        box = tuple(slice(max(int(ix.min()) - 1, 0), int(ix.max()) + 2) for ix in np.nonzero(union))
        d, h = dice_hd95(p[box].astype(np.uint8), r[box].astype(np.uint8), 2, spacing)
        dice.append(d[0])
        hd95.append(h[0])
    return dice, hd95


def evaluate_model(model_path: Path, test_cases: Sequence[Any], overlap: float, device: str) -> dict[str, Any]:
    """Per-class Dice and HD95 (mm) of one model on the test cases, on their own grids; means over the
    classes each test reference has (a class absent from the reference is not scored)."""
    import numpy as np

    from ReCoKDLib.data.io import read_image
    from ReCoKDLib.infer import segment_volume
    from ReCoKDLib.networks import count_parameters
    from ReCoKDLib.teachers import load_model

    model = load_model(model_path, device="cpu")
    classes = list(model.card.classes)[1:]
    dice_cases, hd_cases, seconds = [], [], 0.0
    for case in test_cases:
        image, geometry = read_image(case.image_paths[0])
        label, _ = read_image(case.label_path, allow_channels=False)
        result = segment_volume(model, image, geometry, overlap=overlap, device=device)
        seconds += result.seconds
        dice, hd = dice_hd95_cropped(result.labels, label, len(classes) + 1, tuple(reversed(geometry.spacing)))
        present = {int(v) for v in np.unique(label)}
        dice_cases.append([d if i + 1 in present else None for i, d in enumerate(dice)])
        hd_cases.append([h if i + 1 in present else None for i, h in enumerate(hd)])
    dice = {c: mean_sd([d[i] for d in dice_cases])[0] for i, c in enumerate(classes)}
    hd95 = {c: mean_sd([h[i] for h in hd_cases])[0] for i, c in enumerate(classes)}
    return {"dice": dice, "hd95": hd95, "mean_dice": mean_sd(list(dice.values()))[0],
            "mean_hd95": mean_sd(list(hd95.values()))[0], "eval_seconds": seconds,
            "params": count_parameters(model.network)}


# ---------------------------------------------------------------------------------------------
# Jobs: one training run + its evaluation, runnable in a worker process


@dataclass(frozen=True)
class Job:
    """One run of the benchmark: the teacher of a dataset, or a student (method, candidate, seed)."""

    dataset: str
    role: str                       # "teacher" or "student"
    method: str = ""
    candidate: int = -1             # index into METHODS[method].candidates (-1: plain student / teacher)
    seed: int = 0

    @property
    def name(self) -> str:
        if self.role == "teacher":
            return f"{self.dataset} teacher"
        cand = "" if self.candidate < 0 else f" candidate {self.candidate}"
        return f"{self.dataset} {self.method}{cand} seed {self.seed}"


@dataclass(frozen=True)
class Context:
    """What every job needs, picklable for worker processes."""

    budget: Budget
    work_dir: Path
    device: str
    threads: int
    data_dir: Path | None = None


_DATA: dict[str, PreparedData] = {}  # per process: prepared datasets (preprocessing is cached on disk)


def _data(ctx: Context, dataset: str) -> PreparedData:
    if dataset not in _DATA:
        from ReCoKDLib.progress import Reporter

        setup = dataset_setups(ctx.budget.patches, ctx.budget.spacings)[dataset]
        _DATA[dataset] = prepare_data(setup, ctx.budget, ctx.data_dir, ctx.work_dir / dataset, Reporter())
    return _DATA[dataset]


def teacher_key(ctx: Context, dataset: str) -> tuple[str, Any]:
    data = _data(ctx, dataset)
    cfg = train_config(ctx.budget, data.setup, ctx.budget.teacher_steps, ctx.budget.teacher_seed, ctx.device,
                       len(data.train_ids), network=dict(data.setup.network))
    return config_key("teacher", data.case_set.source_hashes, data.case_set.normalization, data.validation,
                      cfg=cfg), cfg


def run_job(ctx: Context, job: Job, teacher_model: str | None = None) -> dict[str, Any]:
    """Train (or reuse/resume) and evaluate one run; returns its record (scores on the test case)."""
    import torch

    from ReCoKDLib.engine import TrainingDivergedError, distill, train_teacher, training_precision
    from ReCoKDLib.networks import UNetConfig, derive_student_config
    from ReCoKDLib.progress import Reporter

    torch.set_num_threads(ctx.threads)
    reporter, log = Reporter(), (lambda msg: print(msg, flush=True))
    data = _data(ctx, job.dataset)
    work = ctx.work_dir / job.dataset
    num_val = len(data.train_ids)
    budget = ctx.budget
    if job.role == "teacher":
        key, cfg = teacher_key(ctx, job.dataset)
        out_dir = work / f"teacher-{key}"
        start = lambda resume: train_teacher(cfg, data.case_set, out_dir, reporter, resume=resume)  # noqa: E731
        record = {"dataset": job.dataset, "role": "teacher"}
    else:
        spec = METHODS[job.method]
        teacher_net = UNetConfig.from_dict(dict(data.setup.network, in_channels=data.case_set.in_channels,
                                                num_classes=data.case_set.num_classes))
        if spec.kd is None:
            student_net = derive_student_config(teacher_net, budget.reduction, norm=spec.student_norm,
                                                stem=spec.student_stem).to_dict()
            cfg = train_config(budget, data.setup, budget.student_steps, job.seed, ctx.device, num_val, student=True,
                               network=student_net)
            start = lambda resume: train_teacher(cfg, data.case_set, out_dir, reporter, resume=resume,  # noqa: E731
                                                 role="student")
            choice: dict[str, Any] = {}
        else:
            candidate = spec.candidates[job.candidate]
            cfg = train_config(budget, data.setup, budget.student_steps, job.seed, ctx.device, num_val, student=True,
                               student_reduction=budget.reduction, kd=spec.kd_spec(candidate),
                               kd_weight=candidate.kd_weight, frozen_aux=spec.frozen_aux, student_norm=spec.student_norm,
                               student_stem=spec.student_stem,
                               teacher_cache_dir=str(work / "teacher_outputs"))  # computed once, shared by all students
            start = lambda resume: distill(cfg, teacher_model, data.case_set, out_dir, reporter,  # noqa: E731
                                           resume=resume)
            choice = {"candidate": job.candidate, "hyperparameters": dataclasses.asdict(candidate)}
        key = config_key("student", job.method, str(Path(teacher_model or "").parent.name), cfg=cfg)
        tag = "" if job.candidate < 0 else f"-c{job.candidate}"
        out_dir = work / f"{job.method}{tag}-seed{job.seed}-{key}"
        record = {"dataset": job.dataset, "method": job.method, "seed": job.seed, **choice}
    record["precision"] = training_precision(ctx.device, cfg)  # bf16 asked for may train in fp32 (no bf16 kernels)
    try:
        done = _train_or_reuse(out_dir, key, start, log)
    except TrainingDivergedError as exc:  # recorded, not hidden; a rerun resumes from its checkpoint
        return {**record, "key": key, "status": "diverged", "error": str(exc), "mean_dice": None,
                "mean_hd95": None, "dice": {}, "hd95": {}, "best_val_dice": None}
    scores = done.get("test_scores")
    if not done["reused"] or not scores:  # evaluated once per finished run, stored with it
        scores = evaluate_model(Path(done["model"]), data.test_cases, budget.overlap, ctx.device)
        _measure.write_json(out_dir / "DONE.json", {k: v for k, v in dict(done, test_scores=scores).items()
                                                    if k != "reused"})
    return {**record, "key": key, "status": "done", "model": done["model"], "train_seconds": done["train_seconds"],
            "reused_training": done["reused"], "steps": done["step"], "best_step": done["best_step"],
            "best_val_dice": done["best_val_dice"], "stopped_early": done["stopped_early"], "curve": done["curve"],
            **scores}


def _run_job_in_worker(args: tuple[Context, Job, str | None]) -> tuple[Job, dict[str, Any]]:
    ctx, job, teacher_model = args
    return job, run_job(ctx, job, teacher_model)


# ---------------------------------------------------------------------------------------------
# The benchmark: teachers, then plain students and every candidate's seed 0, then the chosen seeds


def _dataset_block(data: PreparedData, teacher: Mapping[str, Any] | None, runs: list[dict[str, Any]],
                   selection: Mapping[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    teacher_dice = None if teacher is None else teacher.get("mean_dice")
    baselines = {m: METHODS[m].baseline for m in methods if m in METHODS}
    for r in runs:
        baseline = baselines.get(r["method"], "none")
        plain = next((p["mean_dice"] for p in runs if p["method"] == baseline and p["seed"] == r["seed"]), None)
        r["teacher_mean_dice"] = teacher_dice
        r["plain_student_mean_dice"] = plain
        r["plain_student_method"] = baseline
        r["gap_recovery"] = None if r["method"] == "none" else gap_recovery(r["mean_dice"], plain, teacher_dice)
    return {
        "dataset": data.setup.raw_name, "train_cases": data.train_ids,
        "test_cases": [c.case_id for c in data.test_cases], "classes": data.class_names[1:],
        "setup": data.setup.to_dict(), "validation_split": data.validation, "teacher": teacher,
        "selection": dict(selection), "runs": sorted(runs, key=lambda r: (list(methods).index(r["method"]), r["seed"])),
        "summary": summarize(runs, teacher_dice, list(methods), baselines),
    }


def default_output(budget: Budget) -> Path:
    if budget.name != "gpu":
        return _measure.RESULTS_DIR / "efficacy.json"
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown"
    safe = "".join(ch if ch.isalnum() else "-" for ch in gpu).strip("-").lower()
    return _measure.RESULTS_DIR / f"efficacy_gpu_{safe}.json"


def _die_with_parent() -> None:
    """Worker initializer: on Linux the worker gets SIGTERM when the benchmark process ends (killed
    included), so no orphan keeps training into a run folder that a resumed benchmark also uses
    (two writers of one checkpoint). Elsewhere a no-op."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except OSError:
            pass


class _Pool:
    """Runs jobs in ``workers`` processes (``workers == 1``: in this process), yielding results as they finish."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor = None
        if workers > 1:
            import concurrent.futures
            import multiprocessing

            self._executor = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with_parent)

    def run(self, items: Sequence[tuple[Context, Job, str | None]]):
        if self._executor is None:
            for item in items:
                yield _run_job_in_worker(item)
            return
        import concurrent.futures

        futures = [self._executor.submit(_run_job_in_worker, item) for item in items]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)


def run_benchmark(budget: Budget, datasets: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
                  work_dir: Path, output: Path, device: str, threads: int, data_dir: Path | None = None,
                  argv: Sequence[str] | None = None, log=print, workers: int = 1,
                  reuse_selection: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) the benchmark; the JSON at ``output`` is rewritten after every finished run.

    Three phases, each spread over ``workers`` processes of ``threads // workers`` threads: (1) the
    teachers, (2) every plain student and seed 0 of every KD candidate, (3) the other seeds of the
    candidate each KD method chose on validation (:func:`select_candidate`).

    ``reuse_selection``: an earlier result of this benchmark (its JSON). A KD method whose choice it
    holds for a dataset, among the same candidates, keeps that choice: phase 2 trains only the chosen
    candidate's seed 0, and the selection block keeps the earlier candidates' scores and says where
    they come from (``reused_from``). A way to finish the seeds when the selection itself was already
    made by the same rule; the candidates' scores are then those of the earlier run.
    """
    methods = ["none"] + [m for m in methods if m != "none"] if "none" in methods else list(methods)
    ctx = Context(budget, Path(work_dir), device, max(1, threads // max(1, workers)), data_dir)
    result: dict[str, Any] = {
        "benchmark": "efficacy", **_measure.provenance(threads, argv),
        "config": {"budget": budget.to_dict(), "device": device, "datasets": list(datasets), "seeds": list(seeds),
                   "workers": workers, "threads_per_worker": ctx.threads,
                   "methods": {m: METHODS[m].to_dict() for m in methods}},
        "gap_recovery_definition": GAP_RECOVERY_DEFINITION,
        "datasets": {},
    }
    t_start = time.perf_counter()
    teachers: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[dict[str, Any]]] = {ds: [] for ds in datasets}
    candidates: dict[tuple[str, str], list[dict[str, Any] | None]] = {}
    selection: dict[str, dict[str, Any]] = {ds: {} for ds in datasets}

    def publish() -> None:
        for ds in datasets:
            if ds in teachers:
                result["datasets"][ds] = _dataset_block(_data(ctx, ds), teachers[ds], runs[ds], selection[ds], methods)
        result["elapsed_seconds"] = time.perf_counter() - t_start
        _measure.write_json(output, result)

    def record_student(job: Job, record: dict[str, Any]) -> None:
        if job.candidate >= 0 and job.seed == seeds[0]:
            candidates[(job.dataset, job.method)][job.candidate] = record
        else:
            runs[job.dataset].append(record)
        if record.get("status") == "diverged":
            log(f"{job.name}: DIVERGED ({record.get('error')})")
        else:
            log(f"{job.name}: test mean Dice {record['mean_dice']:.3f}, validation {record['best_val_dice'] or 0:.3f} "
                f"(best step {record['best_step']} of {record['steps']}, train {record['train_seconds'] or 0:.0f} s, "
                f"total {time.perf_counter() - t_start:.0f} s)")

    def reused(ds: str, method: str) -> dict[str, Any] | None:
        """The earlier selection of ``method`` on ``ds`` when it was made among the same candidates."""
        earlier = ((reuse_selection or {}).get("datasets", {}).get(ds) or {}).get("selection", {}).get(method)
        spec = METHODS[method]
        if not earlier or [c["hyperparameters"] for c in earlier.get("candidates", [])] != \
                [dataclasses.asdict(c) for c in spec.candidates]:
            return None
        return earlier

    def choose(ds: str, method: str) -> None:
        earlier = reused(ds, method)
        if earlier is not None:
            chosen = int(earlier["chosen"])
            record = candidates[(ds, method)][chosen]
            if record is None:
                return
            selection[ds][method] = dict(earlier, reused_from={
                k: (reuse_selection or {}).get(k) for k in ("date", "git_commit", "command")},
                chosen_run_now={"val_dice": record.get("best_val_dice"), "test_mean_dice": record.get("mean_dice")})
            runs[ds].append(record)
            return
        records = candidates[(ds, method)]
        scores = [None if r is None else (r.get("best_val_dice") if r.get("status") == "done" else -1.0)
                  for r in records]
        best = select_candidate(scores)
        if best is None:
            return
        spec = METHODS[method]
        selection[ds][method] = {
            "chosen": best, "chosen_hyperparameters": dataclasses.asdict(spec.candidates[best]),
            "candidates": [{"hyperparameters": dataclasses.asdict(c), "label": c.label(),
                            "val_dice": None if r is None else r.get("best_val_dice"),
                            "test_mean_dice": None if r is None else r.get("mean_dice"),
                            "curve": None if r is None else r.get("curve")}
                           for c, r in zip(spec.candidates, records)],
            "rule": "best validation mean Dice of seed 0 (ties: the earlier candidate)"}
        runs[ds].append(records[best])

    pool = _Pool(workers)
    try:
        # phase 1: teachers
        for job, record in pool.run([(ctx, Job(ds, "teacher"), None) for ds in datasets]):
            teachers[job.dataset] = dict(record, steps_cap=budget.teacher_steps)
            log(f"{job.dataset}: teacher test mean Dice {record['mean_dice']:.3f}, validation "
                f"{record['best_val_dice'] or 0:.3f} (best step {record['best_step']} of {record['steps']})")
            publish()
        # phase 2: plain students (all seeds) and seed 0 of every candidate
        items = []
        for ds in datasets:
            tm = teachers[ds]["model"]
            for method in methods:
                spec = METHODS[method]
                if spec.kd is None:
                    items += [(ctx, Job(ds, "student", method, -1, seed), tm) for seed in seeds]
                else:
                    candidates[(ds, method)] = [None] * len(spec.candidates)
                    earlier = reused(ds, method)
                    chosen = range(len(spec.candidates)) if earlier is None else [int(earlier["chosen"])]
                    if earlier is not None:
                        log(f"{ds} {method}: candidate {earlier['chosen']} as chosen before "
                            f"({(reuse_selection or {}).get('date')}); only it is trained")
                    items += [(ctx, Job(ds, "student", method, i, seeds[0]), tm) for i in chosen]
        for job, record in pool.run(items):
            record_student(job, record)
            if job.candidate >= 0:
                choose(job.dataset, job.method)
            publish()
        # phase 3: the other seeds of each chosen candidate
        items = [(ctx, Job(ds, "student", method, selection[ds][method]["chosen"], seed), teachers[ds]["model"])
                 for ds in datasets for method in methods if METHODS[method].kd is not None and method in selection[ds]
                 for seed in seeds[1:]]
        for job, record in pool.run(items):
            record_student(job, record)
            publish()
    finally:
        pool.close()
    publish()
    return result


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="larger patches and more steps, for a CUDA machine")
    parser.add_argument("--smoke", action="store_true", help="tiny configuration (tests): a few steps, coarse spacing")
    parser.add_argument("--datasets", default="ct,brain", help="comma-separated: ct, brain (default both)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, of: {', '.join(METHODS)} (default {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated integer seeds (default 0,1,2)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-efficacy"),
                        help="models, checkpoints and the preprocessing cache (default runs/bench-efficacy)")
    parser.add_argument("--output", type=Path, help="JSON to write (default benchmarks/results/efficacy.json, "
                                                    "or efficacy_gpu_<gpu>.json with --gpu)")
    parser.add_argument("--data-dir", type=Path, help="where 'recokd data fetch' keeps the datasets")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads in all (default 2)")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs side by side, each with threads/workers threads (default 1)")
    parser.add_argument("--device", default=None, help="training/evaluation device (default: cuda with --gpu, else cpu)")
    parser.add_argument("--reuse-selection", type=Path, metavar="JSON",
                        help="an earlier efficacy JSON: KD methods it chose a candidate for (same candidates) train "
                             "only that candidate (see run_benchmark)")
    parser.add_argument("--student-steps", type=int, default=None,
                        help="step budget of every student (default: the configuration's; e.g. a longer budget to "
                             "test whether the students are converged)")
    args = parser.parse_args(argv)

    if args.gpu and args.smoke:
        parser.error("--gpu and --smoke exclude each other")
    budget = GPU if args.gpu else SMOKE if args.smoke else CPU
    if args.student_steps is not None:
        if args.student_steps < 1:
            parser.error("--student-steps must be >= 1")
        budget = dataclasses.replace(budget, student_steps=args.student_steps)
    datasets = _csv(args.datasets)
    methods = _csv(args.methods)
    unknown = [d for d in datasets if d not in ("ct", "brain")] + [m for m in methods if m not in METHODS]
    if unknown or not datasets or not methods:
        parser.error(f"unknown or missing datasets/methods {unknown}; datasets: ct, brain; methods: {', '.join(METHODS)}")
    try:
        seeds = [int(s) for s in _csv(args.seeds)]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if not seeds or args.threads < 1 or args.workers < 1:
        parser.error("give at least one seed, --threads >= 1 and --workers >= 1")
    device = args.device or ("cuda" if args.gpu else "cpu")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--gpu/--device cuda needs CUDA, which is not available here")
    output = args.output or default_output(budget)
    earlier = json.loads(args.reuse_selection.read_text()) if args.reuse_selection else None
    run_benchmark(budget, datasets, methods, seeds, args.work_dir, output, device, args.threads, args.data_dir,
                  argv=[__file__, *(sys.argv[1:] if argv is None else argv)], workers=args.workers,
                  reuse_selection=earlier)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
