"""Distil a real pretrained teacher nobody here trained (HD-BET fold 0) into a ~1/10 student, label-free.

The teacher comes through the generic preset path (``teachers.load_model("preset:hd-bet")``); the
data are the real, unlabelled T1 heads of ``Dataset904_T1Heads`` (``recokd data fetch --only
heads``): the student learns on the ``train`` heads of its ``label_free_split`` and is scored on the
held-out ones (Colin27 also against its ``ch2bet`` brain mask).

Steps (each cached, so an interrupted run resumes where it stopped):

1. **preprocess** every head like the teacher's card says (1.5 mm, z-score over the volume),
   padded to a multiple of 16;
2. **teacher cache**: one forward pass of the teacher per head (whole volume), its logits and the
   features at its preset taps stored as float16 ``.npz`` under ``--cache-dir`` (HD-BET: ~22 s
   per 128^3 volume on 2 threads; every later step reads the cache);
3. **students**: a DynUNet (``--student-filters``, strides 2 at every stage so its levels meet the
   teacher's taps at strides 2, 4, 8, 16 through 1x1x1 adapters) trained from the cache on
   stride-aligned patches with three methods, all on the teacher's hard labels (argmax) as the
   segmentation target: ``recokd`` (+ ReCo-KD on the taps, masks from the teacher's argmax),
   ``logit`` (+ logit KD, T = 2) and ``hard`` (no KD term);
4. **evaluate** on the held-out heads: Dice of the student's brain mask vs the teacher's (on the
   teacher's grid) and, for Colin27, vs ``ch2bet > 0`` on the original grid; parameters; CPU
   latency of teacher and student on the whole volume.

Usage::

    python benchmarks/pretrained_teacher.py                 # CPU budget (~45 min on 2 cores)
    python benchmarks/pretrained_teacher.py --gpu           # longer schedule, bigger patches, CUDA
    python benchmarks/pretrained_teacher.py --smoke --out /tmp/s   # stand-in teacher, synthetic heads (tests)
    python benchmarks/pretrained_teacher.py --cache-only    # step 2 only (measure the teacher)

Writes ``benchmarks/results/pretrained_teacher.json`` (``--out`` elsewhere): ``date``, ``machine``,
``command``, ``teacher`` {name, params, latency_s, dice_vs_reference}, ``students`` [{method,
params, latency_s, dice_vs_teacher_mean, dice_vs_teacher_sd, dice_vs_reference, train_time_s}],
plus ``steps`` (measured seconds of each step).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # as a script and when imported by the tests
import _measure  # noqa: E402
from _measure import BenchmarkError  # noqa: E402

from ReCoKDLib.checkpoint import ModelCard, atomic_output, save_model  # noqa: E402
from ReCoKDLib.data.io import Geometry, read_image, write_image  # noqa: E402
from ReCoKDLib.data.preprocess import preprocess_case, restore_to_original  # noqa: E402
from ReCoKDLib.networks import UNetConfig, build_unet, count_parameters, split_deep_supervision  # noqa: E402

METHODS = {  # name -> KD spec (all methods also train Dice + CE on the teacher's argmax)
    "recokd": {"recokd": {"weight": 1.0}},
    "logit": {"logit": {"weight": 1.0, "temperature": 2.0}},
    "hard": {},
}
KD_LAMBDA = {"recokd": 0.01, "logit": 1.0, "hard": 0.0}  # ReCo-KD's lambda; logit KD at weight 1
CACHE_VERSION = 1


@dataclass
class Config:
    steps: int = 300
    patch: int = 64
    batch: int = 2
    lr: float = 2e-3
    threads: int = 2
    device: str = "cpu"
    student_filters: tuple[int, ...] = (8, 16, 32, 64, 128)
    seed: int = 0


CPU = Config()
GPU = Config(steps=3000, patch=96, batch=4, device="cuda", threads=8)
SMOKE = Config(steps=3, patch=32, batch=1, threads=1, student_filters=(4, 8, 8, 8, 8))


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
    (data / "dataset.json").write_text(json.dumps({"label_free_split": {"train": ["train_a", "train_b"],
                                                                         "test": ["colin27"]}}))
    return work / "smoke_preset.json", data


# ---------------------------------------------------------------------------------------------
# Data and the teacher cache


@dataclass
class Head:
    case_id: str
    image: np.ndarray            # (1, D, H, W) preprocessed, padded to the multiple
    shape: tuple[int, int, int]  # preprocessed size before padding
    pre: Any                     # PreprocessedCase (to restore to the original grid)
    reference: np.ndarray | None  # (D, H, W) reference mask on the original grid
    source_sha: str


def _pad_to(array: np.ndarray, multiple: int) -> np.ndarray:
    size = array.shape[1:]
    target = [math.ceil(s / multiple) * multiple for s in size]
    pad = [(0, 0)] + [(0, t - s) for s, t in zip(size, target)]
    return np.pad(array, pad, mode="constant", constant_values=float(array.min()))


def load_heads(data: Path, card: ModelCard, multiple: int) -> tuple[list[Head], list[Head]]:
    """The train and held-out heads of ``label_free_split``, preprocessed on the teacher's card."""
    from ReCoKDLib.checkpoint import sha256_file

    meta = json.loads((data / "dataset.json").read_text())
    split = meta.get("label_free_split")
    if not split:
        raise BenchmarkError(f"{data}/dataset.json has no label_free_split; run `recokd data fetch --only heads`")
    out = {}
    for case in [*split["train"], *split["test"]]:
        path = data / "imagesTs" / f"{case}_0000.nii.gz"
        if not path.is_file():
            raise BenchmarkError(f"{path} is missing; run `recokd data fetch --only heads`")
        image, geometry = read_image(path, allow_channels=False)
        pre = preprocess_case(image, geometry, card.spacing, card.normalization)
        ref_path = data / "labelsTs" / f"{case}.nii.gz"
        reference = read_image(ref_path, allow_channels=False)[0] > 0 if ref_path.is_file() else None
        out[case] = Head(case, _pad_to(pre.image, multiple), pre.shape, pre, reference, sha256_file(path))
    return [out[c] for c in split["train"]], [out[c] for c in split["test"]]


