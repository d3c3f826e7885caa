"""Efficacy benchmark: does distillation help a ÷4 student on real data? (issue 6, part 1)

Per dataset (both from ``recokd data fetch``):

* ``ct``: ``Dataset901_CTAbdomenOrgans``, train on TotalSegmentator S1, test on the held-out S3
  (11 organs, 3 mm, the demo's anisotropic ``ct_demo`` teacher);
* ``brain``: ``Dataset902_BrainSubcortical``, train on Colin27 with augmentation (stronger affine
  and intensity augmentation than the default, one training volume), test on MNI ICBM152 2009a
  (12 subcortical structures, silver labels; 2 mm, an isotropic U-Net of the same widths);

the teacher is trained ONCE (cached under ``--work-dir``: reused while its training
configuration and the data's hashes are the same), then the same student (every width ÷4) is
trained with each method of :data:`METHODS` and each seed, same steps and patches. Every model is
evaluated on the test case on its exact grid (per-class Dice and HD95, ``evaluate.dice_hd95``).

Output (``benchmarks/results/efficacy.json``; ``efficacy_gpu_<gpu>.json`` with ``--gpu``):
``date``, ``machine``, ``git_commit``, ``command``, ``config`` (budget, datasets, methods with
their KD weights), ``gap_recovery_definition`` and per dataset ``teacher`` (scores, parameters,
training time), ``runs`` (one record per method and seed: per-class Dice/HD95, mean Dice/HD95,
training seconds, the teacher's and the same seed's plain student's mean Dice, gap recovery) and
``summary`` (per method: mean ± sd of mean Dice over seeds, gap recovery both ways).

Resuming: every finished run is added to the JSON (atomic write) as soon as it is evaluated, and
a second start with the same configuration skips the runs already there; an interrupted training
continues from its checkpoint in ``--work-dir``.

Gap recovery: ``(Dice_KD - Dice_student) / (Dice_teacher - Dice_student)`` on mean Dice (over
classes) on the test case. ``per_seed``: the KD run of seed s against the plain student of seed s,
then mean ± sd over seeds. ``of_means``: mean KD Dice against the mean plain-student Dice. When
the teacher is not better than the plain student by at least :data:`MIN_GAP` the ratio is
undefined and reported as ``null`` (never divided by ~0 or a negative gap).

Budget: the CPU configuration is sized for 2 cores (bf16 autocast, ~1 thread per 2 cores idle
otherwise); see the module constant :data:`CPU` and README's benchmark section for measured times.

Usage::

    python benchmarks/efficacy.py                          # CPU configuration, all datasets, methods, 3 seeds
    python benchmarks/efficacy.py --datasets ct --methods none,recokd --seeds 0,1
    python benchmarks/efficacy.py --gpu                    # on a CUDA machine
    python benchmarks/efficacy.py --smoke --work-dir /tmp/eff --output /tmp/eff/efficacy.json
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # as a script and when imported by the tests
import _measure  # noqa: E402
from _measure import BenchmarkError  # noqa: E402

#: the teacher must beat the plain student by at least this much mean Dice for a gap recovery
MIN_GAP = 1e-3

GAP_RECOVERY_DEFINITION = (
    "gap recovery = (Dice_KD - Dice_student) / (Dice_teacher - Dice_student) on the mean Dice over foreground "
    "classes on the test case. per_seed: KD run of seed s vs the plain student of seed s, then mean and sd over "
    f"seeds; of_means: mean KD Dice vs mean plain-student Dice. null when Dice_teacher - Dice_student < {MIN_GAP} "
    "(no gap to recover)."
)


# ---------------------------------------------------------------------------------------------
# What is compared


@dataclass(frozen=True)
class Method:
    """A student training recipe: ``kd`` spec (``losses.registry``) times ``kd_weight`` (lambda).

    ``kd=None`` is the plain student (Dice + CE only). Lambdas follow the authors' framework presets
    (kd-methods.md §2.7, §4.1): ReCo-KD and its parts 0.01, CIRKD 0.1, the others 1.0.
    """

    kd: dict[str, dict[str, Any]] | None
    kd_weight: float = 0.0
    frozen_aux: bool = False
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _kd(name: str, weight: float, description: str, frozen: bool = False) -> Method:
    return Method({name: {"weight": 1.0}}, weight, frozen, description)


METHODS: dict[str, Method] = {
    "none": Method(None, 0.0, False, "plain student: Dice + CE, no distillation"),
    "recokd": _kd("recokd", 0.01, "ReCo-KD: MS-SARD + MS-CA, trainable adapters and context blocks"),
    "ms_sard": _kd("ms_sard", 0.01, "MS-SARD only"),
    "ms_ca": _kd("ms_ca", 0.01, "MS-CA only"),
    "recokd_frozen_aux": _kd("recokd", 0.01, "ReCo-KD with the code release's frozen adapters (frozen_aux)", frozen=True),
    "mskd": _kd("mskd", 1.0, "MSKD: feature filtering + region graph"),
    "logit": _kd("logit", 1.0, "logit KD (KL, temperature)"),
    "fitnet": _kd("fitnet", 1.0, "FitNet: adapter + MSE"),
    "cwd": _kd("cwd", 1.0, "channel-wise distillation"),
    "ifvd": _kd("ifvd", 1.0, "intra-class feature variation distillation"),
    "cirkd": _kd("cirkd", 0.1, "cross-image relational KD"),
}

BRAIN_NETWORK = {
    "filters": [16, 32, 64, 128, 160],
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
    "kernel_sizes": [[3, 3, 3]] * 5,
    "deep_supervision": True, "deep_supr_num": 2,
}
#: one training volume: more affine and intensity variation than the default (no flips: L/R labels)
BRAIN_AUGMENTATION = {"enabled": True, "rotate_deg": 15.0, "scale": [0.85, 1.2], "p_affine": 0.5, "flip_axes": [],
                      "p_noise": 0.15, "noise_std": 0.1, "p_brightness": 0.3, "brightness": 0.3, "p_gamma": 0.3,
                      "gamma": [0.7, 1.5]}


@dataclass(frozen=True)
class DatasetSetup:
    """One dataset of the benchmark: where it is, how it is preprocessed, the teacher's network."""

    key: str
    raw_name: str
    network: dict[str, Any]
    spacing: tuple[float, float, float]
    normalization: str
    patch_size: tuple[int, int, int]
    augmentation: dict[str, Any] | None = None  # None: the engine's default

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _ct_network() -> dict[str, Any]:
    from ReCoKDLib.networks import preset

    return preset("ct_demo").to_dict()


