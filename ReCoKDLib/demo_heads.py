"""README command 1 (``recokd demo``): a real pretrained teacher distilled label-free through the engine.

:func:`run_heads_demo` distils HD-BET (the built-in teacher preset ``hd-bet``, 16.35 M parameters,
weights from the ``hdbet`` extra) into a DynUNet student of about a tenth of its size, on the real
unlabelled T1 heads of ``Dataset904_T1Heads`` (``recokd data fetch --only heads``):

1. **data**: the ``train`` heads of ``dataset.json``'s ``label_free_split`` are preprocessed on the
   teacher's card (1.5 mm, z-score), the ``test`` heads are held out;
2. **distill**: :func:`ReCoKDLib.engine.distill` with ``teacher_outputs="cache"``: the teacher runs
   once per training head on the whole volume (stage ``teacher-cache``), then the student learns
   from the cached logits and tap features (stage ``distill``): Dice + CE on the teacher's argmax
   plus ReCo-KD at the teacher's taps (strides 2, 4, 8, 16), which are the stages of the
   strided-stem student (no convolution at full resolution: ``networks.UNetConfig.strided_stem``);
3. **overlap** (stage ``overlap``): the sliding-window overlap ``recokd segment`` will use for the
   student is chosen on the *training* heads, against the teacher's segmentation of them
   (:mod:`ReCoKDLib.overlap`); the student is written as ``student.pt`` with it in its card;
4. **evaluate** (stage ``evaluate``): teacher and student segment each held-out head as
   ``recokd segment`` does (:func:`ReCoKDLib.infer.segment_volume` with its defaults: backend,
   precision and window chosen automatically, the card's post-processing; HD-BET and its student
   keep the largest brain component, HD-BET's own default) on the head's own grid. Reported: Dice
   of the student's brain mask against the teacher's, Dice of both against the reference mask
   where the dataset has one (Colin27, ``ch2bet > 0``), with and without post-processing,
   parameters, the median CPU seconds to segment a head end to end (preprocess, network, restore,
   post-process; after one untimed first run that chooses the backend), the network's share of
   them and the speed-up;
   ``metrics.json``, ``report.md``, ``summary.txt``.

Every stage is resumable: preprocessing and teacher outputs are cached, training writes
checkpoints and is reused when finished with the same configuration, and each model's evaluation
is stored under ``evaluation/`` keyed by the model's hash.

Nothing here is specific to HD-BET except :data:`HeadsDemoConfig`'s defaults: any teacher source
``teachers.load_model`` reads (a preset JSON with taps) and any dataset with a
``label_free_split`` go through the same path (the tests use a tiny stand-in teacher).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ReCoKDLib.progress import Reporter

STAGE = "demo"
EVAL_STAGE = "evaluate"
#: what the demo promises (README command 1); ``metrics.json`` says which are met
TARGETS = {"dice_vs_teacher": 0.97, "reference_gap": 0.01, "speedup": 15.0}


@dataclass(frozen=True)
class HeadsDemoConfig:
    """The label-free demo's teacher, student and budget (steps set the budget, not wall time).

    Attributes:
        teacher: teacher source for ``teachers.load_model`` (default the built-in HD-BET preset).
        dataset: dataset folder name under the data folder (``recokd data fetch``).
        student_filters: DynUNet widths, stride 2 at every stage after the first.
        student_stem_stride: the first stage's stride. 2 (default, a *strided stem*): no
            convolution at full resolution, logits upsampled trilinearly (``networks.build_unet``);
            the stages are at strides 2, 4, 8, 16, where the teacher's taps are; (16, 32, 64, 128):
            1.40 M parameters. 1: a full-resolution first stage, stages at 1, 2, 4, 8, 16 (with
            (8, 16, 32, 64, 128), 1.41 M parameters, this was the demo's student until 2026-12-06:
            8.4x faster than HD-BET; the full-resolution stage took most of its time).
        student_norm: the student's normalisation (``networks.UNetConfig.norm``): ``"instance"``
            (the teacher's, default) or ``"batch"`` (fixed statistics: ``recokd segment`` then runs it
            in one window on the whole head instead of overlapping training patches). Measured
            2026-12-07, 1,600 steps, Dice vs the teacher through ``recokd segment`` (mean of the two
            held-out heads) / vs Colin27's reference / seconds per head: instance 0.978 / 0.933 /
            2.8 s; batch 0.950 / 0.895 / 1.0 s (in 64^3 patches 0.963 / 0.913 / 2.8 s).
        steps, patch_size, batch_size, lr: the student's training (AdamW, poly decay). The
            strided-stem student's Dice vs the teacher through ``recokd segment``'s path (mean of the
            held-out heads, largest component kept; 2 threads, 2026-12-07): 0.965 after 800 steps,
            0.977 after 1600 (default; training 18 min in float32 on a 2-core CPU without bf16
            kernels; README command 1 from a fresh clone: 27 min there, 13 min on a bf16 CPU).
        kd, kd_weight: KD methods (``{method: options}``) and lambda after the warm-up.
        bf16: bf16 autocast for training on the CPU.
        augmentation: nnU-Net-style patch augmentation (``data.sampling.AugmentationConfig``), on the
            image and (resampled) on the cached teacher outputs alike. Measured here without it (800
            steps): Dice vs the teacher 0.947 on Colin27 but 0.888 on pyradiomics brain2 (three
            training heads are easily over-fitted); with it (400 steps) 0.941 and 0.926.
        seed: seeds the student and the sampler.
        inference_overlap: the sliding-window overlap written to the student's card (what
            ``recokd segment`` uses). ``"auto"`` (default): chosen after training on the *training*
            heads (stage ``overlap``, :mod:`ReCoKDLib.overlap`): the student segments them at overlaps
            0.5, 0.25, 0.1 and 0 and keeps the fewest windows within 0.005 mean Dice of the best
            agreement with the teacher's segmentation of the same heads; the held-out heads play no
            part. A number: that overlap, unmeasured (before 2026-12-07 the demo wrote 0.25: on the
            1,600-step student, overlap 0.5 / 0.25 / 0.1 / 0 gave Dice vs the teacher 0.972 / 0.972 /
            0.971 / 0.968 on the held-out heads, Colin27 27 windows at 0.25, 12 at 0.1). ``None``:
            the product's default 0.5.
        latency_repeats: timed segmentations per held-out head for the student (the teacher's one
            timed run per head is its latency).
        trust_entry_points: entry points a teacher preset may name beyond the allow-list.
    """

    teacher: str = "preset:hd-bet"
    dataset: str = "Dataset904_T1Heads"
    student_filters: tuple[int, ...] = (16, 32, 64, 128)
    student_stem_stride: int = 2
    student_norm: str = "instance"
    steps: int = 1600
    patch_size: tuple[int, int, int] = (64, 64, 64)
    batch_size: int = 2
    lr: float = 2e-3
    kd: dict[str, dict[str, Any]] = field(default_factory=lambda: {"recokd": {"weight": 1.0}})
    kd_weight: float = 0.01
    bf16: bool = True
    augmentation: bool = True
    seed: int = 0
    inference_overlap: float | str | None = "auto"
    latency_repeats: int = 3
    trust_entry_points: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        overlap = self.inference_overlap
        if not (overlap is None or overlap == "auto" or (isinstance(overlap, (int, float)) and not isinstance(overlap, bool)
                                                         and 0 <= overlap < 1)):
            raise ValueError(f"inference_overlap must be 'auto', None or a number in [0, 1); got {overlap!r}")


# ---------------------------------------------------------------------------------------------
# Teacher, data, student


def load_teacher(source: str, trust_entry_points: Iterable[str] = ()) -> Any:
    """The frozen teacher (``teachers.LoadedModel``) with ``sha256``; a missing package says what to install."""
    from ReCoKDLib.engine.state import state_sha256
    from ReCoKDLib.teachers import load_model

    loaded = load_model(source, "cpu", trust_entry_points=list(trust_entry_points))
    if not loaded.card.tap_names:
        raise ValueError(f"the teacher {source} names no taps: the demo distils features at the teacher's taps")
    loaded.sha256 = state_sha256(loaded.network)  # the weights themselves (a preset's JSON does not hold them)
    return loaded


def head_cases(data_root: Path) -> tuple[Any, list, list]:
    """``(RawDataset, train cases, held-out cases)`` of ``dataset.json``'s ``label_free_split``.

    Train cases lose their labels (label-free); held-out cases keep them (reference masks).
    """
    from ReCoKDLib.data.layout import Case, RawDataset

    raw = RawDataset.open(data_root)
    split = raw.meta.get("label_free_split") if isinstance(raw.meta, dict) else None
    if not isinstance(split, dict) or not split.get("train") or not split.get("test"):
        raise ValueError(f"{data_root}/dataset.json has no label_free_split with 'train' and 'test' cases; "
                         "run 'recokd data fetch --only heads --force'")
    available = {c.case_id: c for c in raw.training_cases() + raw.test_cases()}
    missing = [c for c in [*split["train"], *split["test"]] if c not in available]
    if missing:
        raise ValueError(f"{data_root}: label_free_split names {missing}, which are not in the dataset; "
                         "run 'recokd data fetch --only heads --force'")
    train = [Case(c, available[c].image_paths, None) for c in split["train"]]
    return raw, train, [available[c] for c in split["test"]]


def student_config(filters: Sequence[int], num_classes: int, stem_stride: int = 1, norm: str = "instance"):
    """A DynUNet with ``filters``, stride ``stem_stride`` at the first stage and 2 after it, ``norm``
    (``networks.UNetConfig.norm``), no deep supervision."""
    from ReCoKDLib.networks import UNetConfig

    stem = (int(stem_stride),) * 3
    return UNetConfig(filters=tuple(int(f) for f in filters), strides=(stem,) + ((2, 2, 2),) * (len(filters) - 1),
                      num_classes=num_classes, deep_supervision=False, norm=norm)


def train_config(config: HeadsDemoConfig, teacher: Any, cache_dir: Path, device: str = "cpu"):
    """The engine's :class:`TrainConfig`: the student at the teacher's tap strides, teacher outputs cached."""
    from ReCoKDLib.data.sampling import AugmentationConfig
    from ReCoKDLib.engine import TrainConfig
    from ReCoKDLib.teacher_presets import student_taps_for

    student = student_config(config.student_filters, len(teacher.card.classes), config.student_stem_stride,
                             config.student_norm)
    strides = teacher.card.provenance.get("tap_strides")
    if not strides:
        raise ValueError("the teacher's card has no tap strides (a teacher preset with 'taps' gives them)")
    return TrainConfig(
        patch_size=config.patch_size, batch_size=config.batch_size, steps=config.steps, num_val_cases=0,
        val_every=config.steps, checkpoint_every=50, optimizer="adamw", lr=config.lr, weight_decay=1e-4,
        ema_decay=0.0, seed=config.seed, device=device, bf16=config.bf16, log_every=5,
        student_config=student.to_dict(), teacher_taps=list(teacher.card.tap_names),
        student_taps=student_taps_for(strides, student), kd={k: dict(v) for k, v in config.kd.items()},
        kd_weight=config.kd_weight, pseudo_label_weight=1.0, teacher_outputs="cache",
        teacher_cache_dir=str(cache_dir), augmentation=AugmentationConfig(enabled=config.augmentation).to_dict(),
        inference_overlap=None if config.inference_overlap == "auto" else config.inference_overlap,
    )


@dataclass
class HeadsData:
    """The frozen teacher, the dataset, its train/held-out cases and the preprocessed training set."""

    teacher: Any
    raw: Any
    train_cases: list
    test_cases: list
    case_set: Any


def prepare_heads(config: HeadsDemoConfig, data_dir: str | os.PathLike | None, preprocessed_dir: Path,
                  reporter: Reporter) -> HeadsData:
    """Load the teacher, open (or fetch) the dataset and preprocess its training heads (cached) on the teacher's card."""
    from ReCoKDLib.data.fetch import default_data_dir
    from ReCoKDLib.data.preprocess import preprocess_case
    from ReCoKDLib.data.sampling import prepare_cases

    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    data = root / config.dataset
    if not (data / "dataset.json").is_file():
        if config.dataset != "Dataset904_T1Heads":
            raise ValueError(f"{data} is not a dataset folder (no dataset.json)")
        from ReCoKDLib.data.fetch import fetch_datasets

        data = next(iter(fetch_datasets(root, only="heads", reporter=reporter).values()))
    teacher = load_teacher(config.teacher, config.trust_entry_points)
    raw, train_cases, test_cases = head_cases(data)
    reporter.start("preprocess", total=len(train_cases))
    case_set = prepare_cases(
        train_cases, list(teacher.card.classes), preprocess_case,
        {"spacing": [float(s) for s in teacher.card.spacing], "normalization": dict(teacher.card.normalization)},
        preprocessed_dir,
        lambda i, n, cid, cached: reporter.progress("preprocess", i, n, message=f"{cid} ({'cache' if cached else 'new'})"),
        allow_unlabelled=True)
    reporter.done("preprocess", path=str(preprocessed_dir))
    return HeadsData(teacher, raw, train_cases, test_cases, case_set)


