"""Distil a real pretrained teacher nobody here trained (HD-BET fold 0) into a ~1/10 student, label-free.

Three KD methods side by side, all through the engine and the demo's functions
(:mod:`ReCoKDLib.demo_heads`, README command 1 runs the first of them): the teacher comes through
the generic preset path (``teachers.load_model("preset:hd-bet")``); the data are the real,
unlabelled T1 heads of ``Dataset904_T1Heads`` (``recokd data fetch --only heads``): the students
learn on the ``train`` heads of its ``label_free_split`` and are scored on the held-out ones
(Colin27 also against its ``ch2bet`` brain mask).

Steps (each cached, so an interrupted run resumes where it stopped):

1. **preprocess** every training head like the teacher's card says (1.5 mm, z-score);
2. **students**: ``engine.distill`` with ``teacher_outputs="cache"`` (the teacher runs once per
   head on the whole volume; the cache under ``--cache-dir`` is shared by the methods, one entry
   per head with tap features for ``recokd``, one with logits only for the others), a DynUNet
   (``--student-filters``, strides 2 at every stage so its levels meet the teacher's taps at
   strides 2, 4, 8, 16), all on the teacher's hard labels (argmax) as the segmentation target:
   ``recokd`` (+ ReCo-KD on the taps, lambda 0.01), ``logit`` (+ logit KD, T = 2, weight 1) and
   ``hard`` (no KD term: logit KD at weight 0);
3. **evaluate** on the held-out heads (``demo_heads.evaluate_cached``: each model segments each head
   as ``recokd segment`` does): Dice of the student's brain mask vs the teacher's and, for Colin27,
   vs ``ch2bet > 0``, on the head's own grid; parameters; CPU seconds of teacher and student to
   segment a whole head end to end.

Usage::

    python benchmarks/pretrained_teacher.py                 # CPU budget
    python benchmarks/pretrained_teacher.py --gpu           # longer schedule, bigger patches, CUDA
    python benchmarks/pretrained_teacher.py --smoke --out /tmp/s   # stand-in teacher, synthetic heads (tests)
    python benchmarks/pretrained_teacher.py --cache-only    # the teacher on the held-out heads only

Writes ``benchmarks/results/pretrained_teacher.json`` (``--out`` elsewhere): ``date``, ``machine``,
``command``, ``teacher`` {name, params, latency_s, dice_vs_reference}, ``students`` [{method,
params, latency_s, dice_vs_teacher_mean, dice_vs_teacher_sd, dice_vs_reference, train_time_s}],
plus ``steps`` (measured seconds of each step).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # as a script and when imported by the tests
import _measure  # noqa: E402
from _measure import BenchmarkError  # noqa: E402

from ReCoKDLib.data.io import Geometry, write_image  # noqa: E402
from ReCoKDLib.demo_heads import HeadsDemoConfig  # noqa: E402

METHODS = {  # name -> KD spec (all methods also train Dice + CE on the teacher's argmax)
    "recokd": {"recokd": {"weight": 1.0}},
    "logit": {"logit": {"weight": 1.0, "temperature": 2.0}},
    "hard": {"logit": {"weight": 1.0, "temperature": 2.0}},  # at lambda 0: no KD term
}
KD_LAMBDA = {"recokd": 0.01, "logit": 1.0, "hard": 0.0}  # ReCo-KD's lambda; logit KD at weight 1


@dataclass
class Config:
    steps: int = 400
    patch: int = 64
    batch: int = 2
    lr: float = 2e-3
    threads: int = 2
    device: str = "cpu"
    student_filters: tuple[int, ...] = HeadsDemoConfig.student_filters
    student_stem_stride: int = HeadsDemoConfig.student_stem_stride
    seed: int = 0


CPU = Config()
GPU = Config(steps=3000, patch=96, batch=4, device="cuda", threads=8)
SMOKE = Config(steps=3, patch=32, batch=1, threads=1, student_filters=(4, 8, 8, 8))


def demo_config(config: Config, method: str, teacher: str, dataset: str, trust: Sequence[str] = ()) -> HeadsDemoConfig:
    """The demo's configuration of one method (the demo itself is ``recokd``)."""
    return HeadsDemoConfig(teacher=teacher, dataset=dataset, student_filters=tuple(config.student_filters),
                           student_stem_stride=config.student_stem_stride,
                           steps=config.steps, patch_size=(config.patch,) * 3, batch_size=config.batch, lr=config.lr,
                           kd=METHODS[method], kd_weight=KD_LAMBDA[method], seed=config.seed,
                           bf16=config.device == "cpu", latency_repeats=3, trust_entry_points=tuple(trust))