@torch.no_grad()
def teacher_outputs(teacher, head: Head, cache_dir: Path, device: torch.device) -> dict[str, Any]:
    """Logits ``(K, D, H, W)`` and tap features ``[(C_l, D/s, H/s, W/s)]`` of the whole head, cached (float16)."""
    from ReCoKDLib.taps import FeatureTaps

    key = hashlib.sha256(json.dumps([CACHE_VERSION, head.source_sha, teacher.card.to_dict()["provenance"],
                                     teacher.card.tap_names, list(head.image.shape)], sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    path = cache_dir / f"{head.case_id}-{key}.npz"
    if path.is_file():
        with np.load(path) as npz:
            return {"logits": npz["logits"], "features": [npz[f"f{i}"] for i in range(len(teacher.card.tap_names))],
                    "seconds": float(npz["seconds"]), "cached": True}
    network = teacher.network.to(device).eval()
    x = torch.from_numpy(head.image[None]).to(device)
    with FeatureTaps(network, teacher.card.tap_names) as taps:
        t0 = time.perf_counter()
        logits = network(x)
        features = taps.collect()
        seconds = time.perf_counter() - t0
    result = {"logits": logits[0].half().cpu().numpy(), "features": [f[0].half().cpu().numpy() for f in features]}
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, suffix=".npz") as tmp:
        np.savez(tmp, logits=result["logits"], seconds=seconds, **{f"f{i}": f for i, f in enumerate(result["features"])})
    return {**result, "seconds": seconds, "cached": False}


# ---------------------------------------------------------------------------------------------
# Training from the cache


class CachedPatches:
    """Stride-aligned patches of the heads and of the teacher's cached logits and features."""

    def __init__(self, heads: Sequence[Head], outputs: Sequence[dict], strides: Sequence[int], patch: int, seed: int):
        self.heads, self.outputs, self.strides, self.patch = list(heads), list(outputs), list(strides), patch
        self.align = max(strides)
        if patch % self.align:
            raise BenchmarkError(f"--patch {patch} must be a multiple of the teacher's largest stride {self.align}")
        self.rng = np.random.default_rng(seed)

    def _start(self, size: Sequence[int]) -> list[int]:
        return [int(self.rng.integers(0, max(s - self.patch, 0) // self.align + 1)) * self.align for s in size]

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``(B, 1, P, P, P)`` images, ``(B, K, P, P, P)`` teacher logits, per tap ``(B, C_l, P/s, ...)``."""
        images, logits, feats = [], [], [[] for _ in self.strides]
        for _ in range(n):
            i = int(self.rng.integers(len(self.heads)))
            head, out = self.heads[i], self.outputs[i]
            start = self._start(head.image.shape[1:])
            images.append(_crop(head.image, start, self.patch))
            logits.append(_crop(out["logits"], start, self.patch))
            for level, (f, s) in enumerate(zip(out["features"], self.strides)):
                feats[level].append(_crop(f, [a // s for a in start], self.patch // s))
        stack = lambda arrays: torch.from_numpy(np.stack(arrays).astype(np.float32))  # noqa: E731
        return stack(images), stack(logits), [stack(f) for f in feats]


def _crop(array: np.ndarray, start: Sequence[int], size: int) -> np.ndarray:
    """``(C, D, H, W)`` crop of ``size`` per axis at ``start``, edge-padded past the end."""
    crop = array[(slice(None), *(slice(a, a + size) for a in start))]
    pad = [(0, 0)] + [(0, size - c) for c in crop.shape[1:]]
    return np.pad(crop, pad, mode="edge") if any(p[1] for p in pad) else crop


def student_config(filters: Sequence[int]) -> UNetConfig:
    return UNetConfig(filters=tuple(filters), strides=((1, 1, 1),) + ((2, 2, 2),) * (len(filters) - 1),
                      num_classes=2, deep_supervision=False)


def train_student(method: str, patches: CachedPatches, teacher_channels: list[int], taps: list[str],
                  config: Config, device: torch.device, reporter=None) -> tuple[nn.Module, float]:
    """One student from the cache: Dice + CE on the teacher's argmax + ``KD_LAMBDA[method]`` x KD."""
    from ReCoKDLib.engine import build_seg_loss, kd_lambda, poly_lr
    from ReCoKDLib.losses.registry import build_combined_kd_loss
    from ReCoKDLib.taps import FeatureAdapter, FeatureTaps, kd_batch_from_features, probe_feature_shapes

    torch.manual_seed(config.seed)
    patches.rng = np.random.default_rng(config.seed)  # every method sees the same patches
    student = build_unet(student_config(config.student_filters)).to(device)
    s_channels = [int(s[1]) for s in probe_feature_shapes(student, taps, (1, config.patch, config.patch, config.patch))]
    adapters = nn.ModuleList(FeatureAdapter(cs, ct) for cs, ct in zip(s_channels, teacher_channels)).to(device)
    kd = build_combined_kd_loss(METHODS[method], teacher_channels=teacher_channels, student_channels=s_channels,
                                num_classes=2).to(device) if METHODS[method] else None
    params = list(student.parameters()) + (list(adapters.parameters()) + list(kd.parameters()) if kd else [])
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    seg_loss = build_seg_loss(1)
    warmup = int(0.6 * config.steps) if method == "recokd" else 0
    student.train()
    t0 = time.perf_counter()
    with FeatureTaps(student, taps) as s_taps:
        for step in range(config.steps):
            for group in optimizer.param_groups:
                group["lr"] = poly_lr(config.lr, step, config.steps)
            images, t_logits, t_feats = patches.batch(config.batch)
            images, t_logits = images.to(device), t_logits.to(device)
            t_feats = [f.to(device) for f in t_feats]
            labels = t_logits.argmax(1, keepdim=True)  # the teacher's hard labels
            out = student(images)
            s_feats = s_taps.collect()
            loss = seg_loss(split_deep_supervision(out), labels)
            if kd is not None:
                batch = kd_batch_from_features(adapters, t_feats, s_feats, t_logits, split_deep_supervision(out)[0],
                                               labels=labels, num_classes=2)
                loss = loss + kd_lambda(step, KD_LAMBDA[method], warmup) * kd(batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 12.0)
            optimizer.step()
            if reporter is not None and (step + 1) % max(1, config.steps // 20) == 0:
                reporter(f"{method}: step {step + 1}/{config.steps} loss {float(loss.detach()):.4f}")
    return student.eval(), time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Evaluation


def dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int((a & b).sum()) / denom


@torch.no_grad()
def whole_volume(network: nn.Module, head: Head, device: torch.device) -> tuple[np.ndarray, float]:
    """``(K, D, H, W)`` softmax of one forward pass on the padded head (cropped back) and its seconds."""
    x = torch.from_numpy(head.image[None]).to(device)
    t0 = time.perf_counter()
    logits = network(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    logits = split_deep_supervision(logits)[0][0] if logits.dim() == 6 else logits[0]
    d, h, w = head.shape
    return torch.softmax(logits.float(), 0)[:, :d, :h, :w].cpu().numpy(), seconds


def reference_dice(probs: np.ndarray, head: Head) -> float | None:
    if head.reference is None:
        return None
    restored = restore_to_original(probs, head.pre)
    return dice(restored.argmax(0) == 1, head.reference)


def evaluate(network: nn.Module, heads: Sequence[Head], teacher_masks: dict[str, np.ndarray], device) -> dict[str, Any]:
    network.eval()
    scores, refs, latencies = [], {}, []
    for head in heads:
        probs, seconds = whole_volume(network, head, device)
        latencies.append(seconds)
        scores.append(dice(probs.argmax(0) == 1, teacher_masks[head.case_id]))
        ref = reference_dice(probs, head)
        if ref is not None:
            refs[head.case_id] = ref
    return {"dice_vs_teacher": dict(zip([h.case_id for h in heads], scores)),
            "dice_vs_teacher_mean": float(np.mean(scores)), "dice_vs_teacher_sd": float(np.std(scores)),
            "dice_vs_reference": refs, "latency_s": float(np.median(latencies))}


# ---------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ReCoKDLib.teachers import load_model

    config = SMOKE if args.smoke else (GPU if args.gpu else CPU)
    if args.steps is not None:
        config = Config(**{**config.__dict__, "steps": args.steps})
    if args.threads is not None:
        config = Config(**{**config.__dict__, "threads": args.threads})
    torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    out = Path(args.out)
    say = (lambda msg: print(msg, flush=True)) if not args.quiet else None
    timings: dict[str, float] = {}
    if args.smoke:
        preset, data = _smoke_setup(out / "smoke")
        source = str(preset)
    else:
        from ReCoKDLib.data.fetch import default_data_dir

        data = Path(args.data) if args.data else default_data_dir() / "Dataset904_T1Heads"
        source = args.teacher
    t0 = time.perf_counter()
    # the smoke preset file names this benchmark's stand-in network: trusted by name, as a user would
    teacher = load_model(source, device, trust_entry_points=["pretrained_teacher:SmokeNet"] if args.smoke else ())
    timings["load_teacher_s"] = time.perf_counter() - t0
    strides = [int(s[0]) for s in teacher.card.provenance["tap_strides"]]
    multiple = max(max(strides), 16)
    t0 = time.perf_counter()
    train_heads, test_heads = load_heads(data, teacher.card, multiple)
    timings["preprocess_s"] = time.perf_counter() - t0
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "teacher_cache"
    t0 = time.perf_counter()
    cached = {h.case_id: teacher_outputs(teacher, h, cache_dir, device) for h in [*train_heads, *test_heads]}
    timings["teacher_cache_s"] = time.perf_counter() - t0
    timings["teacher_forward_s"] = {k: v["seconds"] for k, v in cached.items()}
    if say:
        say(f"teacher outputs: {', '.join(f'{k} {v:.1f} s' for k, v in timings['teacher_forward_s'].items())}")
    teacher_masks = {h.case_id: cached[h.case_id]["logits"][:, :h.shape[0], :h.shape[1], :h.shape[2]].argmax(0) == 1
                     for h in test_heads}
    teacher_ref = {}
    for h in test_heads:
        logits = torch.from_numpy(cached[h.case_id]["logits"].astype(np.float32))
        d, hh, w = h.shape
        ref = reference_dice(torch.softmax(logits, 0)[:, :d, :hh, :w].numpy(), h)
        if ref is not None:
            teacher_ref[h.case_id] = ref
    result: dict[str, Any] = {
        **_measure.provenance(config.threads),
        "config": {**config.__dict__, "student_filters": list(config.student_filters), "kd_lambda": KD_LAMBDA,
                   "methods": METHODS, "train_heads": [h.case_id for h in train_heads],
                   "test_heads": [h.case_id for h in test_heads], "teacher_source": source},
        "teacher": {"name": teacher.card.architecture.get("preset", source),
                    "params": count_parameters(teacher.network), "dice_vs_reference": teacher_ref},
        "students": [], "steps": timings,
    }
    if args.cache_only:
        return result
    latencies = [whole_volume(teacher.network, h, device)[1] for h in test_heads]
    result["teacher"]["latency_s"] = float(np.median(latencies))
    taps = None
    patches = CachedPatches(train_heads, [cached[h.case_id] for h in train_heads], strides, config.patch, config.seed)
    teacher_channels = [int(f.shape[0]) for f in cached[train_heads[0].case_id]["features"]]
    from ReCoKDLib.teacher_presets import student_taps_for

    taps = student_taps_for(teacher.card.provenance["tap_strides"], student_config(config.student_filters))
    for method in args.methods:
        student, seconds = train_student(method, patches, teacher_channels, taps, config, device, say)
        scores = evaluate(student, test_heads, teacher_masks, device)
        card = ModelCard(architecture={"kind": "dynunet", "config": student_config(config.student_filters).to_dict()},
                         classes=list(teacher.card.classes), spacing=list(teacher.card.spacing),
                         normalization=dict(teacher.card.normalization), patch_size=[config.patch] * 3,
                         role="student", tap_names=taps, kd={"method": method, "methods": METHODS[method]},
                         metrics=scores)
        save_model(out / "students" / f"{method}.pt", student.state_dict(), card)
        result["students"].append({"method": method, "params": count_parameters(student), "train_time_s": seconds,
                                   **{k: scores[k] for k in ("latency_s", "dice_vs_teacher_mean", "dice_vs_teacher_sd",
                                                             "dice_vs_reference", "dice_vs_teacher")}})
        if say:
            say(f"{method}: Dice vs teacher {scores['dice_vs_teacher_mean']:.3f}, vs reference "
                f"{scores['dice_vs_reference']}, {seconds:.0f} s")
    return result


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
    parser.add_argument("--cache-only", action="store_true", help="stop after the teacher cache (measure it)")
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