def dataset_setups(patches: Mapping[str, Sequence[int]], spacings: Mapping[str, Sequence[float]]) -> dict[str, DatasetSetup]:
    return {
        "ct": DatasetSetup("ct", "Dataset901_CTAbdomenOrgans", _ct_network(), tuple(spacings["ct"]), "ct",
                           tuple(patches["ct"])),
        "brain": DatasetSetup("brain", "Dataset902_BrainSubcortical", BRAIN_NETWORK, tuple(spacings["brain"]),
                              "zscore", tuple(patches["brain"]), BRAIN_AUGMENTATION),
    }


@dataclass(frozen=True)
class Budget:
    """Steps, patches and settings shared by every run of one configuration."""

    name: str
    teacher_steps: int
    student_steps: int
    patches: dict[str, tuple[int, int, int]]
    spacings: dict[str, tuple[float, float, float]]
    batch_size: int = 2
    lr: float = 2e-3
    reduction: int = 4
    bf16: bool = True
    overlap: float = 0.25
    teacher_seed: int = 42

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: 2 CPU cores, ~40 min for both datasets, 2 teachers and 66 students (see the README for the measured costs)
CPU = Budget("cpu", teacher_steps=600, student_steps=120,
             patches={"ct": (16, 64, 64), "brain": (32, 32, 32)},
             spacings={"ct": (3.0, 3.0, 3.0), "brain": (2.0, 2.0, 2.0)})
GPU = Budget("gpu", teacher_steps=3000, student_steps=1000,
             patches={"ct": (16, 128, 128), "brain": (64, 64, 64)},
             spacings={"ct": (3.0, 3.0, 3.0), "brain": (1.5, 1.5, 1.5)}, batch_size=2, bf16=False, overlap=0.5)
