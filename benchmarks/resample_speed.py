"""Resampling a head: SimpleITK's ResampleImageFilter vs the separable per-axis matrices of
``ReCoKDLib.data.preprocess._resample`` (same grids, same result to float32 rounding).

Cases, on a synthetic T1-sized head (``--shape``, default 181x217x181 float32 at 1 mm):

* ``down_bspline``: 1 mm -> 1.5 mm with 3rd-order B-splines (``preprocess_case``'s default for images);
* ``down_linear``: the same grids, linear (``image_order="linear"``);
* ``up_linear_2ch``: 1.5 mm -> 1 mm, linear, two probability channels one after the other (what
  ``restore_to_original`` does with class probabilities).

The grids are the ones ``preprocess_case`` builds (``_resampled_geometry``: same field of view), with
an oblique direction shared by both. Each path runs once to warm up (imports, torch's thread pool),
then ``--reps`` times; the median is reported. SimpleITK and torch both get ``--threads`` threads.
Recorded: date, machine, commit, command (``_measure.provenance``), the load average around the run
(other jobs make the times noisy), the times, the speed-up ratios and the largest difference between
the two paths (absolute and as a fraction of the data range).

Usage::

    python benchmarks/resample_speed.py --threads 2
    python benchmarks/resample_speed.py --shape 20,24,22 --reps 1 --output /tmp/resample_speed.json   # smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402


def head(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """``(D, H, W)`` float32: an ellipsoid with smooth texture and noise, zero outside."""
    rng = np.random.default_rng(seed)
    d, h, w = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij")
    inside = d ** 2 / 0.8 + h ** 2 / 0.9 + w ** 2 / 0.7 < 0.85
    texture = 400 + 150 * np.cos(5 * h) * np.sin(4 * w) + rng.normal(0, 25, shape).astype(np.float32)
    return np.where(inside, texture, 0).astype(np.float32)


def timed(fn: Callable[[], Any], reps: int) -> tuple[Any, float]:
    """``fn``'s result and the median seconds of ``reps`` calls after one warm-up call."""
    result = fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, _measure.median(times)


def run(shape: tuple[int, int, int], reps: int, threads: int) -> dict[str, Any]:
    import SimpleITK as sitk
    import torch

    import ReCoKDLib.data.preprocess as preprocess
    from ReCoKDLib.data.io import Geometry

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    c, s = np.cos(0.2), np.sin(0.2)
    direction = tuple(np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]).ravel())
    fine = Geometry((1.0, 1.0, 1.0), (-90.0, 126.0, -72.0), direction)
    coarse_shape = preprocess.resampled_shape(shape, (1.0, 1.0, 1.0), (1.5, 1.5, 1.5))
    coarse = preprocess._resampled_geometry(fine, shape, coarse_shape)
    image = head(shape)
    probability = np.clip(head(coarse_shape, seed=1) / 600.0, 0, 1).astype(np.float32)
    channels = np.stack([1 - probability, probability])
    cases = {
        "down_bspline": lambda: preprocess._resample(image, fine, coarse, coarse_shape, "bspline"),
        "down_linear": lambda: preprocess._resample(image, fine, coarse, coarse_shape, "linear"),
        "up_linear_2ch": lambda: np.stack([preprocess._resample(ch, coarse, fine, shape, "linear") for ch in channels]),
    }
    data_range = {"down_bspline": float(np.ptp(image)), "down_linear": float(np.ptp(image)),
                  "up_linear_2ch": float(np.ptp(channels))}
    results: dict[str, Any] = {}
    for name, fn in cases.items():
        print(f"[resample_speed] {name} (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
        preprocess.SEPARABLE_RESAMPLING = False
        reference, sitk_seconds = timed(fn, reps)
        preprocess.SEPARABLE_RESAMPLING = True
        result, separable_seconds = timed(fn, reps)
        difference = float(np.abs(result.astype(np.float64) - reference).max())
        results[name] = {
            "source_shape": list(channels.shape if name.startswith("up") else shape),
            "target_shape": list(result.shape),
            "simpleitk_seconds": sitk_seconds,
            "separable_seconds": separable_seconds,
            "speedup": sitk_seconds / separable_seconds,
            "max_abs_difference": difference,
            "max_difference_of_range": difference / data_range[name],
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="threads for torch and SimpleITK")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per path and case (median reported)")
    parser.add_argument("--shape", default="181,217,181", help="(D, H, W) of the 1 mm head")
    parser.add_argument("--output", default=str(_measure.RESULTS_DIR / "resample_speed.json"))
    args = parser.parse_args(argv)
    shape = tuple(int(n) for n in args.shape.split(","))
    if len(shape) != 3 or min(shape) < 4 or args.reps < 1 or args.threads < 1:
        raise _measure.BenchmarkError(f"--shape needs 3 sizes >= 4, --reps and --threads >= 1; got {args}")
    load_before = os.getloadavg()
    started = time.perf_counter()
    results = run(shape, args.reps, args.threads)  # type: ignore[arg-type]
    import SimpleITK as sitk

    data = {
        "benchmark": "resample_speed",
        **_measure.speed_provenance("benchmarks/resample_speed.py", args.threads, argv, load_before),
        "config": {"threads": args.threads, "reps": args.reps, "shape": list(shape), "spacing_mm": [1.0, 1.5],
                   "simpleitk": sitk.Version.VersionString()},
        "headline": {f"{name}_speedup": r["speedup"] for name, r in results.items()},
        "results": results,
        "elapsed_seconds": time.perf_counter() - started,
    }
    _measure.write_json(Path(args.output), data)
    for name, r in results.items():
        print(f"{name:14s} SimpleITK {r['simpleitk_seconds']:.3f} s  separable {r['separable_seconds']:.3f} s  "
              f"x{r['speedup']:.1f}  max diff {r['max_difference_of_range']:.1e} of the range")
    return 0


if __name__ == "__main__":
    sys.exit(main())