def distil_student(config: HeadsDemoConfig, data: HeadsData, run_dir: Path, cache_dir: Path, device: str,
                   reporter: Reporter) -> tuple[Path, Any]:
    """``engine.distill`` of one student (reused when finished with the same configuration, else resumed or
    started); returns ``(model_last.pt, TrainConfig)``. Runs sharing ``cache_dir`` share the teacher's outputs."""
    from ReCoKDLib.demo import run_or_reuse
    from ReCoKDLib.engine import distill

    train_cfg = train_config(config, data.teacher, cache_dir, device)
    path = run_or_reuse(run_dir.name, run_dir, train_cfg,
                        lambda resume: distill(train_cfg, data.teacher, data.case_set, run_dir, reporter, resume=resume),
                        reporter)
    return path, train_cfg


# ---------------------------------------------------------------------------------------------
# Evaluation on whole held-out heads, through the path ``recokd segment`` runs

#: what a stored evaluation was measured with; a record of another protocol is measured again
EVAL_PROTOCOL = "segment_volume"


@dataclass
class Head:
    """A head as read from disk: raw image ``(C, D, H, W)``, its geometry, reference mask
    ``(D, H, W)`` bool on the same grid (or ``None``: the training heads have none)."""

    case_id: str
    image: np.ndarray
    geometry: Any
    reference: np.ndarray | None


