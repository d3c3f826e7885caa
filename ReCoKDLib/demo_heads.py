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
3. **evaluate** (stage ``evaluate``): teacher and student on each held-out whole head, one pass
   each (padded to a multiple of 16 and of the network's size step, :func:`pad_multiple`): Dice of the student's brain mask against the teacher's,
   Dice of both against the reference mask where the dataset has one (Colin27, ``ch2bet > 0``,
   on the original grid), each model's masks after its card's post-processing (HD-BET and its
   student: the largest brain component, HD-BET's own default) and without it, parameters, CPU
   latency (fp32, median) and the speed-up;
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
import math
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
        steps, patch_size, batch_size, lr: the student's training (AdamW, poly decay). The
            strided-stem student's Dice vs the teacher (mean of the held-out heads, largest component
            kept / raw argmax, one thread): 0.956 / 0.938 after 800 steps, 0.962 / 0.953 after 1600
            (default; with 2 threads 0.959 / 0.954, README command 1 from a fresh clone: 13 min).
        kd, kd_weight: KD methods (``{method: options}``) and lambda after the warm-up.
        bf16: bf16 autocast for training on the CPU.
        augmentation: nnU-Net-style patch augmentation (``data.sampling.AugmentationConfig``), on the
            image and (resampled) on the cached teacher outputs alike. Measured here without it (800
            steps): Dice vs the teacher 0.947 on Colin27 but 0.888 on pyradiomics brain2 (three
            training heads are easily over-fitted); with it (400 steps) 0.941 and 0.926.
        seed: seeds the student and the sampler.
        latency_repeats: whole-head passes per held-out head for the student's latency (the
            teacher's one pass per head is its latency).
        trust_entry_points: entry points a teacher preset may name beyond the allow-list.
    """

    teacher: str = "preset:hd-bet"
    dataset: str = "Dataset904_T1Heads"
    student_filters: tuple[int, ...] = (16, 32, 64, 128)
    student_stem_stride: int = 2
    steps: int = 1600
    patch_size: tuple[int, int, int] = (64, 64, 64)
    batch_size: int = 2
    lr: float = 2e-3
    kd: dict[str, dict[str, Any]] = field(default_factory=lambda: {"recokd": {"weight": 1.0}})
    kd_weight: float = 0.01
    bf16: bool = True
    augmentation: bool = True
    seed: int = 0
    latency_repeats: int = 3
    trust_entry_points: tuple[str, ...] = ()


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


def student_config(filters: Sequence[int], num_classes: int, stem_stride: int = 1):
    """A DynUNet with ``filters``, stride ``stem_stride`` at the first stage and 2 after it (no deep supervision)."""
    from ReCoKDLib.networks import UNetConfig

    stem = (int(stem_stride),) * 3
    return UNetConfig(filters=tuple(int(f) for f in filters), strides=(stem,) + ((2, 2, 2),) * (len(filters) - 1),
                      num_classes=num_classes, deep_supervision=False)


def train_config(config: HeadsDemoConfig, teacher: Any, cache_dir: Path, device: str = "cpu"):
    """The engine's :class:`TrainConfig`: the student at the teacher's tap strides, teacher outputs cached."""
    from ReCoKDLib.data.sampling import AugmentationConfig
    from ReCoKDLib.engine import TrainConfig
    from ReCoKDLib.teacher_presets import student_taps_for

    student = student_config(config.student_filters, len(teacher.card.classes), config.student_stem_stride)
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
# Evaluation on whole held-out heads


@dataclass
class HeldOutHead:
    """A held-out head: preprocessed image ``(1, D, H, W)``, its ``PreprocessedCase`` and reference mask."""

    case_id: str
    image: np.ndarray
    pre: Any
    reference: np.ndarray | None


def load_held_out(raw: Any, cases: Sequence[Any], card: Any) -> list[HeldOutHead]:
    """Preprocess the held-out heads on the teacher's card; reference ``(D, H, W)`` bool on the original grid."""
    from ReCoKDLib.data.preprocess import preprocess_case

    heads = []
    for case in cases:
        image, label, geometry = raw.load_case(case)
        pre = preprocess_case(image, geometry, card.spacing, card.normalization)
        heads.append(HeldOutHead(case.case_id, pre.image, pre, None if label is None else np.asarray(label) > 0))
    return heads


def whole_head_probabilities(network: Any, image: np.ndarray,
                             multiple: int | Sequence[int] = 16) -> tuple[np.ndarray, float]:
    """``(K, D, H, W)`` softmax of one fp32 CPU pass on the whole head and its seconds.

    The head ``(C, D, H, W)`` is padded up to ``multiple`` (one or per axis ``(D, H, W)``) with its
    minimum (as the teacher cache and the presets do) and the output cropped back; subnormal floats
    are flushed.
    """
    import torch
    import torch.nn.functional as F

    from ReCoKDLib.engine.parts import flush_denormals
    from ReCoKDLib.networks import split_deep_supervision

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    size = x.shape[2:]
    multiples = [int(multiple)] * 3 if isinstance(multiple, (int, np.integer)) else [int(m) for m in multiple]
    pad = [(-s) % m for s, m in zip(size, multiples)]
    x = F.pad(x, [p for a in reversed(pad) for p in (0, a)], value=float(x.min()))
    network.eval()
    with torch.no_grad(), flush_denormals():
        t0 = time.perf_counter()
        logits = network(x)
        seconds = time.perf_counter() - t0
    logits = split_deep_supervision(logits)[0] if logits.dim() == 6 else logits
    logits = logits[0, :, : size[0], : size[1], : size[2]].float()
    return torch.softmax(logits, 0).numpy(), seconds


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks of the same shape (1.0 when both are empty)."""
    if a.shape != b.shape:
        raise ValueError(f"Dice of masks of different shapes {a.shape} and {b.shape}")
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(a, b).sum()) / denom


def pad_multiple(model: Any) -> tuple[int, int, int]:
    """What a whole head is padded to for ``model`` (a ``LoadedModel``): the least common multiple of
    16 and the network's own size step (a student with five stride-2 stages needs 32)."""
    from ReCoKDLib.models.window import size_step

    step = size_step(model) or (1, 1, 1)
    return tuple(math.lcm(16, int(s)) for s in step)  # type: ignore[return-value]


def evaluate_network(network: Any, heads: Sequence[HeldOutHead], repeats: int = 1,
                     reporter: Reporter | None = None, name: str = "",
                     multiple: int | Sequence[int] = 16, postprocessing: dict[str, Any] | None = None,
                     classes: Sequence[str] = ("background", "brain")) -> dict[str, Any]:
    """Masks (brain = class 1) on the preprocessed grid, Dice vs each reference, median latency.

    The masks are the model's labels after its card's ``postprocessing`` (as ``recokd segment``
    writes them; :mod:`ReCoKDLib.postprocess`); ``masks_raw`` / ``dice_vs_reference_raw`` are the
    network's argmax alone.

    Returns ``{"masks": {case: (D, H, W) bool}, "masks_raw": {...}, "dice_vs_reference": {case:
    float}, "dice_vs_reference_raw": {...}, "latency_s", "latencies_s"}``.
    """
    from ReCoKDLib.data.preprocess import restore_to_original
    from ReCoKDLib.postprocess import postprocess_labels

    def brain(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return labels == 1, postprocess_labels(labels, postprocessing, classes)[0] == 1

    masks, masks_raw, refs, refs_raw, latencies = {}, {}, {}, {}, []
    for index, head in enumerate(heads):
        probs, seconds = whole_head_probabilities(network, head.image, multiple)
        latencies.append(seconds)
        for _ in range(max(0, repeats - 1)):
            latencies.append(whole_head_probabilities(network, head.image, multiple)[1])
        masks_raw[head.case_id], masks[head.case_id] = brain(probs.argmax(0).astype(np.uint8))
        if head.reference is not None:
            raw, post = brain(restore_to_original(probs, head.pre).argmax(0).astype(np.uint8))
            refs_raw[head.case_id], refs[head.case_id] = dice(raw, head.reference), dice(post, head.reference)
        if reporter is not None:
            reporter.progress(EVAL_STAGE, index + 1, len(heads), message=f"{name}: {head.case_id} {seconds:.1f} s")
    return {"masks": masks, "masks_raw": masks_raw, "dice_vs_reference": refs, "dice_vs_reference_raw": refs_raw,
            "latency_s": float(statistics.median(latencies)), "latencies_s": latencies}


def evaluate_cached(name: str, network: Any, model_key: str, heads: Sequence[HeldOutHead], folder: Path,
                    repeats: int, reporter: Reporter | None = None, multiple: int | Sequence[int] = 16,
                    postprocessing: dict[str, Any] | None = None,
                    classes: Sequence[str] = ("background", "brain")) -> dict[str, Any]:
    """:func:`evaluate_network`, stored in ``folder/<name>.json`` + ``.npz`` and reused for the same
    model, heads and post-processing."""
    from ReCoKDLib.checkpoint import atomic_output, atomic_write_text

    key = {"model": model_key, "heads": [h.case_id for h in heads], "repeats": repeats,
           "postprocessing": dict(postprocessing or {})}
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
    result = evaluate_network(network, heads, repeats, reporter, name, multiple, postprocessing, classes)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_output(masks_path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **result["masks"], **{f"raw__{c}": m for c, m in result["masks_raw"].items()})
    atomic_write_text(record_path, json.dumps({**{k: v for k, v in result.items() if k not in ("masks", "masks_raw")},
                                               "key": key}, indent=2))
    return {**result, "key": key}


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
    rows.append(("CPU latency, whole head (s)", f"{t['latency_s']:.2f}", f"{s['latency_s']:.2f}"))
    rows.append(("speed-up", "1", f"{metrics['speedup']:.1f}x"))
    width = max(len(r[0]) for r in rows) + 2
    lines = [r[0].ljust(width) + r[1].rjust(12) + r[2].rjust(12) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def report_markdown(metrics: dict[str, Any]) -> str:
    met = metrics["targets_met"]
    lines = [f"# ReCoKD demo: {metrics['teacher']['name']} distilled label-free", "",
             f"Trained on {', '.join(metrics['train_heads'])} (no labels); held out: "
             f"{', '.join(metrics['test_heads'])}.", "", "```", format_heads_table(metrics), "```", "",
             "Targets: " + ", ".join(f"{k} >= {v}" if k != "reference_gap" else f"reference gap <= {v}"
                                     for k, v in TARGETS.items()) + ": "
             + ", ".join(f"{k} {'met' if ok else 'MISSED'}" for k, ok in met.items()),
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
        out_dir: ``preprocessed/``, ``teacher_cache/``, ``student/`` (engine run), ``evaluation/``,
            ``metrics.json``, ``report.md``, ``summary.txt``.
        data_dir: the data folder (default ``recokd data fetch``'s); ``config.dataset`` must be
            in it (fetched when it is the built-in heads dataset and missing).
        config: :class:`HeadsDemoConfig`.
        device: where the student trains (``cpu``, ``cuda``, ``auto``); evaluation is on the CPU.
        reporter: progress (stages ``preprocess``, ``teacher-cache``, ``distill``, ``evaluate``, ``demo``).
    """
    from ReCoKDLib.checkpoint import atomic_write_text, read_model_card, sha256_file
    from ReCoKDLib.networks import count_parameters
    from ReCoKDLib.teachers import load_model

    started = time.perf_counter()
    reporter = reporter or Reporter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reporter.start(STAGE, total=4, message=f"writing to {out}")

    # 1. Teacher and data ------------------------------------------------------------------------
    heads_data = prepare_heads(config, data_dir, out / "preprocessed", reporter)
    teacher, raw, train_cases, test_cases = (heads_data.teacher, heads_data.raw, heads_data.train_cases,
                                             heads_data.test_cases)
    reporter.progress(STAGE, 1, 4, message=f"data: {len(train_cases)} unlabelled training head(s), "
                      f"{len(test_cases)} held out; teacher {config.teacher}")

    # 2. Distillation through the engine (teacher outputs cached once per head) ---------------------
    student_path, train_cfg = distil_student(config, heads_data, out / "student", out / "teacher_cache", device,
                                             reporter)
    reporter.progress(STAGE, 2, 4, message=f"student: {student_path}")

    # 3. Evaluation on the held-out whole heads ---------------------------------------------------
    heads = load_held_out(raw, test_cases, teacher.card)
    student = load_model(student_path, "cpu")
    reporter.start(EVAL_STAGE, total=len(heads), message="teacher on the held-out heads (one pass each)")
    t_eval = evaluate_cached("teacher", teacher.network, teacher.sha256, heads, out / "evaluation", 1, reporter,
                             pad_multiple(teacher), teacher.card.postprocessing, teacher.card.classes)
    reporter.start(EVAL_STAGE, total=len(heads), message=f"student on the held-out heads ({config.latency_repeats} passes each)")
    s_eval = evaluate_cached("student", student.network, sha256_file(student_path), heads, out / "evaluation",
                             config.latency_repeats, reporter, pad_multiple(student), student.card.postprocessing,
                             student.card.classes)
    reporter.done(EVAL_STAGE, path=str(out / "evaluation"))
    reporter.progress(STAGE, 3, 4, message="evaluated teacher and student")

    # 4. Metrics and report --------------------------------------------------------------------
    card = read_model_card(student_path)
    metrics: dict[str, Any] = {
        "task": "heads",
        "teacher": {"name": teacher.card.architecture.get("preset", config.teacher), "source": config.teacher,
                    "params": count_parameters(teacher.network), "latency_s": t_eval["latency_s"],
                    "dice_vs_reference": t_eval["dice_vs_reference"],
                    "dice_vs_reference_raw": t_eval["dice_vs_reference_raw"],
                    "postprocessing": teacher.card.postprocessing},
        "student": {"params": count_parameters(student.network), "latency_s": s_eval["latency_s"],
                    "dice_vs_reference": s_eval["dice_vs_reference"],
                    "dice_vs_reference_raw": s_eval["dice_vs_reference_raw"],
                    "postprocessing": student.card.postprocessing, **score_student(s_eval, t_eval),
                    "model": str(student_path), "teacher_outputs": card.kd.get("teacher_outputs")},
        "speedup": t_eval["latency_s"] / s_eval["latency_s"],
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