# ---------------------------------------------------------------------------------------------
# Smoke: a stand-in third-party teacher and synthetic heads (no HD-BET, no downloads)


class SmokeNet(nn.Module):
    """A tiny stand-in "third-party" network with taps at strides 2, 4, 8, 16."""

    def __init__(self, width: int = 4, num_classes: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv3d(1, width, 3, padding=1)
        self.l1 = nn.Conv3d(width, width, 3, stride=2, padding=1)
        self.l2 = nn.Conv3d(width, width, 3, stride=2, padding=1)
        self.l3 = nn.Conv3d(width, width, 3, stride=2, padding=1)
        self.l4 = nn.Conv3d(width, width, 3, stride=2, padding=1)
        self.head = nn.Conv3d(width, num_classes, 1)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        d = torch.relu(self.l4(torch.relu(self.l3(torch.relu(self.l2(torch.relu(self.l1(s))))))))
        return self.head(s + F.interpolate(d, size=s.shape[2:], mode="nearest"))


def _smoke_setup(work: Path) -> tuple[Path, Path]:
    """A preset JSON for :class:`SmokeNet` and a Dataset904-like folder of 3 synthetic heads."""
    torch.manual_seed(0)
    net = SmokeNet()
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.weight[1, :, 0, 0, 0] = 1.0  # "brain" where the stem responds: bright voxels
        net.head.bias.copy_(torch.tensor([0.5, 0.0]))
    work.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), work / "smoke_weights.pt")
    preset = {
        "format": "recokd-teacher-preset", "name": "smoke", "entry_point": "pretrained_teacher:SmokeNet",
        "kwargs": {"width": 4}, "weights": "smoke_weights.pt", "classes": ["background", "brain"],
        "spacing": [3.0, 3.0, 3.0], "normalization": {"scheme": "zscore", "nonzero": False},
        "patch_size": [32, 32, 32], "pad_multiple": 16, "output": "logits",
        "taps": [{"module": m, "stride": [s] * 3, "channels": 4} for m, s in (("l1", 2), ("l2", 4), ("l3", 8), ("l4", 16))],
    }
    (work / "smoke_preset.json").write_text(json.dumps(preset))
    data = work / "Dataset904_T1Heads"
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, 24)] * 3, indexing="ij")
    for i, case in enumerate(["train_a", "train_b", "colin27"]):
        r = np.sqrt(zz**2 + yy**2 + xx**2) * (1.0 + 0.1 * i)
        head = np.where(r < 0.9, 300.0, 0.0) + np.where(r < 0.6, 500.0, 0.0) + rng.normal(0, 10, r.shape)
        write_image(head.astype(np.float32), Geometry(spacing=(3.0, 3.0, 3.0)), data / "imagesTs" / f"{case}_0000.nii.gz")
        if case == "colin27":
            write_image((r < 0.6).astype(np.uint8), Geometry(spacing=(3.0, 3.0, 3.0)), data / "labelsTs" / "colin27.nii.gz")
    (data / "imagesTr").mkdir(exist_ok=True)  # empty, as in the fetched dataset
    (data / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "brain": 1}, "numTraining": 0,
        "file_ending": ".nii.gz", "label_free_split": {"train": ["train_a", "train_b"], "test": ["colin27"]}}))
    return work / "smoke_preset.json", data