def load_heads(raw: Any, cases: Sequence[Any]) -> list[Head]:
    """The heads of ``cases`` on their original grids (what a user opens; nothing is resampled here)."""
    heads = []
    for case in cases:
        image, label, geometry = raw.load_case(case)
        heads.append(Head(case.case_id, np.asarray(image), geometry, None if label is None else np.asarray(label) > 0))
    return heads


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks of the same shape (1.0 when both are empty)."""
    if a.shape != b.shape:
        raise ValueError(f"Dice of masks of different shapes {a.shape} and {b.shape}")
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(a, b).sum()) / denom


def segment_head(model: Any, head: Head, brain: int = 1) -> dict[str, Any]:
    """Segment one head as ``recokd segment`` does (:func:`ReCoKDLib.infer.segment_volume` with its
    defaults: backend, precision and window ``auto``, CPU) and time it end to end.

    Returns ``{"mask", "mask_raw"}`` (``(D, H, W)`` bool on the head's own grid, after / before the
    card's post-processing), ``"seconds"`` (preprocess + network + restore + post-processing; reading
    and writing files excluded), ``"stage_seconds"``, ``"backend"``, ``"window"``.
    """
    from ReCoKDLib.infer import segment_volume
    from ReCoKDLib.postprocess import postprocess_labels

    result = segment_volume(model, head.image, head.geometry, device="cpu", postprocess=False)
    t0 = time.perf_counter()
    labels, _ = postprocess_labels(result.labels, model.card.postprocessing, model.card.classes)
    post_seconds = time.perf_counter() - t0
    stages = {**result.info["stage_seconds"], "postprocess": round(post_seconds, 4)}
    return {"mask": labels == brain, "mask_raw": result.labels == brain, "seconds": result.seconds + post_seconds,
            "stage_seconds": stages, "backend": result.info["backend"], "window": result.info["window"]}


def evaluate_model(model: Any, heads: Sequence[Head], repeats: int = 1, reporter: Reporter | None = None,
                   name: str = "", warmup: bool = True) -> dict[str, Any]:
    """Masks of ``model`` (a ``LoadedModel``) on each held-out head through :func:`segment_head`,
    Dice against each reference, and the median end-to-end seconds of ``repeats`` timed runs per head.

    One untimed run on the first head comes first (``warmup``): the first segmentation of a model
    chooses its backend and may export and check a graph (cached beside the model, once), which is
    not what a user waits for on every click. ``warmup=False`` skips it where only the masks matter.

    Returns ``{"masks": {case: (D, H, W) bool}, "masks_raw": {...}, "dice_vs_reference": {case: float},
    "dice_vs_reference_raw": {...}, "latency_s" (median of all runs), "latencies_s", "seconds_per_head"
    ({case: median}), "network_s" (median seconds in the network), "stage_seconds" (median per stage),
    "first_call_s", "backend", "window"}``.
    """
    t0 = time.perf_counter()
    first = segment_head(model, heads[0]) if warmup else None  # without it, the first timed run pays the choice
    first_call = time.perf_counter() - t0
    masks, masks_raw, refs, refs_raw, runs, per_head = {}, {}, {}, {}, [], {}
    for index, head in enumerate(heads):
        head_runs = [segment_head(model, head) for _ in range(max(1, repeats))]
        runs += head_runs
        per_head[head.case_id] = float(statistics.median(r["seconds"] for r in head_runs))
        run = head_runs[-1]
        masks[head.case_id], masks_raw[head.case_id] = run["mask"], run["mask_raw"]
        if head.reference is not None:
            refs[head.case_id] = dice(run["mask"], head.reference)
            refs_raw[head.case_id] = dice(run["mask_raw"], head.reference)
        if reporter is not None:
            reporter.progress(EVAL_STAGE, index + 1, len(heads), message=f"{name}: {head.case_id} {run['seconds']:.1f} s")
    stage_names = list(runs[0]["stage_seconds"])
    return {"masks": masks, "masks_raw": masks_raw, "dice_vs_reference": refs, "dice_vs_reference_raw": refs_raw,
            "latency_s": float(statistics.median(r["seconds"] for r in runs)),
            "latencies_s": [r["seconds"] for r in runs], "seconds_per_head": per_head,
            "network_s": float(statistics.median(r["stage_seconds"]["infer"] for r in runs)),
            "stage_seconds": {k: float(statistics.median(r["stage_seconds"][k] for r in runs)) for k in stage_names},
            "first_call_s": first_call if warmup else runs[0]["seconds"], "backend": (first or runs[0])["backend"],
            "window": (first or runs[0])["window"]}


def evaluate_cached(name: str, model: Any, model_key: str, heads: Sequence[Head], folder: Path,
                    repeats: int, reporter: Reporter | None = None, warmup: bool = True) -> dict[str, Any]:
    """:func:`evaluate_model`, stored in ``folder/<name>.json`` + ``.npz`` and reused for the same
    model, heads, repeats, post-processing, card inference settings and :data:`EVAL_PROTOCOL`."""
    from ReCoKDLib.checkpoint import atomic_output, atomic_write_text

    key = {"model": model_key, "heads": [h.case_id for h in heads], "repeats": repeats,
           "postprocessing": dict(model.card.postprocessing or {}), "inference": dict(model.card.inference or {}),
           "protocol": EVAL_PROTOCOL}
    record_path, masks_path = folder / f"{name}.json", folder / f"{name}_masks.npz"
    try:
        record = json.loads(record_path.read_text())
        if record.get("key") == key:
            with np.load(masks_path) as npz:
                record["masks"] = {h.case_id: npz[h.case_id] for h in heads}
                record["masks_raw"] = {h.case_id: npz[f"raw__{h.case_id}"] for h in heads}
            if reporter is not None:
                reporter.log(EVAL_STAGE, f"{name}: reusing the evaluation in {record_path}")
            return record
    except (OSError, ValueError, KeyError):
        pass
    result = evaluate_model(model, heads, repeats, reporter, name, warmup)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_output(masks_path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **result["masks"], **{f"raw__{c}": m for c, m in result["masks_raw"].items()})
    atomic_write_text(record_path, json.dumps({**{k: v for k, v in result.items() if k not in ("masks", "masks_raw")},
                                               "key": key}, indent=2, default=str))
    return {**result, "key": key}


def timing(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The timing fields of an evaluation, as ``metrics.json`` holds them for each model (``None``
    where a stored evaluation predates the field)."""
    fields = ("latency_s", "latencies_s", "seconds_per_head", "network_s", "stage_seconds", "first_call_s",
              "backend", "window")
    return {k: evaluation.get(k) for k in fields}