SMOKE = Budget("smoke", teacher_steps=2, student_steps=2,
               patches={"ct": (16, 32, 32), "brain": (32, 32, 32)},
               spacings={"ct": (6.0, 6.0, 6.0), "brain": (6.0, 6.0, 6.0)}, batch_size=1, overlap=0.0)


# ---------------------------------------------------------------------------------------------
# Statistics (pure)


def gap_recovery(kd: float | None, student: float | None, teacher: float | None, min_gap: float = MIN_GAP) -> float | None:
    """``(kd - student) / (teacher - student)``; ``None`` when a value is missing or the gap < ``min_gap``."""
    if kd is None or student is None or teacher is None:
        return None
    gap = teacher - student
    if not gap >= min_gap:
        return None
    return (kd - student) / gap


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (``None`` for fewer than 2 values) and count of the defined values."""
    defined = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not defined:
        return None, None, 0
    sd = statistics.stdev(defined) if len(defined) > 1 else None
    return statistics.fmean(defined), sd, len(defined)


def summarize(runs: Sequence[Mapping[str, Any]], teacher_dice: float | None, methods: Sequence[str]) -> dict[str, Any]:
    """Per method: mean ± sd of mean Dice and HD95 over seeds, training time, and gap recovery.

    ``runs`` are the records of one dataset (``method``, ``seed``, ``mean_dice``, ``mean_hd95``,
    ``train_seconds``); plain students are the records of method ``"none"``.
    """
    plain = {r["seed"]: r["mean_dice"] for r in runs if r["method"] == "none"}
    plain_mean, _, _ = mean_sd(list(plain.values()))
    out: dict[str, Any] = {}
    for method in methods:
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        if not mine:
            continue
        dice_m, dice_sd, n = mean_sd([r["mean_dice"] for r in mine])
        hd_m, hd_sd, _ = mean_sd([r.get("mean_hd95") for r in mine])
        t_m, _, _ = mean_sd([r.get("train_seconds") for r in mine])
        per_seed = [None if method == "none" else gap_recovery(r["mean_dice"], plain.get(r["seed"]), teacher_dice)
                    for r in mine]
        gr_m, gr_sd, gr_n = mean_sd(per_seed)
        out[method] = {
            "seeds": [r["seed"] for r in mine], "n": n,
            "diverged_seeds": [r["seed"] for r in mine if r.get("status") == "diverged"],
            "mean_dice": dice_m, "sd_dice": dice_sd, "mean_hd95": hd_m, "sd_hd95": hd_sd,
            "mean_train_seconds": t_m,
            "delta_dice_vs_plain": None if dice_m is None or plain_mean is None else dice_m - plain_mean,
            "gap_recovery_per_seed": {"mean": gr_m, "sd": gr_sd, "n": gr_n},
            "gap_recovery_of_means": None if method == "none" else gap_recovery(dice_m, plain_mean, teacher_dice),
        }
    return out


# ---------------------------------------------------------------------------------------------
# Data, training, evaluation


@dataclass
class PreparedData:
    setup: DatasetSetup
    case_set: Any
    class_names: list[str]
    train_ids: list[str]
    test_cases: list[Any]


def prepare_data(setup: DatasetSetup, data_dir: Path | None, work_dir: Path, reporter) -> PreparedData:
    """Fetch (idempotent) and preprocess the training case(s) of one dataset; cached in ``work_dir``."""
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
    return PreparedData(setup, case_set, list(raw.class_names), [c.case_id for c in raw.training_cases()],
                        list(raw.test_cases()))


def train_config(budget: Budget, setup: DatasetSetup, steps: int, seed: int, device: str, **extra: Any):
    from ReCoKDLib.engine import TrainConfig

    aug = {} if setup.augmentation is None else {"augmentation": dict(setup.augmentation)}
    return TrainConfig(patch_size=budget.patches[setup.key], batch_size=budget.batch_size, steps=steps,
                       num_val_cases=0, val_every=steps, checkpoint_every=max(10, steps // 5), optimizer="adamw",
                       lr=budget.lr, weight_decay=1e-4, ema_decay=0.0, seed=seed, device=device, bf16=budget.bf16,
                       log_every=max(1, steps // 20), **aug, **extra)


def _train_or_reuse(out_dir: Path, key: str, start, log) -> tuple[Path, float | None, bool]:
    """``(model_last.pt, training seconds, reused)``: reuse ``out_dir`` when its ``DONE.json`` has ``key``,
    resume an interrupted run of the same key, or start afresh (a checkpoint of another key is removed)."""
    done = out_dir / "DONE.json"
    model = out_dir / "model_last.pt"
    if done.is_file() and model.is_file():
        try:
            record = _measure.read_json(done)
        except BenchmarkError:
            record = {}
        if record.get("key") == key:
            return model, record.get("train_seconds"), True
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
    _measure.write_json(done, {"key": key, "train_seconds": seconds, "resumed": resume, "step": result.step})
    return result.last_model, seconds, False


def dice_hd95_cropped(prediction, reference, num_classes: int, spacing: Sequence[float] | None):
    """``evaluate.dice_hd95`` computed class by class on the bounding box of prediction ∪ reference.

    The same values as on the whole grid (voxels outside the box are true negatives, and a
    one-voxel margin keeps every surface voxel a surface voxel), but HD95 costs the box's size
    instead of the whole scan's: ~10x faster on a 20x512x512 CT with small organs.
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
    """Per-class Dice and HD95 (mm) of one model on the test cases (mean over cases), on their own grids."""
    from ReCoKDLib.data.io import read_image
    from ReCoKDLib.infer import segment_volume
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
        dice_cases.append(dice)
        hd_cases.append(hd)
    dice = {c: mean_sd([d[i] for d in dice_cases])[0] for i, c in enumerate(classes)}
    hd95 = {c: mean_sd([h[i] for h in hd_cases])[0] for i, c in enumerate(classes)}
    return {"dice": dice, "hd95": hd95, "mean_dice": mean_sd(list(dice.values()))[0],
            "mean_hd95": mean_sd(list(hd95.values()))[0], "eval_seconds": seconds}