# ---------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ReCoKDLib.demo_heads import distil_student, evaluate_cached, load_heads, prepare_heads, score_student
    from ReCoKDLib.networks import count_parameters
    from ReCoKDLib.progress import Reporter
    from ReCoKDLib.teachers import load_model

    config = SMOKE if args.smoke else (GPU if args.gpu else CPU)
    if args.steps is not None:
        config = replace(config, steps=args.steps)
    if args.threads is not None:
        config = replace(config, threads=args.threads)
    torch.set_num_threads(config.threads)
    out = Path(args.out)
    say = (lambda msg: print(msg, flush=True)) if not args.quiet else (lambda msg: None)
    reporter = Reporter() if not args.quiet else Reporter(lambda event: None)
    timings: dict[str, Any] = {}
    if args.smoke:
        preset, data = _smoke_setup(out / "smoke")
        source, data_dir, trust = str(preset), data.parent, ["pretrained_teacher:SmokeNet"]
    else:
        from ReCoKDLib.data.fetch import default_data_dir

        data = Path(args.data) if args.data else default_data_dir() / "Dataset904_T1Heads"
        source, data_dir, trust = args.teacher, data.parent, []
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "teacher_cache"
    # the smoke preset file names this benchmark's stand-in network: trusted by name, as a user would
    base = demo_config(config, args.methods[0] if args.methods else "recokd", source, data.name, trust)
    t0 = time.perf_counter()
    heads_data = prepare_heads(base, data_dir, out / "preprocessed", reporter)
    teacher = heads_data.teacher
    timings["load_and_preprocess_s"] = time.perf_counter() - t0
    heads = load_heads(heads_data.raw, heads_data.test_cases)
    t0 = time.perf_counter()
    t_eval = evaluate_cached("teacher", teacher, teacher.sha256, heads, out / "evaluation", 1, reporter)
    timings["teacher_held_out_s"] = time.perf_counter() - t0
    result: dict[str, Any] = {
        **_measure.provenance(config.threads),
        "config": {**config.__dict__, "student_filters": list(config.student_filters), "kd_lambda": KD_LAMBDA,
                   "methods": METHODS, "train_heads": [c.case_id for c in heads_data.train_cases],
                   "test_heads": [h.case_id for h in heads], "teacher_source": source,
                   "engine": "ReCoKDLib.engine.distill, teacher_outputs=cache (ReCoKDLib.demo_heads)",
                   "evaluation": "recokd segment's path (demo_heads.segment_head)"},
        "teacher": {"name": teacher.card.architecture.get("preset", source), "params": count_parameters(teacher.network),
                    "dice_vs_reference": t_eval["dice_vs_reference"], "latency_s": t_eval["latency_s"]},
        "students": [], "steps": timings,
    }
    if args.cache_only:
        return result
    for method in args.methods:
        method_config = demo_config(config, method, source, data.name, trust)
        t0 = time.perf_counter()
        path, _ = distil_student(method_config, heads_data, out / "students" / method, cache_dir, config.device,
                                 reporter)
        seconds = time.perf_counter() - t0
        history = json.loads((path.parent / "history.json").read_text()) if (path.parent / "history.json").is_file() else {}
        student = load_model(path, "cpu")
        s_eval = evaluate_cached(method, student, _sha(path), heads, out / "evaluation",
                                 method_config.latency_repeats, reporter)
        scores = score_student(s_eval, t_eval)
        result["students"].append({"method": method, "params": count_parameters(student.network),
                                   "train_time_s": seconds, "latency_s": s_eval["latency_s"],
                                   "dice_vs_teacher_mean": scores["dice_vs_teacher_mean"],
                                   "dice_vs_teacher_sd": scores["dice_vs_teacher_sd"],
                                   "dice_vs_teacher_raw_mean": scores["dice_vs_teacher_raw_mean"],
                                   "dice_vs_reference": s_eval["dice_vs_reference"],
                                   "dice_vs_teacher": scores["dice_vs_teacher"], "model": str(path),
                                   "train_steps_logged": len(history.get("train", []))})
        say(f"{method}: Dice vs teacher {scores['dice_vs_teacher_mean']:.3f}, vs reference "
            f"{s_eval['dice_vs_reference']}, {seconds:.0f} s")
    return result


def _sha(path: Path) -> str:
    from ReCoKDLib.checkpoint import sha256_file

    return sha256_file(path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="preset:hd-bet", help="teacher source (default preset:hd-bet)")
    parser.add_argument("--data", help="Dataset904_T1Heads folder (default: the data folder of `recokd data fetch`)")
    parser.add_argument("--out", default=None,
                        help="work folder: teacher cache, students (default runs/bench-pretrained/, not versioned)")
    parser.add_argument("--cache-dir", help="teacher output cache (default OUT/teacher_cache)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, help="override the configuration's steps per student")
    parser.add_argument("--threads", type=int, help="override the configuration's CPU threads")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="longer schedule and bigger patches on CUDA")
    mode.add_argument("--smoke", action="store_true", help="stand-in teacher and synthetic heads, seconds (tests)")
    parser.add_argument("--cache-only", action="store_true", help="stop after the teacher's held-out heads (measure it)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.out is None:
        root = _measure.RESULTS_DIR.parents[1] / "runs"
        args.out = str(root / ("bench-pretrained-smoke" if args.smoke else "bench-pretrained"))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (BenchmarkError, ValueError) as exc:
        print(f"pretrained_teacher: error: {exc}", file=sys.stderr)
        return 1
    target = Path(args.out) / "pretrained_teacher.json" if (args.smoke or args.cache_only) else \
        _measure.RESULTS_DIR / "pretrained_teacher.json"
    _measure.write_json(target, result)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