def score_student(student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, Any]:
    """Dice of the student's masks against the teacher's per head, mean and SD; ``..._raw``: the
    networks' argmax before post-processing."""
    per_head = {case: dice(mask, teacher["masks"][case]) for case, mask in student["masks"].items()}
    raw = {case: dice(mask, teacher["masks_raw"][case]) for case, mask in student["masks_raw"].items()}
    values = list(per_head.values())
    return {"dice_vs_teacher": per_head, "dice_vs_teacher_mean": float(np.mean(values)),
            "dice_vs_teacher_sd": float(np.std(values)), "dice_vs_teacher_raw": raw,
            "dice_vs_teacher_raw_mean": float(np.mean(list(raw.values())))}


# ---------------------------------------------------------------------------------------------
# The student's overlap, chosen on the training heads (never the held-out ones)

OVERLAP_STAGE = "overlap"


def choose_student_overlap(teacher: Any, student_path: Path, train_heads: Sequence[Head], out: Path,
                           reporter: Reporter) -> tuple[Path, dict[str, Any]]:
    """The student as ``out/student.pt``: ``student_path``'s weights, its card's overlap chosen by
    :mod:`ReCoKDLib.overlap` on ``train_heads`` against the teacher's segmentation of them (through
    ``recokd segment``'s path, stored in ``out/evaluation/teacher_train*``). Reused when
    ``out/student.pt`` was made from the same file by the same rule. Returns ``(path, record)``.
    """
    from ReCoKDLib.checkpoint import CheckpointError, read_model_card, sha256_file
    from ReCoKDLib.overlap import CANDIDATES, TOLERANCE, choose_overlap, measure_overlaps, write_overlap
    from ReCoKDLib.teachers import load_model

    target = out / "student.pt"
    source_sha = sha256_file(student_path)
    try:
        record = read_model_card(target).metrics.get("overlap_choice") or {}
        if (target.is_file() and record.get("model_sha256") == source_sha and record.get("tolerance") == TOLERANCE
                and [t["overlap"] for t in record.get("trials", [])] == list(CANDIDATES)):
            reporter.log(OVERLAP_STAGE, f"reusing the overlap chosen before: {record['chosen']:g} ({target})")
            return target, record
    except (OSError, ValueError, CheckpointError):
        pass
    reporter.start(EVAL_STAGE, total=len(train_heads), message="teacher on the training heads (the overlap's reference)")
    # masks only: no untimed warm-up pass (one teacher pass per head, not one more)
    reference = evaluate_cached("teacher_train", teacher, teacher.sha256, train_heads, out / "evaluation", 1, reporter,
                                warmup=False)
    student = load_model(student_path, "cpu")
    trials = measure_overlaps(student, [(h.case_id, h.image, h.geometry) for h in train_heads],
                              [reference["masks"][h.case_id].astype(np.uint8) for h in train_heads],
                              reporter=reporter, stage=OVERLAP_STAGE)
    chosen = choose_overlap(trials)
    write_overlap(student_path, target, trials, chosen, reference="the teacher's segmentation of the training heads "
                  f"({', '.join(h.case_id for h in train_heads)})")
    record = read_model_card(target).metrics["overlap_choice"]
    reporter.log(OVERLAP_STAGE, "overlap " + ", ".join(f"{t.overlap:g}: Dice {t.dice:.4f}, {t.windows} windows"
                                                       for t in trials) + f" -> {chosen.overlap:g}")
    return target, record