# ---------------------------------------------------------------------------------------------
# The benchmark


def _teacher(budget: Budget, data: PreparedData, work: Path, device: str, reporter, log) -> dict[str, Any]:
    from ReCoKDLib.engine import train_teacher
    from ReCoKDLib.networks import build_unet, count_parameters, UNetConfig

    cfg = train_config(budget, data.setup, budget.teacher_steps, budget.teacher_seed, device,
                       network=dict(data.setup.network))
    key = _measure.config_hash("teacher", cfg.to_dict(), data.case_set.source_hashes, data.case_set.normalization)
    out_dir = work / f"teacher-{key}"
    log(f"{data.setup.key}: teacher ({budget.teacher_steps} steps) in {out_dir}")
    model, seconds, reused = _train_or_reuse(
        out_dir, key, lambda resume: train_teacher(cfg, data.case_set, out_dir, reporter, resume=resume), log)
    net = dict(data.setup.network, in_channels=data.case_set.in_channels, num_classes=data.case_set.num_classes)
    params = count_parameters(build_unet(UNetConfig.from_dict(net)))
    return {"model": model, "key": key, "train_seconds": seconds, "reused": reused, "params": params}


def _student_run(budget: Budget, data: PreparedData, teacher: Mapping[str, Any], method: str, seed: int,
                 work: Path, device: str, reporter, log) -> tuple[dict[str, Any], str, Path]:
    """Train (or reuse) one student; returns ``(record without scores, key, model path)``."""
    from ReCoKDLib.engine import distill, train_teacher
    from ReCoKDLib.networks import UNetConfig, derive_student_config

    spec = METHODS[method]
    teacher_net = UNetConfig.from_dict(dict(data.setup.network, in_channels=data.case_set.in_channels,
                                            num_classes=data.case_set.num_classes))
    if spec.kd is None:
        student_net = derive_student_config(teacher_net, budget.reduction).to_dict()
        cfg = train_config(budget, data.setup, budget.student_steps, seed, device, network=student_net)
        start = lambda out, resume: train_teacher(cfg, data.case_set, out, reporter, resume=resume, role="student")  # noqa: E731
    else:
        cfg = train_config(budget, data.setup, budget.student_steps, seed, device, student_reduction=budget.reduction,
                           kd=spec.kd, kd_weight=spec.kd_weight, frozen_aux=spec.frozen_aux)
        start = lambda out, resume: distill(cfg, teacher["model"], data.case_set, out, reporter, resume=resume)  # noqa: E731
    key = _measure.config_hash("student", method, cfg.to_dict(), teacher["key"], budget.overlap)
    out_dir = work / f"{method}-seed{seed}-{key}"
    model, seconds, reused = _train_or_reuse(out_dir, key, lambda resume: start(out_dir, resume), log)
    return {"dataset": data.setup.key, "method": method, "seed": seed, "train_seconds": seconds,
            "reused_training": reused, "steps": budget.student_steps}, key, model


