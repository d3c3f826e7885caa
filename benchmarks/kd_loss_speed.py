"""Speed and peak memory of one ReCo-KD level: the code release's formulation vs ReCoKDLib's.

The release (``ClinicaAlpha/DPRD-3D-MedSeg``, ``methods/reco.py``) is re-implemented here from its
description in kd-methods.md §2.4–2.5 (own code, same formulation): the 1x1x1 ``align`` conv inside
the loss, attention from full ``|F|`` tensors, per-class mask loop, square roots of the weights
multiplied into both features then squared (``chunk_d = 16``), FGD-style GcBlock pooling by
``matmul`` and ``F.mse_loss``.

Each variant runs in two fresh subprocesses: one for memory (``MALLOC_MMAP_THRESHOLD_=65536`` so
freed memory goes back to the OS and RSS follows the live tensors), one for time (default
allocator): inputs are the raw student features ``(B, 8, D, H, W)`` (requiring grad, standing
for the student network's output) and the teacher's ``(B, 32, D, H, W)``; the measured step is
adapter + loss forward and backward. *Extra peak memory* = peak RSS during one step (``VmHWM``
after resetting it through ``/proc/self/clear_refs``) minus the RSS just before it (inputs,
parameters and the framework already resident, after a warm-up step whose gradients are dropped), divided by the bytes of the two input feature
tensors, as in the issue. Time = median of ``--reps`` steps after one warm-up step, in the second subprocess.

Variants:
  release       the naive formulation above;
  recokd        ReCoKDLib as training runs it: the batch is built by the code ``DistillationPair``
                uses (:func:`ReCoKDLib.taps.kd_batch_from_features`: lazy adapted features, raw
                features and adapters), and the loss folds the 1x1x1 adapter into its chunked
                passes, so the adapted tensor is never built;
  recokd_eager  the same loss, but with the adapted features materialised up front (what
                ``DistillationPair`` did before its features became lazy: one teacher-sized
                tensor that stays alive, counted as extra here);
  recokd_nofold the loss reading materialised adapted features (no folding): autograd then
                also builds their teacher-sized gradient.

Timing on a shared machine: with the default OpenMP wait policy, intra-op threads spin between
parallel regions; when other processes occupy the cores, every one of the loss's small slab
operations then waits for a descheduled thread, and a step can take 10-30x longer (the chunked
variants issue thousands of slab-sized operations, the release a few hundred large ones). Each
result records the 1-minute load average around its timed steps; run on a quiet machine, or set
``OMP_WAIT_POLICY=PASSIVE`` (inherited by the workers) when it cannot be quiet.

Usage:
    python benchmarks/kd_loss_speed.py            # the issue's shapes: B=2, 8/32 ch, 64x128x128
    python benchmarks/kd_loss_speed.py --small    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import reset_peak, rss_kib  # noqa: E402  (benchmarks/_measure.py: /proc peak-memory helpers)

RESULTS = Path(__file__).resolve().parent / "results" / "kd_loss_speed.json"
VARIANTS = ("release", "recokd", "recokd_eager", "recokd_nofold")


def release_style_loss(s_raw, teacher, align, gc_s, gc_t, labels, num_classes, temp=0.5, chunk_d=16):
    """One level of the release's ReCo loss, written the release's way (naive tensors)."""
    s = align(s_raw)
    b, c, d, h, w = teacher.shape

    def attention(f):
        value = f.abs()
        spatial = value.mean(dim=1, keepdim=True)
        sa = (d * h * w * F.softmax((spatial / temp).view(b, -1), dim=1)).view(b, d, h, w)
        channel = value.mean(dim=(2, 3, 4))
        ca = c * F.softmax(channel / temp, dim=1)
        return sa, ca

    s_t, c_t = attention(teacher)
    s_s, c_s = attention(s)
    y = labels[:, 0]
    fg = torch.zeros(y.shape, dtype=torch.float32)
    for cls in range(1, num_classes):
        m = (y == cls).float()
        fg = fg + m / m.sum(dim=(1, 2, 3), keepdim=True).clamp(min=1e-8)
    bg_ind = (fg == 0).float()
    bg = bg_ind / bg_ind.sum(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
    loss_fg = loss_bg = 0.0
    for d0 in range(0, d, chunk_d):
        sl = slice(d0, d0 + chunk_d)
        st = torch.sqrt(s_t[:, None, sl])
        ct = torch.sqrt(c_t)[:, :, None, None, None]
        fea_t = teacher[:, :, sl] * st * ct
        fea_s = s[:, :, sl] * st * ct
        sfg = torch.sqrt(fg[:, None, sl])
        sbg = torch.sqrt(bg[:, None, sl])
        loss_fg = loss_fg + ((fea_s * sfg - fea_t * sfg) ** 2).sum()
        loss_bg = loss_bg + ((fea_s * sbg - fea_t * sbg) ** 2).sum()
    loss_fg = loss_fg / (c * fg.sum()).clamp(min=1e-12)
    loss_bg = loss_bg / (c * bg.sum()).clamp(min=1e-12)
    loss_att = (c_s - c_t).abs().mean() + (s_s - s_t).abs().mean()

    def global_context(x, block):
        bb, cc = x.shape[:2]
        input_x = x.view(bb, cc, -1).unsqueeze(1)
        mask = F.softmax(block.conv_mask(x).view(bb, 1, -1), dim=2).unsqueeze(-1)
        context = torch.matmul(input_x, mask).view(bb, cc, 1, 1, 1)
        return x + block.channel_add(context)

    loss_rel = F.mse_loss(global_context(s, gc_s), global_context(teacher, gc_t))
    return loss_fg + loss_bg + loss_att + loss_rel


def make_inputs(shape, seed=0):
    """Raw student ``(B, 8, ...)`` (requires grad), teacher ``(B, 32, ...)``, labels, modules."""
    from ReCoKDLib.losses.recokd import ReCoKDLoss
    from ReCoKDLib.taps import FeatureAdapter

    b, cs, ct, d, h, w = shape
    g = torch.Generator().manual_seed(seed)
    student = torch.randn((b, cs, d, h, w), generator=g).requires_grad_(True)
    teacher = torch.randn((b, ct, d, h, w), generator=g)
    coarse = torch.randint(0, 3, (b, 1, max(1, d // 8), max(1, h // 8), max(1, w // 8)), generator=g)
    labels = F.interpolate(coarse.float(), size=(d, h, w), mode="nearest").long()
    torch.manual_seed(seed)
    adapter = FeatureAdapter(cs, ct)
    loss = ReCoKDLoss(teacher_channels=[ct], num_classes=3, stage_weights=[1.0])
    with torch.no_grad():  # a trained context branch, so that MS-CA's values are compared too
        for block in (*loss.student_context, *loss.teacher_context):
            block.channel_add[-1].weight.normal_(0.0, 0.1)
            block.channel_add[-1].bias.normal_(0.0, 0.1)
    return student, teacher, labels, adapter, loss


def step(variant, student, teacher, labels, adapter, loss):
    """One forward + backward; returns the loss value."""
    from ReCoKDLib.losses.base import KDBatch
    from ReCoKDLib.taps import kd_batch_from_features

    student.grad = None
    for p in (*adapter.parameters(), *loss.parameters()):
        p.grad = None
    if variant == "release":
        value = release_style_loss(
            student, teacher, adapter.proj, loss.student_context[0], loss.teacher_context[0], labels, 3
        )
    elif variant == "recokd":
        batch = kd_batch_from_features([adapter], [teacher], [student], labels=labels, num_classes=3)
        value = loss(batch).loss
        if batch.student_features.materialised_levels:
            raise RuntimeError("the folded ReCo-KD loss built the adapted features it should never read")
    else:
        fold = variant == "recokd_eager"
        adapted = adapter(student, teacher.shape[2:])
        batch = KDBatch(
            teacher_features=[teacher],
            student_features=[adapted],
            labels=labels,
            num_classes=3,
            raw_student_features=[student] if fold else None,
            student_adapters=[adapter] if fold else None,
        )
        value = loss(batch).loss
    value.backward()
    return float(value.detach())


def run_variant(variant, shape, reps, threads, out_file):
    torch.set_num_threads(threads)
    student, teacher, labels, adapter, loss = make_inputs(shape)
    feature_bytes = (student.numel() + teacher.numel()) * 4
    step(variant, student, teacher, labels, adapter, loss)  # warm-up: lazy initialisation
    student.grad = None
    for p in (*adapter.parameters(), *loss.parameters()):
        p.grad = None
    before = rss_kib("VmRSS")
    can_reset = reset_peak()
    t0 = time.perf_counter()
    value = step(variant, student, teacher, labels, adapter, loss)
    first = time.perf_counter() - t0
    peak = rss_kib("VmHWM")
    grad = student.grad.detach().clone()
    grad_w = adapter.proj.weight.grad.detach().clone()
    times = [first]
    load_before = os.getloadavg()[0]
    for _ in range(reps - 1):
        t0 = time.perf_counter()
        step(variant, student, teacher, labels, adapter, loss)
        times.append(time.perf_counter() - t0)
    extra = (peak - before) * 1024
    torch.save({"grad": grad, "grad_w": grad_w}, out_file + ".pt")
    Path(out_file).write_text(
        json.dumps(
            {
                "variant": variant,
                "loss": value,
                "seconds_median": statistics.median(times),
                "seconds": times,
                "feature_bytes": feature_bytes,
                "extra_peak_bytes": extra,
                "extra_peak_ratio": extra / feature_bytes,
                "peak_reset": can_reset,
                # 1-minute load average around the timed steps: > threads means other work competed
                "loadavg_1min": [load_before, os.getloadavg()[0]],
            }
        )
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="smoke test: B=1, 16x32x32")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per variant (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = (1, 8, 32, 16, 32, 32) if args.small else (2, 8, 32, 64, 128, 128)
    if args.variant:
        run_variant(args.variant, shape, args.reps, args.threads, args.worker_out)
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            out = os.path.join(tmp, variant + ".json")
            cmd = [sys.executable, __file__, "--variant", variant, "--worker-out", out, "--threads", str(args.threads)]
            cmd += ["--small"] if args.small else []
            # memory: every allocation >= 64 KiB is its own mapping, returned to the OS when freed
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
            subprocess.run(cmd + ["--reps", "1"], check=True, env=env)
            memory = json.loads(Path(out).read_text())
            # time: the default allocator, as a training process runs
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            env.pop("MALLOC_MMAP_THRESHOLD_", None)
            subprocess.run(cmd + ["--reps", str(args.reps)], check=True, env=env)
            timing = json.loads(Path(out).read_text())
            for key in ("feature_bytes", "extra_peak_bytes", "extra_peak_ratio", "peak_reset"):
                timing[key] = memory[key]
            results[variant] = timing
            results[variant]["_grads"] = torch.load(out + ".pt", weights_only=True)
            print(f"{variant:14s} loss {timing['loss']:.6f}  {timing['seconds_median']:.3f} s  "
                  f"extra peak {timing['extra_peak_ratio']:.2f}x features", flush=True)
    grads = {variant: res.pop("_grads") for variant, res in results.items()}
    ref = results["release"]
    summary = {
        "shape": dict(zip(("B", "C_student", "C_teacher", "D", "H", "W"), shape)),
        "threads": args.threads,
        "reps": args.reps,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "variants": {},
    }
    for variant, res in results.items():
        entry = dict(res)
        entry["speedup_vs_release"] = ref["seconds_median"] / res["seconds_median"]
        entry["loss_rel_diff_vs_release"] = abs(res["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12)
        for name in ("grad", "grad_w"):
            a, b = grads["release"][name], grads[variant][name]
            entry[f"{name}_max_rel_diff_vs_release"] = float((a - b).abs().max() / a.abs().max().clamp(min=1e-30))
        summary["variants"][variant] = entry
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
