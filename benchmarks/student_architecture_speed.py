"""What a CT student's architecture costs per window: the CT teacher and ÷4 students of equal
parameter count side by side, one 16x96x96 window at a time (issue 15).

Why: on a CPU with AVX-512 bf16 the ÷4 instance-norm CT student segments S1 only 2.8x faster than
its teacher (``segment_speed.json``), against a FLOP ratio of 8.2x. Its first stage works at full
resolution with 8 channels: layers bound by memory traffic, which bf16 does not speed up. This
script times, with the same engine, window and threads:

* ``teacher``: the CT teacher's architecture (``--teacher``: a model file or its ``.json`` card;
  default ``runs/demo-ct/teacher/model_last.pt``, which ``recokd demo --task ct`` writes);
* ``div4``: its ÷4 student as ``recokd distill`` derives it (``networks.derive_student_config``);
* ``div4_batch``: the same with batch norm (``--student-norm batch``);
* ``div4_strided_stem``: a ÷4 student without the full-resolution stage (``recokd distill
  --student-stem strided``): the teacher's later stages (widths ÷4), the first of them strided,
  logits upsampled to the input (``UNetConfig.strided_stem``, the HD-BET demo student's design).

Networks are untrained (speed does not depend on the weights). Each is exported to ONNX and run
by ``--engine`` (``openvino`` or ``onnxruntime``, ``--precision``); after a warm-up round, ``--reps``
rounds call each network once in turn (a noisy machine slows them alike); the median is reported
with parameters and FLOPs (``networks.count_flops``).

Usage::

    python benchmarks/student_architecture_speed.py --threads 2
    python benchmarks/student_architecture_speed.py --window 8,32,32 --reps 2 --engine onnxruntime \\
        --precision fp32 --output /tmp/arch.json   # smoke (tests)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402


def teacher_config(path: str | os.PathLike):
    """The teacher's ``UNetConfig`` from a ReCoKD model file or its card; ``preset("ct_demo")``
    with 12 classes when ``path`` is ``"preset"``."""
    from ReCoKDLib.checkpoint import read_model_card
    from ReCoKDLib.networks import UNetConfig, preset

    if str(path) == "preset":
        return preset("ct_demo", num_classes=12)
    card = read_model_card(path)
    if (card.architecture or {}).get("kind") != "dynunet":
        raise _measure.BenchmarkError(f"{path}: not a built-in U-Net ({card.architecture.get('kind')!r})")
    return UNetConfig.from_dict(card.architecture["config"])


def variants(teacher) -> dict[str, Any]:
    """The four architectures of the module docstring, by name."""
    from ReCoKDLib.networks import derive_student_config

    student = derive_student_config(teacher, 4)
    strided = derive_student_config(teacher, 4, stem="strided")  # recokd distill --student-stem strided
    return {"teacher": teacher, "div4": student, "div4_batch": derive_student_config(teacher, 4, norm="batch"),
            "div4_strided_stem": strided}


def build_runner(name: str, config, window: tuple[int, int, int], engine: str, precision: str, threads: int,
                 folder: Path):
    """``(runner, input, record)``: an untrained network of ``config`` exported to ONNX and loaded in
    ``engine``, a random ``(1, C, *window)`` input, and its parameters and FLOPs."""
    import torch

    from ReCoKDLib.models.runtimes import GraphNetwork, export_onnx
    from ReCoKDLib.networks import build_unet, count_flops, count_parameters, plain_convolutions

    torch.manual_seed(0)
    network = build_unet(config).eval()
    x = torch.randn(1, config.in_channels, *window)
    with plain_convolutions(network):
        graph = export_onnx(network, x, folder / f"{name}.onnx", dynamic_axes=True)
    record = {"filters": list(config.filters), "strides": [list(s) for s in config.strides], "norm": config.norm,
              "strided_stem": config.strided_stem, "params": count_parameters(network),
              "gflops": count_flops(network, window, config.in_channels) / 1e9}
    return GraphNetwork(graph, engine, precision, threads=threads), x, record


def time_round_robin(runners: dict[str, tuple[Any, Any]], reps: int) -> dict[str, list[float]]:
    """Seconds per call of every runner, taken in turn (one call of each per round, after one
    warm-up round), so that a noisy machine slows all of them alike."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.no_grad():
        for runner, x in runners.values():
            runner(x)
        for _ in range(reps):
            for name, (runner, x) in runners.items():
                start = time.perf_counter()
                runner(x)
                times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(_measure.REPO / "runs/demo-ct/teacher/model_last.pt"),
                        help="the CT teacher's model file or card ('preset': the built-in ct_demo preset)")
    parser.add_argument("--window", default="16,96,96", help="D,H,W of the window (the CT training patch)")
    parser.add_argument("--engine", choices=["openvino", "onnxruntime"], default="openvino")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 where the CPU has bf16 kernels (OpenVINO), else fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--output", default=str(_measure.RESULTS_DIR / "student_architecture_speed.json"))
    args = parser.parse_args(argv)
    window = tuple(int(n) for n in args.window.split(","))
    if len(window) != 3 or min(window) < 1 or args.reps < 1 or args.threads < 1:
        raise _measure.BenchmarkError(f"--window needs 3 positive sizes, --reps and --threads >= 1; got {args}")
    from ReCoKDLib.models.backends import cpu_supports_bf16

    precision = args.precision
    if precision == "auto":
        precision = "bf16" if args.engine == "openvino" and cpu_supports_bf16() else "fp32"
    load_before = os.getloadavg()
    started = time.perf_counter()
    results: dict[str, Any] = {}
    runners = {}
    with tempfile.TemporaryDirectory(prefix="recokd-arch-") as tmp:
        for name, config in variants(teacher_config(args.teacher)).items():
            print(f"[student_architecture_speed] {name}: export (load {os.getloadavg()[0]:.2f})", file=sys.stderr,
                  flush=True)
            runner, x, results[name] = build_runner(name, config, window, args.engine, precision, args.threads,
                                                    Path(tmp))
            runners[name] = (runner, x)
        for name, times in time_round_robin(runners, args.reps).items():
            results[name].update(seconds=_measure.median(times), seconds_all=times)
    teacher_seconds = results["teacher"]["seconds"]
    for r in results.values():
        r["teacher_over_this"] = teacher_seconds / r["seconds"]
        r["flop_ratio"] = results["teacher"]["gflops"] / r["gflops"]
    data = {
        "benchmark": "student_architecture_speed",
        **_measure.speed_provenance("benchmarks/student_architecture_speed.py", args.threads, argv, load_before),
        "config": {"teacher": args.teacher, "window": list(window), "engine": args.engine, "precision": precision,
                   "threads": args.threads, "reps": args.reps, "weights": "untrained"},
        "headline": {f"{name}_speedup_per_window": r["teacher_over_this"] for name, r in results.items()
                     if name != "teacher"},
        "results": results,
        "elapsed_seconds": time.perf_counter() - started,
    }
    _measure.write_json(Path(args.output), data)
    for name, r in results.items():
        print(f"{name:18s} {r['params'] / 1e6:5.2f} M  {r['gflops']:5.2f} GFLOP  {r['seconds'] * 1000:6.1f} ms  "
              f"teacher/this {r['teacher_over_this']:.2f}x (FLOPs {r['flop_ratio']:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