def _dataset_block(data: PreparedData, teacher: Mapping[str, Any] | None, runs: list[dict[str, Any]],
                   methods: Sequence[str]) -> dict[str, Any]:
    teacher_dice = None if teacher is None else teacher.get("mean_dice")
    plain = {r["seed"]: r["mean_dice"] for r in runs if r["method"] == "none"}
    for r in runs:
        r["teacher_mean_dice"] = teacher_dice
        r["plain_student_mean_dice"] = plain.get(r["seed"])
        r["gap_recovery"] = None if r["method"] == "none" else gap_recovery(r["mean_dice"], plain.get(r["seed"]), teacher_dice)
    return {
        "dataset": data.setup.raw_name, "train_cases": data.train_ids,
        "test_cases": [c.case_id for c in data.test_cases], "classes": data.class_names[1:],
        "setup": data.setup.to_dict(), "teacher": teacher, "runs": runs,
        "summary": summarize(runs, teacher_dice, list(methods)),
    }


def default_output(budget: Budget) -> Path:
    if budget.name != "gpu":
        return _measure.RESULTS_DIR / "efficacy.json"
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown"
    safe = "".join(ch if ch.isalnum() else "-" for ch in gpu).strip("-").lower()
    return _measure.RESULTS_DIR / f"efficacy_gpu_{safe}.json"