# ---------------------------------------------------------------------------------------------
# Report


def targets_met(metrics: dict[str, Any]) -> dict[str, bool]:
    """Which of :data:`TARGETS` the student meets (reference gap: worst held-out head with a reference)."""
    t, s = metrics["teacher"], metrics["student"]
    gaps = [t["dice_vs_reference"][c] - s["dice_vs_reference"][c] for c in s["dice_vs_reference"]]
    return {"dice_vs_teacher": s["dice_vs_teacher_mean"] >= TARGETS["dice_vs_teacher"],
            "reference_gap": bool(gaps) and max(gaps) <= TARGETS["reference_gap"],
            "speedup": metrics["speedup"] >= TARGETS["speedup"]}


def format_heads_table(metrics: dict[str, Any]) -> str:
    """Plain-text table: Dice vs teacher per held-out head, Dice vs reference, parameters, latency."""
    t, s = metrics["teacher"], metrics["student"]
    rows = [("", "teacher", "student")]
    for case, value in s["dice_vs_teacher"].items():
        rows.append((f"Dice vs teacher: {case}", "1", f"{value:.3f}"))
    rows.append(("Dice vs teacher: mean", "1", f"{s['dice_vs_teacher_mean']:.3f}"))
    if s.get("postprocessing"):
        rows.append(("  without post-processing", "1", f"{s['dice_vs_teacher_raw_mean']:.3f}"))
    for case in t["dice_vs_reference"]:
        rows.append((f"Dice vs reference: {case}", f"{t['dice_vs_reference'][case]:.3f}",
                     f"{s['dice_vs_reference'].get(case, float('nan')):.3f}"))
    rows.append(("parameters", f"{t['params']:,d}", f"{s['params']:,d}"))
    if s.get("overlap") is not None:
        rows.append(("sliding-window overlap (card)", "", f"{s['overlap']:g}"))
    for case, seconds in (t.get("seconds_per_head") or {}).items():
        rows.append((f"CPU seconds to segment: {case}", f"{seconds:.2f}",
                     f"{(s.get('seconds_per_head') or {}).get(case, float('nan')):.2f}"))
    rows.append(("CPU seconds to segment a head, median", f"{t['latency_s']:.2f}", f"{s['latency_s']:.2f}"))
    rows.append(("  of which the network", f"{t['network_s']:.2f}", f"{s['network_s']:.2f}"))
    rows.append(("speed-up", "1", f"{metrics['speedup']:.1f}x"))
    width = max(len(r[0]) for r in rows) + 2
    lines = [r[0].ljust(width) + r[1].rjust(12) + r[2].rjust(12) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _overlap_lines(record: dict[str, Any] | None) -> list[str]:
    """The report's account of the student's overlap choice (none when it was set by hand)."""
    if not record:
        return []
    lines = ["", f"The student's overlap, chosen on {record['reference']}: {record['chosen']:g} "
             f"(rule: {record['rule']}, tolerance {record['tolerance']:g}).", "",
             "| overlap | mean Dice vs reference | windows | seconds |", "|---|---|---|---|"]
    lines += [f"| {t['overlap']:g} | {t['dice']:.4f} | {t['windows']} | {t['seconds']:.2f} |" for t in record["trials"]]
    return lines


def report_markdown(metrics: dict[str, Any]) -> str:
    met = metrics["targets_met"]
    lines = [f"# ReCoKD demo: {metrics['teacher']['name']} distilled label-free", "",
             f"Trained on {', '.join(metrics['train_heads'])} (no labels); held out: "
             f"{', '.join(metrics['test_heads'])}.", "", "```", format_heads_table(metrics), "```", "",
             "Targets: " + ", ".join(f"{k} >= {v}" if k != "reference_gap" else f"reference gap <= {v}"
                                     for k, v in TARGETS.items()) + ": "
             + ", ".join(f"{k} {'met' if ok else 'MISSED'}" for k, ok in met.items()),
             *_overlap_lines(metrics["student"].get("overlap_choice")),
             "", f"Wall time: {metrics['wall_time_s']:.0f} s (this run; reused stages cost nothing), "
             f"load average at the end {metrics['load_average']}.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The run


def run_heads_demo(
    out_dir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    config: HeadsDemoConfig = HeadsDemoConfig(),
    device: str = "cpu",
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Distil ``config.teacher`` label-free on the heads and evaluate; returns ``out_dir/metrics.json``'s content.

    Args:
        out_dir: ``preprocessed/``, ``teacher_cache/``, ``student/`` (engine run), ``student.pt``
            (its weights with the chosen overlap, when ``inference_overlap`` is ``"auto"``),
            ``evaluation/``, ``metrics.json``, ``report.md``, ``summary.txt``.
        data_dir: the data folder (default ``recokd data fetch``'s); ``config.dataset`` must be
            in it (fetched when it is the built-in heads dataset and missing).
        config: :class:`HeadsDemoConfig`.
        device: where the student trains (``cpu``, ``cuda``, ``auto``); evaluation is on the CPU.
        reporter: progress (stages ``preprocess``, ``teacher-cache``, ``distill``, ``overlap``, ``evaluate``,
            ``demo``).
    """
    from ReCoKDLib.checkpoint import atomic_write_text, read_model_card, sha256_file
    from ReCoKDLib.networks import count_parameters
    from ReCoKDLib.teachers import load_model

    started = time.perf_counter()
    reporter = reporter or Reporter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reporter.start(STAGE, total=5, message=f"writing to {out}")

    # 1. Teacher and data ------------------------------------------------------------------------
    heads_data = prepare_heads(config, data_dir, out / "preprocessed", reporter)
    teacher, raw, train_cases, test_cases = (heads_data.teacher, heads_data.raw, heads_data.train_cases,
                                             heads_data.test_cases)
    reporter.progress(STAGE, 1, 5, message=f"data: {len(train_cases)} unlabelled training head(s), "
                      f"{len(test_cases)} held out; teacher {config.teacher}")

    # 2. Distillation through the engine (teacher outputs cached once per head) ---------------------
    student_path, train_cfg = distil_student(config, heads_data, out / "student", out / "teacher_cache", device,
                                             reporter)
    reporter.progress(STAGE, 2, 5, message=f"student: {student_path}")

    # 3. The overlap recokd segment uses for the student, chosen on the training heads ------------------
    overlap_choice = None
    if config.inference_overlap == "auto":
        student_path, overlap_choice = choose_student_overlap(teacher, student_path, load_heads(raw, train_cases),
                                                              out, reporter)
    reporter.progress(STAGE, 3, 5, message=f"student overlap: {read_model_card(student_path).inference.get('overlap')}")

    # 4. Evaluation on the held-out whole heads, as recokd segment runs them --------------------------
    heads = load_heads(raw, test_cases)
    student = load_model(student_path, "cpu")
    reporter.start(EVAL_STAGE, total=len(heads), message="teacher on the held-out heads (recokd segment's path)")
    t_eval = evaluate_cached("teacher", teacher, teacher.sha256, heads, out / "evaluation", 1, reporter)
    reporter.start(EVAL_STAGE, total=len(heads), message=f"student on the held-out heads ({config.latency_repeats} runs each)")
    s_eval = evaluate_cached("student", student, sha256_file(student_path), heads, out / "evaluation",
                             config.latency_repeats, reporter)
    reporter.done(EVAL_STAGE, path=str(out / "evaluation"))
    reporter.progress(STAGE, 4, 5, message="evaluated teacher and student")

    # 5. Metrics and report --------------------------------------------------------------------
    card = read_model_card(student_path)
    metrics: dict[str, Any] = {
        "task": "heads",
        "teacher": {"name": teacher.card.architecture.get("preset", config.teacher), "source": config.teacher,
                    "params": count_parameters(teacher.network), **timing(t_eval),
                    "dice_vs_reference": t_eval["dice_vs_reference"],
                    "dice_vs_reference_raw": t_eval["dice_vs_reference_raw"],
                    "postprocessing": teacher.card.postprocessing},
        "student": {"params": count_parameters(student.network), **timing(s_eval),
                    "dice_vs_reference": s_eval["dice_vs_reference"],
                    "dice_vs_reference_raw": s_eval["dice_vs_reference_raw"],
                    "postprocessing": student.card.postprocessing, **score_student(s_eval, t_eval),
                    "model": str(student_path), "teacher_outputs": card.kd.get("teacher_outputs"),
                    "overlap": (card.inference or {}).get("overlap"), "overlap_choice": overlap_choice},
        "speedup": t_eval["latency_s"] / s_eval["latency_s"],
        "network_speedup": t_eval["network_s"] / s_eval["network_s"],
        "evaluation": EVAL_PROTOCOL,
        "train_heads": [c.case_id for c in train_cases], "test_heads": [c.case_id for c in test_cases],
        "config": {**asdict(config), "train_config": train_cfg.to_dict()},
    }
    metrics["targets"] = dict(TARGETS)
    metrics["targets_met"] = targets_met(metrics)
    metrics["wall_time_s"] = time.perf_counter() - started
    metrics["load_average"] = [round(x, 2) for x in os.getloadavg()]
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=str))
    atomic_write_text(out / "report.md", report_markdown(metrics))
    summary = (f"ReCoKD demo: {metrics['teacher']['name']} ({metrics['teacher']['params']:,d} parameters) distilled "
               f"label-free into a {metrics['student']['params']:,d}-parameter student\n\n{format_heads_table(metrics)}\n\n"
               f"targets met: {metrics['targets_met']}\nmetrics: {out / 'metrics.json'}\nreport:  {out / 'report.md'}\n")
    atomic_write_text(out / "summary.txt", summary)
    reporter.done(STAGE, path=str(out / "metrics.json"), message=summary)
    return metrics
