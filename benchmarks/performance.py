"""Performance benchmark: what a thinner student saves, and what each KD method costs (issue 6, part 2).

Every comparison is a ratio between numbers measured in ONE run of this script:

1. ``models``: the CT teacher (``networks.PRESETS["ct_demo"]``, 12 classes) vs its students with
   widths ÷2, ÷4, ÷8: parameters, FLOPs per window, and whole-volume sliding-window latency and
   peak memory on the CPU (fp32 and bf16 autocast) on the real training scan S1 preprocessed to the
   model's spacing (3 mm: ``predict_logits`` over the whole preprocessed volume, Gaussian
   weighting); GPU latency as well when CUDA is available. Random weights: the cost does not
   depend on them.
2. ``steps``: one training step (forward, backward, AdamW step; batch 2, bf16 autocast as the CPU
   benchmark trains) at two patch sizes: ``student`` alone (Dice + CE), ``student+teacher`` (plus the
   frozen teacher's forward under ``no_grad``), and ``student+teacher+<method>`` for each KD method
   (the ``DistillationPair`` taps and the method's loss, lambda as in the efficacy benchmark). The
   cost of a method beyond the teacher forward is ``<method> - student+teacher``.
3. ``onnx``: the ÷4 student in PyTorch fp32 vs ONNX Runtime (CPU) on one window and on the whole
   S1 sliding window, with the largest logit difference.

Method: each measurement runs in fresh subprocesses (see ``kd_loss_speed.py``): one for peak
memory (``MALLOC_MMAP_THRESHOLD_=65536`` so freed memory returns to the OS; peak RSS during the
measured call minus RSS before it, after a warm-up), one for time (default allocator; median of
``--reps`` after a warm-up). ``--smoke``: tiny shapes and the tiny network (tests).

Usage::

    python benchmarks/performance.py                 # ~10 min on 2 cores
    python benchmarks/performance.py --smoke --output /tmp/perf.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402
from _measure import BenchmarkError  # noqa: E402

REDUCTIONS = (1, 2, 4, 8)
KD_METHODS = ("recokd", "ms_sard", "ms_ca", "mskd", "logit", "fitnet", "cwd", "ifvd", "cirkd")
FULL = {"preset": "ct_demo", "spacing": [3.0, 3.0, 3.0], "window": [16, 96, 96], "overlap": 0.25,
        "step_patches": [[16, 64, 64], [16, 96, 96]], "batch": 2, "reps": 3, "num_classes": 12,
        "reductions": list(REDUCTIONS), "precisions": ["fp32", "bf16"], "methods": list(KD_METHODS)}
SMOKE = {"preset": "tiny", "spacing": [9.0, 9.0, 9.0], "window": [8, 16, 16], "overlap": 0.0,
         "step_patches": [[8, 16, 16]], "batch": 1, "reps": 1, "num_classes": 12,
         "reductions": [1, 4], "precisions": ["fp32"], "methods": ["recokd"]}


# ---------------------------------------------------------------------------------------------
# Workers (run in their own process)


def _network_config(cfg: dict[str, Any], reduction: int):
    from ReCoKDLib.networks import derive_student_config, preset

    teacher = preset(cfg["preset"], num_classes=cfg["num_classes"])
    return teacher if reduction == 1 else derive_student_config(teacher, reduction)


@functools.lru_cache(maxsize=2)
def _s1_cached(spacing: tuple[float, float, float]):
    return _s1_volume({"spacing": list(spacing)})


def _s1_volume(cfg: dict[str, Any]):
    """The real training scan S1, preprocessed (CT normalisation, the model's spacing): ``(1, D, H, W)``."""
    import torch

    from ReCoKDLib.data.fetch import fetch_datasets
    from ReCoKDLib.data.layout import RawDataset
    from ReCoKDLib.data.preprocess import compute_normalization, preprocess_case

    folder = fetch_datasets(None, only="ct")["Dataset901_CTAbdomenOrgans"]
    raw = RawDataset.open(folder)
    image, label, geometry = raw.load_case(raw.training_cases()[0])
    norm = compute_normalization([image], [label], scheme="ct")
    pre = preprocess_case(image, geometry, cfg["spacing"], norm)
    return torch.from_numpy(pre.image.copy()).float()


def work_latency(cfg: dict[str, Any], reduction: int, precision: str, device: str, reps: int,
                 memory: bool = True) -> dict[str, Any]:
    """Whole-volume sliding window of one model: median seconds of ``reps`` runs after a warm-up and,
    with ``memory``, the peak memory of one more run."""
    import torch

    from ReCoKDLib.infer import predict_logits
    from ReCoKDLib.networks import build_unet

    torch.manual_seed(0)
    net = build_unet(_network_config(cfg, reduction)).eval().to(device)
    volume = _s1_cached(tuple(cfg["spacing"]))
    amp = precision == "bf16"

    def once():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        predict_logits(net, volume, cfg["window"], cfg["overlap"], device=device, amp=amp)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    once()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    extra, reset = None, False
    if memory:
        _, extra, reset = _measure.peak_during(once)
    gpu_peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    times = [once() for _ in range(reps)] if reps else [once()]
    return {"seconds": _measure.median(times), "seconds_all": times, "peak_extra_bytes": extra, "peak_reset": reset,
            "gpu_peak_bytes": gpu_peak, "volume_shape": list(volume.shape[1:])}


def _step_parts(cfg: dict[str, Any], patch: Sequence[int], variant: str):
    """A training step closure for ``variant``: ``student``, ``student+teacher`` or ``student+teacher+<kd>``."""
    import torch

    from ReCoKDLib.engine import build_kd_module, build_seg_loss
    from ReCoKDLib.networks import build_unet, encoder_tap_names, split_deep_supervision
    from ReCoKDLib.taps import DistillationPair

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from efficacy import METHODS

    torch.manual_seed(0)
    t_cfg, s_cfg = _network_config(cfg, 1), _network_config(cfg, 4)
    teacher, student = build_unet(t_cfg), build_unet(s_cfg)
    k = cfg["num_classes"]
    g = torch.Generator().manual_seed(0)
    images = torch.randn((cfg["batch"], 1, *patch), generator=g)
    coarse = torch.randint(0, k, (cfg["batch"], 1, *(max(1, p // 4) for p in patch)), generator=g)
    labels = torch.nn.functional.interpolate(coarse.float(), size=tuple(patch), mode="nearest").long()
    seg_loss = build_seg_loss(s_cfg.deep_supr_num + 1)
    params = list(student.parameters())
    kd_module, pair, weight = None, None, 0.0
    if variant.startswith("student+teacher+"):
        method = variant.split("+")[-1]
        pair = DistillationPair(teacher, student, encoder_tap_names(t_cfg), encoder_tap_names(s_cfg), (1, *patch))
        recipe = METHODS[method]
        published = recipe.candidates[len(recipe.candidates) // 2]  # the middle candidate: the published default
        kd_module = build_kd_module(recipe.kd_spec(published), pair.teacher_channels, pair.student_channels, k)
        weight = published.kd_weight
        params += list(pair.adapters.parameters()) + list(kd_module.parameters())
    else:
        teacher.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    student.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if pair is not None:
                out, batch = pair(images, labels=labels, num_classes=k)
                kd = kd_module(batch).loss
            else:
                if variant == "student+teacher":
                    with torch.no_grad():
                        teacher(images)
                out, kd = student(images), None
        loss = seg_loss([o.float() for o in split_deep_supervision(out)], labels)
        if kd is not None:
            loss = loss + weight * kd.float()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def work_step(cfg: dict[str, Any], patch: Sequence[int], variant: str, reps: int, memory: bool = True) -> dict[str, Any]:
    step = _step_parts(cfg, patch, variant)
    step()  # warm-up (lazy initialisation, optimizer state)
    extra, reset = None, False
    if memory:
        _, extra, reset = _measure.peak_during(step)
    times = []
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"seconds": _measure.median(times), "seconds_all": times, "peak_extra_bytes": extra, "peak_reset": reset}


def work_onnx(cfg: dict[str, Any], reps: int, tmp: str) -> dict[str, Any]:
    """The ÷4 student: one window and the whole S1 volume, PyTorch fp32 vs ONNX Runtime."""
    import numpy as np
    import onnxruntime
    import torch
    from monai.inferers import sliding_window_inference

    from ReCoKDLib.export import _onnx
    from ReCoKDLib.infer import network_logits
    from ReCoKDLib.networks import build_unet

    torch.manual_seed(0)
    net = build_unet(_network_config(cfg, 4)).eval()
    window = torch.randn((1, 1, *cfg["window"]), generator=torch.Generator().manual_seed(0))
    path = Path(tmp) / "student.onnx"
    _onnx(net, window, path)
    threads = torch.get_num_threads()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def torch_predict(x):
        return network_logits(net(x)).float()

    def ort_predict(x):
        return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])

    volume = _s1_cached(tuple(cfg["spacing"]))[None]
    out: dict[str, Any] = {"threads": threads}
    for name, fn in (("torch", torch_predict), ("onnxruntime", ort_predict)):
        with torch.no_grad():
            fn(window)
            w_times, v_times = [], []
            for _ in range(max(reps, 3)):
                t0 = time.perf_counter()
                fn(window)
                w_times.append(time.perf_counter() - t0)
            for _ in range(reps):
                t0 = time.perf_counter()
                logits = sliding_window_inference(volume, cfg["window"], 1, fn, overlap=cfg["overlap"], mode="gaussian")
                v_times.append(time.perf_counter() - t0)
        out[name] = {"window_seconds": _measure.median(w_times), "volume_seconds": _measure.median(v_times)}
        out[name + "_logits"] = logits
    diff = float(np.max(np.abs(out.pop("torch_logits").numpy() - out.pop("onnxruntime_logits").numpy())))
    out["volume_max_abs_diff"] = diff
    out["speedup_window"] = out["torch"]["window_seconds"] / out["onnxruntime"]["window_seconds"]
    out["speedup_volume"] = out["torch"]["volume_seconds"] / out["onnxruntime"]["volume_seconds"]
    return out


# ---------------------------------------------------------------------------------------------
# Orchestration


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    kind = task["kind"]
    if kind == "latency":
        return work_latency(task["cfg"], task["reduction"], task["precision"], task["device"], task["reps"],
                            task.get("memory", True))
    if kind == "step":
        return work_step(task["cfg"], task["patch"], task["variant"], task["reps"], task.get("memory", True))
    if kind == "onnx":
        return work_onnx(task["cfg"], task["reps"], task["tmp"])
    raise BenchmarkError(f"unknown worker task {kind!r}")


#: run tasks in this process instead of fresh subprocesses (smoke test; peak memory then not isolated)
IN_PROCESS = False


def _spawn(task: dict[str, Any], threads: int, memory: bool) -> dict[str, Any]:
    """Run one task in a fresh interpreter; ``memory``: with the mmap allocator setting."""
    task = dict(task, memory=memory)
    if IN_PROCESS:
        return json.loads(json.dumps(run_task(task)))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        if memory:
            env.update(_measure.MEMORY_ENV)
        else:
            env.pop("MALLOC_MMAP_THRESHOLD_", None)
        cmd = [sys.executable, __file__, "--worker", json.dumps(task), "--worker-out", str(out),
               "--threads", str(threads)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BenchmarkError(f"worker {task['kind']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def measure(task: dict[str, Any], threads: int) -> dict[str, Any]:
    """Time from one subprocess, peak memory from another (see the module docstring)."""
    timing = _spawn(task, threads, memory=False)
    timing["isolated_subprocess"] = not IN_PROCESS
    if task["kind"] == "onnx":
        return timing
    memory = _spawn(dict(task, reps=0), threads, memory=True)
    timing["peak_extra_bytes"] = memory["peak_extra_bytes"]
    timing["peak_reset"] = memory["peak_reset"]
    if memory.get("gpu_peak_bytes") is not None:
        timing["gpu_peak_bytes"] = memory["gpu_peak_bytes"]
    return timing


def run_benchmark(cfg: dict[str, Any], threads: int, log=print, argv: Sequence[str] | None = None) -> dict[str, Any]:
    import torch

    from ReCoKDLib.networks import build_unet, count_flops, count_parameters

    t_start = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "performance", **_measure.provenance(threads, argv), "config": cfg}
    reps = cfg["reps"]

    models: dict[str, Any] = {}
    for r in cfg["reductions"]:
        name = "teacher" if r == 1 else f"student_div{r}"
        net_cfg = _network_config(cfg, r)
        net = build_unet(net_cfg)
        entry: dict[str, Any] = {"reduction": r, "filters": list(net_cfg.filters), "params": count_parameters(net),
                                 "flops_per_window": count_flops(net, cfg["window"])}
        for precision in cfg["precisions"]:
            entry[f"cpu_{precision}"] = measure({"kind": "latency", "cfg": cfg, "reduction": r, "precision": precision,
                                                 "device": "cpu", "reps": reps}, threads)
            log(f"{name} {precision}: {entry[f'cpu_{precision}']['seconds']:.2f} s")
        if torch.cuda.is_available():
            entry["gpu"] = _spawn({"kind": "latency", "cfg": cfg, "reduction": r, "precision": "fp32", "device": "cuda",
                                   "reps": reps}, threads, memory=False)
        models[name] = entry
    teacher = models["teacher"]
    for entry in models.values():
        entry["vs_teacher"] = {
            "params": entry["params"] / teacher["params"],
            "flops": entry["flops_per_window"] / teacher["flops_per_window"],
            **{f"cpu_{p}_latency": entry[f"cpu_{p}"]["seconds"] / teacher[f"cpu_{p}"]["seconds"] for p in cfg["precisions"]},
            **{f"cpu_{p}_peak": entry[f"cpu_{p}"]["peak_extra_bytes"] / max(teacher[f"cpu_{p}"]["peak_extra_bytes"], 1)
               for p in cfg["precisions"]},
            **({"gpu_latency": entry["gpu"]["seconds"] / teacher["gpu"]["seconds"]} if "gpu" in entry else {}),
        }
    result["models"] = models

    steps: dict[str, Any] = {}
    for patch in cfg["step_patches"]:
        key = "x".join(str(p) for p in patch)
        rows: dict[str, Any] = {}
        for variant in ("student", "student+teacher", *(f"student+teacher+{m}" for m in cfg["methods"])):
            rows[variant] = measure({"kind": "step", "cfg": cfg, "patch": patch, "variant": variant, "reps": reps}, threads)
            log(f"step {key} {variant}: {rows[variant]['seconds']:.3f} s")
        base, with_teacher = rows["student"], rows["student+teacher"]
        for variant, row in rows.items():
            row["vs_student"] = {"time": row["seconds"] / base["seconds"],
                                 "peak": row["peak_extra_bytes"] / max(base["peak_extra_bytes"], 1)}
            if variant.startswith("student+teacher+"):
                row["beyond_teacher_forward"] = {
                    "seconds": row["seconds"] - with_teacher["seconds"],
                    "time_ratio": row["seconds"] / with_teacher["seconds"],
                    "peak_bytes": row["peak_extra_bytes"] - with_teacher["peak_extra_bytes"],
                }
        steps[key] = rows
    result["steps"] = steps

    with tempfile.TemporaryDirectory() as tmp:
        result["onnx"] = measure({"kind": "onnx", "cfg": cfg, "reps": reps, "tmp": tmp}, threads)
    log(f"onnx: x{result['onnx']['speedup_volume']:.2f} on the volume")
    result["elapsed_seconds"] = time.perf_counter() - t_start
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny network and shapes (tests)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every measurement (default 2)")
    parser.add_argument("--reps", type=int, help="timed repeats per measurement (median; default 3)")
    parser.add_argument("--output", type=Path, default=_measure.RESULTS_DIR / "performance.json")
    parser.add_argument("--in-process", action="store_true",
                        help="measure in this process (fast, for tests; peak memory not isolated per measurement)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(run_task(json.loads(args.worker))))
        return 0
    if args.threads < 1 or (args.reps is not None and args.reps < 1):
        parser.error("--threads and --reps must be >= 1")
    global IN_PROCESS
    IN_PROCESS = args.in_process
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.reps is not None:
        cfg["reps"] = args.reps
    result = run_benchmark(cfg, args.threads, argv=[__file__, *(sys.argv[1:] if argv is None else argv)])
    _measure.write_json(args.output, result)
    print(f"wrote {args.output} ({result['elapsed_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