def run_benchmark(budget: Budget, datasets: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
                  work_dir: Path, output: Path, device: str, threads: int, data_dir: Path | None = None,
                  argv: Sequence[str] | None = None, log=print) -> dict[str, Any]:
    """Run (or resume) the benchmark; the JSON at ``output`` is rewritten after every finished run."""
    import torch

    from ReCoKDLib.engine import TrainingDivergedError
    from ReCoKDLib.progress import Reporter

    torch.set_num_threads(threads)
    reporter = Reporter()  # silent: the benchmark prints one line per run
    setups = dataset_setups(budget.patches, budget.spacings)
    previous: dict[tuple, dict[str, Any]] = {}
    if output.is_file():
        old = _measure.read_json(output)
        for key, block in old.get("datasets", {}).items():
            for r in block.get("runs", []):
                previous[(key, r["method"], r["seed"], r.get("key"))] = r
            if block.get("teacher"):
                previous[(key, "teacher", None, block["teacher"].get("key"))] = block["teacher"]
    result: dict[str, Any] = {
        "benchmark": "efficacy", **_measure.provenance(threads, argv),
        "config": {"budget": budget.to_dict(), "device": device, "datasets": list(datasets), "seeds": list(seeds),
                   "methods": {m: METHODS[m].to_dict() for m in methods}},
        "gap_recovery_definition": GAP_RECOVERY_DEFINITION,
        "datasets": {},
    }
    t_start = time.perf_counter()
    for ds in datasets:
        setup = setups[ds]
        work = work_dir / ds
        data = prepare_data(setup, data_dir, work, reporter)
        teacher_info = _teacher(budget, data, work, device, reporter, log)
        prev_teacher = previous.get((ds, "teacher", None, teacher_info["key"]))
        if prev_teacher is not None:
            teacher = dict(prev_teacher, reused=True)
        else:
            scores = evaluate_model(teacher_info["model"], data.test_cases, budget.overlap, device)
            teacher = {"key": teacher_info["key"], "params": teacher_info["params"], "steps": budget.teacher_steps,
                       "train_seconds": teacher_info["train_seconds"], "reused": teacher_info["reused"], **scores}
        teacher["model"] = str(teacher_info["model"])
        log(f"{ds}: teacher mean Dice {teacher['mean_dice']:.3f}")
        runs: list[dict[str, Any]] = []
        result["datasets"][ds] = _dataset_block(data, teacher, runs, methods)
        _measure.write_json(output, result)
        order = ["none"] + [m for m in methods if m != "none"] if "none" in methods else list(methods)
        for method in order:
            for seed in seeds:
                try:
                    record, key, model = _student_run(budget, data, teacher_info, method, seed, work, device,
                                                      reporter, log)
                except TrainingDivergedError as exc:  # recorded, not hidden; a rerun resumes from its checkpoint
                    runs.append({"dataset": ds, "method": method, "seed": seed, "status": "diverged",
                                 "error": str(exc), "mean_dice": None, "mean_hd95": None, "dice": {}, "hd95": {}})
                    log(f"{ds} {method} seed {seed}: DIVERGED ({exc})")
                    result["datasets"][ds] = _dataset_block(data, teacher, runs, methods)
                    _measure.write_json(output, result)
                    continue
                done = previous.get((ds, method, seed, key))
                if done is not None:
                    log(f"{ds} {method} seed {seed}: already in {output}, skipped")
                    runs.append(done)
                else:
                    scores = evaluate_model(model, data.test_cases, budget.overlap, device)
                    from ReCoKDLib.networks import count_parameters
                    from ReCoKDLib.teachers import load_model

                    record.update(key=key, params=count_parameters(load_model(model, device="cpu").network), **scores)
                    runs.append(record)
                    log(f"{ds} {method} seed {seed}: mean Dice {scores['mean_dice']:.3f} "
                        f"(train {record['train_seconds'] or 0:.0f} s, total {time.perf_counter() - t_start:.0f} s)")
                result["datasets"][ds] = _dataset_block(data, teacher, runs, methods)
                result["elapsed_seconds"] = time.perf_counter() - t_start
                _measure.write_json(output, result)
    return result


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="larger patches and more steps, for a CUDA machine")
    parser.add_argument("--smoke", action="store_true", help="tiny configuration (tests): 2 steps, coarse spacing")
    parser.add_argument("--datasets", default="ct,brain", help="comma-separated: ct, brain (default both)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated integer seeds (default 0,1,2)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-efficacy"),
                        help="models, checkpoints and the preprocessing cache (default runs/bench-efficacy)")
    parser.add_argument("--output", type=Path, help="JSON to write (default benchmarks/results/efficacy.json, "
                                                    "or efficacy_gpu_<gpu>.json with --gpu)")
    parser.add_argument("--data-dir", type=Path, help="where 'recokd data fetch' keeps the datasets")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", default=None, help="training/evaluation device (default: cuda with --gpu, else cpu)")
    args = parser.parse_args(argv)

    if args.gpu and args.smoke:
        parser.error("--gpu and --smoke exclude each other")
    budget = GPU if args.gpu else SMOKE if args.smoke else CPU
    datasets = _csv(args.datasets)
    methods = _csv(args.methods)
    unknown = [d for d in datasets if d not in ("ct", "brain")] + [m for m in methods if m not in METHODS]
    if unknown or not datasets or not methods:
        parser.error(f"unknown or missing datasets/methods {unknown}; datasets: ct, brain; methods: {', '.join(METHODS)}")
    try:
        seeds = [int(s) for s in _csv(args.seeds)]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if not seeds or args.threads < 1:
        parser.error("give at least one seed and --threads >= 1")
    device = args.device or ("cuda" if args.gpu else "cpu")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--gpu/--device cuda needs CUDA, which is not available here")
    output = args.output or default_output(budget)
    run_benchmark(budget, datasets, methods, seeds, args.work_dir, output, device, args.threads, args.data_dir,
                  argv=[__file__, *(sys.argv[1:] if argv is None else argv)])
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
