"""Helpers shared by the benchmarks: provenance (date, machine, commit, command), peak memory of
the current process, medians, and atomic JSON output.

Peak memory is read from ``/proc/self/status`` (``VmHWM``, the resident high-water mark) after
resetting it through ``/proc/self/clear_refs``; run each measurement in its own subprocess so
that the peak belongs to that measurement only (see ``kd_loss_speed.py``). Set
``MALLOC_MMAP_THRESHOLD_=65536`` in that subprocess so freed tensors return to the OS and RSS
follows the live tensors.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: environment of a memory-measuring subprocess: every allocation >= 64 KiB is its own mapping
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


class BenchmarkError(ValueError):
    """A benchmark cannot run or its inputs are inconsistent (options, missing data, bad JSON)."""


def rss_kib(field: str = "VmRSS") -> int:
    """A memory field of ``/proc/self/status`` in KiB (``VmRSS`` now, ``VmHWM`` the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BenchmarkError(f"{field} is not in /proc/self/status; peak memory needs Linux")


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); ``False`` where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_during(fn: Callable[[], Any]) -> tuple[Any, int, bool]:
    """Run ``fn``; return ``(its result, peak RSS minus RSS before it in bytes, peak was reset)``."""
    before = rss_kib("VmRSS")
    was_reset = reset_peak()
    result = fn()
    return result, (rss_kib("VmHWM") - before) * 1024, was_reset


def median(values: Sequence[float]) -> float:
    if not values:
        raise BenchmarkError("no measurement to take the median of")
    return float(statistics.median(values))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The checkout's commit, with ``-dirty`` when tracked files differ from it; ``None`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "")


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """CPU, core count, threads used, torch version, whether oneDNN has bf16 kernels here (AVX-512 BF16 or
    AMX; without them bf16 runs in float32 or is refused) and, when CUDA is available, the GPU."""
    import torch

    from ReCoKDLib.models.backends import cpu_supports_bf16

    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_bf16_kernels": cpu_supports_bf16(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def provenance(threads: int | None = None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``date`` (UTC, ISO), ``machine``, ``git_commit`` and the exact ``command`` that ran."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]) if argv else Path("?")
    try:
        script = script.resolve().relative_to(REPO)
    except ValueError:
        pass
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(threads),
        "git_commit": git_commit(),
        "command": shlex.join(["python", str(script), *argv[1:]]),
    }


def speed_provenance(script: str, threads: int | None, argv: Sequence[str] | None,
                     load_before: Sequence[float]) -> dict[str, Any]:
    """:func:`provenance` of a speed benchmark run as ``python script *argv`` (``argv``: its
    arguments, default ``sys.argv[1:]``), with ``load_average`` before it started and now: another
    process on the cores skews every ratio it reports."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    return {**provenance(threads, [script, *arguments]),
            "load_average": {"before": list(load_before), "now": list(os.getloadavg())}}


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (a reader sees the old or the new file, never half)."""
    from ReCoKDLib.checkpoint import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise BenchmarkError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"{path} is not valid JSON ({exc}); re-run the benchmark that writes it") from None


def config_hash(*parts: Any) -> str:
    """A short, stable hash of JSON-serialisable parts (cache keys of runs)."""
    import hashlib

    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
