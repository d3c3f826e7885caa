"""The whole Segment path, per model at its best setting on this machine, side by side in one run (issue 15).

What a click on *Segment* costs: read the scan -> preprocess -> infer -> restore -> write the label
map (:func:`ReCoKDLib.infer.segment_file`, as ``recokd segment`` runs it), with the model already
loaded (Slicer, ``recokd serve`` and ``recokd segment`` over many cases load it once). For every
model and scan three settings are measured, each in its own subprocess:

* ``before``: the path before the backend layer: PyTorch fp32 with PyTorch's own convolution
  choice (``networks.plain_convolutions``), the training patch as window, overlap 0.5, every class
  probability map resampled (``restore="probabilities"``). Its labels are the reference
  ("the fp32 PyTorch result");
* ``fp32``: PyTorch fp32 as it is now (oneDNN convolutions for thin layers, the window from the
  free memory, ``restore="fast"``, the overlap of the model card, else 0.5);
* ``best``: the default (``backend="auto"``, ``precision="auto"``, window and restore auto, the
  card's overlap): the fastest backend that agrees with PyTorch fp32 on this machine.

Per measurement, two subprocesses. The timed one: the first call (``first_seconds``: includes the
backend choice, graph export and compilation, cached afterwards; ``best`` only: the other settings
have nothing to choose), then the median of ``--reps`` calls, with the C library's default
allocator, as in Slicer or ``recokd segment``. The memory one: a warm-up call, then the peak
resident memory during one more call (``VmHWM``), above the process before the model was loaded
(``peak_with_model_bytes``: the model, what its backend keeps between calls, one call) and above
the process after the warm-up (``peak_extra_bytes``: the call alone), with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed arrays leave the resident set; that setting makes
every large allocation a fresh mapping, which slowed restoring a head 3x: it is kept out of the
timings). Then the mean Dice of the labels against the model's ``before`` labels
(``dice_vs_fp32_pytorch``), against its ``fp32`` labels (``dice_vs_fp32_same_window``: what the backend
and precision alone change, same window and restore) and against the scan's reference labels where it
has some (``dice_vs_reference``: S1's organs, on which the CT teacher trained; Colin27's brain mask).

The headline ratios (end to end, ``best`` unless said): ``ct_div4_vs_teacher``,
``fp32_div4_vs_teacher`` (both ``fp32``), ``hdbet_student_vs_teacher``,
``nnunet_student_vs_predictor`` (when an nnU-Net folder is given) and
``max_peak_memory_vs_teacher`` (the largest student ``peak_with_model_bytes`` over its teacher's,
per family; ``max_call_peak_memory_vs_teacher`` the same for ``peak_extra_bytes``).

Models (``--models FILE`` JSON ``{"name": {"path": ..., "family": "ct"|"hdbet", "role":
"teacher"|"student", "cases": [...]}}``) default to what ``recokd demo --task ct`` writes
(``runs/demo-ct/teacher`` and its /4 ReCo-KD student ``runs/demo-ct/distilled``, with the demo's
student options), ``runs/segment_speed/student_div{2,8}``, ``student_div4_instance`` (the /4 student
as derived: instance norm, full-resolution stage) and ``student_div4_bn_stem`` (batch norm, strided
stem), each ``recokd distill`` from that teacher with the demo's student budget,
``preset:hd-bet`` and the student of ``recokd demo`` (``runs/demo/student.pt``; else the same
architecture untrained, for its cost); see ``config.models`` in the JSON. ``--prepare`` trains the
missing CT models first, and the demo's students again when its options changed (:func:`prepare_models`).

Usage::

    python benchmarks/segment_speed.py --prepare --threads 2 --reps 3   # an idle machine: ratios from one run
    python benchmarks/segment_speed.py --smoke --output /tmp/segment_speed.json   # tests
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402
from _measure import BenchmarkError  # noqa: E402

SETTINGS = {
    "before": {"backend": "torch", "precision": "fp32", "window": "patch", "restore": "probabilities",
               "overlap": 0.5, "plain_convolutions": True},
    "fp32": {"backend": "torch", "precision": "fp32", "window": "auto", "restore": "fast", "overlap": None},
    "best": {"backend": "auto", "precision": "auto", "window": "auto", "restore": "auto", "overlap": None},
}


# ---------------------------------------------------------------------------------------------
# One measurement (its own process)


def _memory_record(peak_extra: int, reset: bool, before_load_kib: int) -> dict[str, Any]:
    """The memory worker's record after its measured call: ``peak_extra_bytes`` above the process
    after the warm-up call, ``peak_with_model_bytes`` above the process before the model was loaded
    (the model, what its backend keeps between calls -- a compiled graph and its buffers, which grow
    with the window -- and one call), ``peak_total_bytes`` the process's peak."""
    hwm = _measure.rss_kib("VmHWM")
    return {"peak_extra_bytes": peak_extra, "peak_with_model_bytes": (hwm - before_load_kib) * 1024 if reset else None,
            "peak_reset": reset, "peak_total_bytes": hwm * 1024}


def work(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the model and segment ``spec["image"]``; the labels go to ``spec["out"]``. ``spec["part"]``
    ``"time"``: once (first use, ``best`` only), then ``reps`` times (median); ``"memory"``: once, then
    the peak resident memory during one more call."""
    import contextlib

    import torch

    from ReCoKDLib.infer import segment_file
    from ReCoKDLib.models.loading import load_model
    from ReCoKDLib.networks import plain_convolutions

    torch.set_num_threads(int(spec["threads"]))
    setting = dict(SETTINGS[spec["setting"]])
    plain = setting.pop("plain_convolutions", False)
    overlap = setting.pop("overlap")
    before_load = _measure.rss_kib("VmRSS")
    started = time.perf_counter()
    model = load_model(spec["model"])
    load_seconds = time.perf_counter() - started
    networks = list(getattr(model, "fold_networks", None) or [model.network])
    lines: list[str] = []

    class _Log:  # the reporter interface segment_volume uses
        def start(self, *a, **k): pass
        def progress(self, *a, **k): pass
        def log(self, _stage, message, **k): lines.append(message)

    with contextlib.ExitStack() as stack:
        if plain:
            for network in networks:
                stack.enter_context(plain_convolutions(network))

        def once(reporter=None):
            return segment_file(model, spec["image"], spec["out"], overlap=overlap, device="cpu", reporter=reporter,
                                **setting)

        if spec.get("part") == "memory":
            once()
            result, peak, reset = _measure.peak_during(once)
            return _memory_record(peak, reset, before_load)
        first = None
        result = None
        if spec["setting"] == "best":  # the first call chooses the backend (and exports): timed on its own
            started = time.perf_counter()
            result = once(_Log())
            first = time.perf_counter() - started
        times = []
        for _ in range(int(spec["reps"])):
            started = time.perf_counter()
            result = once()
            times.append(time.perf_counter() - started)
    return {"seconds": _measure.median(times), "seconds_all": times, "first_seconds": first,
            "load_seconds": load_seconds, "backend": result.info.get("backend"),
            "window": result.info.get("window"), "window_choice": result.info.get("window_choice"),
            "restore": result.info.get("restore"), "overlap": result.info.get("overlap"),
            "stage_seconds": result.info.get("stage_seconds"),
            "input_shape": list(result.labels.shape), "log": lines[-6:]}


def work_nnunet_predictor(spec: dict[str, Any]) -> dict[str, Any]:
    """``nnUNetPredictor`` with its defaults (step 0.5, mirroring, Gaussian) on one image file."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(int(spec["threads"]))
    before_load = _measure.rss_kib("VmRSS")
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    folder = Path(spec["model"])
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=(0,))

    def once():
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "in"
            src.mkdir()
            os.symlink(Path(spec["image"]).resolve(), src / "case_0000.nii.gz")
            predictor.predict_from_files(str(src), str(Path(tmp) / "out"), save_probabilities=False,
                                         num_processes_preprocessing=1, num_processes_segmentation_export=1)
            import shutil

            shutil.copy(Path(tmp) / "out" / "case.nii.gz", spec["out"])

    started = time.perf_counter()
    once()
    first = time.perf_counter() - started
    if spec.get("part") == "memory":
        _, peak, reset = _measure.peak_during(once)
        return _memory_record(peak, reset, before_load)
    times = []
    for _ in range(int(spec["reps"])):
        started = time.perf_counter()
        once()
        times.append(time.perf_counter() - started)
    return {"seconds": _measure.median(times), "seconds_all": times, "first_seconds": first,
            "backend": {"backend": "nnUNetPredictor"}}


def _run_worker(spec: dict[str, Any], in_process: bool) -> dict[str, Any]:
    if in_process:
        return (work_nnunet_predictor if spec["setting"] == "predictor" else work)(spec)
    env = {**os.environ, **(_measure.MEMORY_ENV if spec.get("part") == "memory" else {}),
           "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=_measure.REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:500]}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# Cases, models, Dice


def _references(cases: dict[str, str]) -> dict[str, str]:
    """The reference label map of each case that has one (S1: TotalSegmentator's organs, the CT
    teacher's training scan; Colin27: its brain mask), by case name."""
    paths = {}
    for case, image in cases.items():
        image = Path(image)
        if case == "s1_ct":
            paths[case] = image.parent.parent / "labelsTr" / "totalseg_s1.nii.gz"
        elif case == "t1_head":
            paths[case] = image.parent.parent / "labelsTs" / image.name.replace("_0000", "")
    return {case: str(path) for case, path in paths.items() if path.is_file()}


def _cases(smoke: bool, tmp: Path) -> dict[str, str]:
    from ReCoKDLib.data.fetch import fetch_datasets

    roots = fetch_datasets(None)
    ct = Path(roots["Dataset901_CTAbdomenOrgans"])
    cases = {"s1_ct": str(ct / "imagesTr" / "totalseg_s1_0000.nii.gz")}
    if smoke:
        return cases
    from ReCoKDLib.data.builders import extract_members

    archive = ct.parent / "downloads" / "totalsegmentator-2.18.0.tar.gz"
    if archive.is_file():
        extract_members(archive, {"s3": "totalsegmentator-2.18.0/tests/reference_files/example_ct_dicom/"}, tmp)
        cases["s3_dicom"] = str(tmp / "s3")
    heads = Path(roots.get("Dataset904_T1Heads", ct.parent / "Dataset904_T1Heads")) / "imagesTs" / "colin27_0000.nii.gz"
    if heads.is_file():
        cases["t1_head"] = str(heads)
    return cases


def default_models() -> dict[str, dict[str, Any]]:
    runs = _measure.REPO / "runs"
    # recokd demo's student: student.pt carries the overlap the demo chose; model_last.pt (older demos) does not
    demo_student = next((p for p in (runs / "demo/student.pt", runs / "demo/student/model_last.pt") if p.is_file()),
                        None)
    models = {
        "ct_teacher": {"path": runs / "demo-ct/teacher/model_last.pt", "family": "ct", "role": "teacher", "reduction": 1,
                       "cases": ["s1_ct"]},
        "hdbet_teacher": {"path": "preset:hd-bet", "family": "hdbet", "role": "teacher", "cases": ["t1_head"],
                          "settings": ["fp32", "best"]},
        "hdbet_student": ({"path": demo_student, "family": "hdbet", "role": "student",
                           "note": "the student of `recokd demo` (README command 1), with the overlap it chose"}
                          if demo_student is not None else
                          {"path": runs / "segment_speed/hdbet_student/model.pt", "family": "hdbet",
                           "role": "student", "note": "make_hdbet_student(): untrained weights, speed only"})
                         | {"cases": ["t1_head"], "settings": ["fp32", "best"]},
        "ct_div4": {"path": runs / "demo-ct/distilled/model_last.pt", "family": "ct", "role": "student",
                    "reduction": 4, "cases": ["s1_ct"],
                    "note": "the /4 ReCo-KD student of recokd demo --task ct, with the demo's student options "
                            "(demo.DemoConfig.student_norm / student_stem)"},
        "ct_div4_instance": {"path": runs / "segment_speed/student_div4_instance/model_last.pt", "family": "ct",
                             "role": "student", "reduction": 4, "norm": "instance", "stem": "full", "cases": ["s1_ct"],
                             "note": "the /4 student as derived from the teacher (instance norm, full-resolution "
                                     "stage): segments in overlapping training-patch windows"},
        "ct_div4_bn_stem": {"path": runs / "segment_speed/student_div4_bn_stem/model_last.pt", "family": "ct",
                            "role": "student", "reduction": 4, "norm": "batch", "stem": "strided", "cases": ["s1_ct"],
                            "note": "the /4 student with batch norm and a strided stem (recokd distill --student-norm "
                                    "batch --student-stem strided): one window, no full-resolution stage"},
        "ct_div2": {"path": runs / "segment_speed/student_div2/model_last.pt", "family": "ct", "role": "student",
                    "reduction": 2, "cases": ["s1_ct"], "settings": ["fp32", "best"]},
        "ct_div8": {"path": runs / "segment_speed/student_div8/model_last.pt", "family": "ct", "role": "student",
                    "reduction": 8, "cases": ["s1_ct"], "settings": ["fp32", "best"]},
        "ct_teacher@s3": {"path": runs / "demo-ct/teacher/model_last.pt", "family": "ct", "role": "teacher",
                          "cases": ["s3_dicom"], "settings": ["fp32", "best"]},
        "ct_div4@s3": {"path": runs / "demo-ct/distilled/model_last.pt", "family": "ct", "role": "student",
                       "cases": ["s3_dicom"], "settings": ["fp32", "best"]},
    }
    # the order is the priority on 2 shared cores: the JSON is rewritten after every model
    return {k: {**v, "path": str(v["path"])} for k, v in models.items()}


def prepare_models(models: dict[str, dict[str, Any]], threads: int) -> list[str]:
    """Train what :func:`default_models` names and is missing, with the commands a user runs: ``recokd demo
    --task ct`` (the CT teacher and its /4 ReCo-KD student, ``runs/demo-ct``), then ``recokd distill`` of the
    /4 batch-norm, /2 and /8 students from that teacher with the demo's student budget (``demo.DemoConfig``:
    350 steps, AdamW 2e-3, ReCo-KD lambda 0.01, seed 42). Returns the commands run (recorded in the JSON)."""
    from ReCoKDLib.data.fetch import fetch_datasets
    from ReCoKDLib.demo import DemoConfig

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    recokd = [sys.executable, "-m", "ReCoKDLib"]
    commands: list[list[str]] = []
    teacher = Path(models["ct_teacher"]["path"])
    demo = DemoConfig()
    if not teacher.is_file() or not _is_demo_student(Path(models["ct_div4"]["path"]), demo):
        # the demo reuses its finished teacher and trains students with its current options
        commands.append(recokd + ["demo", "--task", "ct", "--out", str(teacher.parent.parent), "--progress", "none"])
    data = Path(fetch_datasets(None, only="ct")["Dataset901_CTAbdomenOrgans"])
    for name in ("ct_div4_instance", "ct_div4_bn_stem", "ct_div2", "ct_div8"):
        if name not in models:
            continue
        out = Path(models[name]["path"]).parent
        if not (out / "model_last.pt").is_file():
            commands.append(recokd + [
                "distill", str(teacher), "--data", str(data), "--out", str(out), "--reduction",
                str(models[name]["reduction"]), "--kd", demo.kd, "--kd-weight", str(demo.kd_weight),
                "--steps", str(demo.student_steps), "--batch", str(demo.batch_size), "--optimizer", "adamw",
                "--lr", str(demo.lr), "--weight-decay", "1e-4", "--ema-decay", "0", "--val-cases", "0",
                "--seed", str(demo.seed), "--bf16", "--progress", "none"]
                + (["--student-norm", models[name]["norm"]] if models[name].get("norm") else [])
                + (["--student-stem", models[name]["stem"]] if models[name].get("stem") else [])
                + (["--resume"] if (out / "checkpoint.pt").is_file() else []))
    for command in commands:
        print(f"[segment_speed] prepare: {' '.join(command[1:])}", file=sys.stderr, flush=True)
        subprocess.run(command, env=env, cwd=_measure.REPO, check=True)
    return [" ".join(["recokd", *c[3:]]) for c in commands]


def _is_demo_student(path: Path, demo) -> bool:
    """``path`` is a student with the options of ``demo`` (a :class:`~ReCoKDLib.demo.DemoConfig`)."""
    from ReCoKDLib.checkpoint import CheckpointError, read_model_card
    from ReCoKDLib.networks import UNetConfig

    try:
        network = UNetConfig.from_dict(dict(read_model_card(path).architecture["config"]))
    except (OSError, ValueError, KeyError, CheckpointError):
        return False
    return network.norm == (demo.student_norm or "instance") and network.strided_stem == (demo.student_stem == "strided")


def make_hdbet_student(path: Path) -> Path:
    """The HD-BET student architecture of ``recokd demo`` (``demo_heads.HeadsDemoConfig``: the
    strided-stem DynUNet 16-32-64-128, 1.4 M parameters) with untrained weights and the preset's
    card: what a student of HD-BET costs to run when the demo's trained student is not there (its
    labels are not a brain mask; Dice is against its own fp32 run)."""
    import torch

    from ReCoKDLib.checkpoint import ModelCard, save_model
    from ReCoKDLib.demo_heads import HeadsDemoConfig, student_config
    from ReCoKDLib.models.presets import load_preset
    from ReCoKDLib.networks import build_unet

    preset = load_preset("hd-bet")
    demo = HeadsDemoConfig()
    config = student_config(demo.student_filters, len(preset.classes), demo.student_stem_stride, demo.student_norm)
    torch.manual_seed(0)
    card = ModelCard(architecture={"kind": "dynunet", "config": config.to_dict()}, classes=list(preset.classes),
                     spacing=list(preset.spacing), normalization=dict(preset.normalization),
                     patch_size=list(preset.patch_size), role="student", provenance={"note": "untrained, speed only"},
                     postprocessing=dict(preset.postprocessing))  # the same work after the network as the teacher
    return save_model(path, build_unet(config).state_dict(), card)


def _smoke_models(tmp: Path) -> dict[str, dict[str, Any]]:
    """A tiny random CT teacher and its ÷4 student (speed plumbing only)."""
    import torch

    from ReCoKDLib.checkpoint import ModelCard, save_model
    from ReCoKDLib.networks import build_unet, derive_student_config, preset

    out = {}
    teacher = preset("tiny", num_classes=3)
    for name, config in (("ct_teacher", teacher), ("ct_div4", derive_student_config(teacher, 4, min_channels=2))):
        torch.manual_seed(0)
        card = ModelCard(architecture={"kind": "dynunet", "config": config.to_dict()}, classes=["bg", "a", "b"],
                         spacing=[9.0, 9.0, 9.0], normalization={"scheme": "zscore"}, patch_size=[8, 16, 16])
        path = save_model(tmp / f"{name}.pt", build_unet(config).state_dict(), card)
        out[name] = {"path": str(path), "family": "ct", "role": "teacher" if name == "ct_teacher" else "student",
                     "cases": ["s1_ct"]}
    return out


def mean_dice(a_path: str, b_path: str) -> float | None:
    """Mean Dice over the labels present in either map (background excluded)."""
    import numpy as np

    from ReCoKDLib.data.io import read_image

    a, _ = read_image(a_path)
    b, _ = read_image(b_path)
    if a.shape != b.shape:
        return None
    values = []
    for label in sorted(set(np.unique(a).tolist()) | set(np.unique(b).tolist()) - {0}):
        if label == 0:
            continue
        x, y = a == label, b == label
        values.append(2.0 * float((x & y).sum()) / float(x.sum() + y.sum()))
    return float(np.mean(values)) if values else 1.0


def _ratio(a, b):
    return float(a) / float(b) if a and b else None


def headline(results: dict[str, Any], main_case: dict[str, str]) -> dict[str, Any]:
    """The ratios of the issue, from ``results[model][case][setting]``."""

    def seconds(model, setting):
        case = main_case.get(model.split("_")[0], "")
        return ((results.get(model) or {}).get(case) or {}).get(setting, {}).get("seconds")

    out = {
        "ct_div4_vs_teacher": _ratio(seconds("ct_teacher", "best"), seconds("ct_div4", "best")),
        "fp32_div4_vs_teacher": _ratio(seconds("ct_teacher", "fp32"), seconds("ct_div4", "fp32")),
        "hdbet_student_vs_teacher": _ratio(seconds("hdbet_teacher", "best"), seconds("hdbet_student", "best")),
        "nnunet_student_vs_predictor": _ratio(seconds("nnunet_teacher", "predictor"),
                                              seconds("nnunet_student", "best")),
        "ct_div4_instance_vs_teacher": _ratio(seconds("ct_teacher", "best"), seconds("ct_div4_instance", "best")),
        "ct_div4_bn_stem_vs_teacher": _ratio(seconds("ct_teacher", "best"), seconds("ct_div4_bn_stem", "best")),
        "before_div4_vs_teacher": _ratio(seconds("ct_teacher", "before"), seconds("ct_div4", "before")),
        "ct_div4_best_vs_before": _ratio(seconds("ct_div4", "before"), seconds("ct_div4", "best")),
    }
    def worst(key: str) -> float | None:
        largest = None
        for family in ("ct", "hdbet"):
            teacher = results.get(f"{family}_teacher") or {}
            for model, per_case in results.items():
                if not model.startswith(family) or model.endswith("teacher"):
                    continue
                for case, per_setting in per_case.items():
                    t = ((teacher.get(case) or {}).get("best") or {}).get(key)
                    s = (per_setting.get("best") or {}).get(key)
                    if t and s:
                        largest = max(largest or 0.0, s / t)
        return largest

    # with the model and its backend's state: a whole-scan window keeps a scan-sized compiled graph
    # between calls, which the call's own peak does not show
    out["max_peak_memory_vs_teacher"] = worst("peak_with_model_bytes")
    out["max_call_peak_memory_vs_teacher"] = worst("peak_extra_bytes")
    return out


def markdown_table(data: dict[str, Any]) -> str:
    """The README's table of a result: one row per model, scan and setting."""
    def number(value, digits):
        return "" if value is None else f"{value:.{digits}f}"

    rows = ["| model | scan | setting | engine | window | s (median) | first call s | peak MB with model | "
            "peak MB of a call | Dice vs fp32 PyTorch | Dice vs reference |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, per_case in data["results"].items():
        for case, per_setting in per_case.items():
            for setting, record in per_setting.items():
                backend = record.get("backend")
                engine = f"{backend['backend']} {backend.get('precision', '')}".strip() if isinstance(backend, dict) else str(backend or "")
                window = "×".join(map(str, record.get("window") or [])) or ""
                peak = record.get("peak_extra_bytes")
                with_model = record.get("peak_with_model_bytes")
                rows.append(f"| {model} | {case} | {setting} | {engine} | {window} | {number(record.get('seconds'), 2)} | "
                            f"{number(record.get('first_seconds'), 1)} | "
                            f"{number(with_model / 1e6 if with_model else None, 0)} | "
                            f"{number(peak / 1e6 if peak else None, 0)} | "
                            f"{number(record.get('dice_vs_fp32_pytorch'), 4)} | "
                            f"{number(record.get('dice_vs_reference'), 3)} |")
    return "\n".join(rows)


def plot(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Seconds per model and setting on each model's main scan (log scale), with Dice in the labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for model, per_case in data["results"].items():
        for case, per_setting in per_case.items():
            for setting, record in per_setting.items():
                if "seconds" in record:
                    rows.append((f"{model}\n{case}", setting, record["seconds"], record.get("dice_vs_fp32_pytorch")))
    labels = list(dict.fromkeys(r[0] for r in rows))
    settings = list(dict.fromkeys(r[1] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4))
    width = 0.8 / max(1, len(settings))
    for n, setting in enumerate(settings):
        for i, label in enumerate(labels):
            match = [r for r in rows if r[0] == label and r[1] == setting]
            if match:
                _, _, seconds, dice = match[0]
                x = i + (n - (len(settings) - 1) / 2) * width
                ax.bar(x, seconds, width, color=f"C{n}", label=setting if i == 0 or not ax.get_legend_handles_labels()[1].count(setting) else None)
                ax.text(x, seconds, f"{seconds:.1f}s" + (f"\nD {dice:.3f}" if dice is not None else ""), ha="center",
                        va="bottom", fontsize=6)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("seconds, read to written (median)")
    ax.set_title(f"Segment path on {data['machine'].get('cpu', '?')}, {data['config']['threads']} threads", fontsize=9)
    handles, names = ax.get_legend_handles_labels()
    ax.legend(dict(zip(names, handles)).values(), dict(zip(names, handles)).keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--models", help="JSON file of models (default: the demo's and runs/segment_speed/)")
    parser.add_argument("--nnunet-teacher", help="an nnU-Net model folder: also nnUNetPredictor vs ReCoKD's path")
    parser.add_argument("--nnunet-student", help="that teacher's student exported as an nnU-Net folder or ReCoKD file")
    parser.add_argument("--nnunet-case", help="the image the nnU-Net models segment (NIfTI)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--settings", default="before,fp32,best")
    parser.add_argument("--prepare", action="store_true",
                        help="first train the default models that are missing (recokd demo --task ct, recokd distill "
                             "of the /2 and /8 students; see prepare_models)")
    parser.add_argument("--smoke", action="store_true", help="tiny random models on S1 (tests)")
    parser.add_argument("--in-process", action="store_true", help="no subprocesses (tests; memory less exact)")
    parser.add_argument("--output", default=str(_measure.RESULTS_DIR / "segment_speed.json"))
    parser.add_argument("--table", metavar="JSON", help="print the README table of a result and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())))
        return 0
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(work_nnunet_predictor(spec) if spec["setting"] == "predictor" else work(spec)))
        return 0

    started = time.perf_counter()
    load_before = os.getloadavg()
    settings = [s for s in args.settings.split(",") if s]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise BenchmarkError(f"unknown settings {unknown}; choose from {sorted(SETTINGS)}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cases = _cases(args.smoke, tmp)
        prepared: list[str] = []
        if args.smoke:
            models = _smoke_models(tmp)
        elif args.models:
            models = json.loads(Path(args.models).read_text())
        else:
            models = default_models()
            if args.prepare:
                prepared = prepare_models(models, args.threads)
            student = Path(models["hdbet_student"]["path"])
            if not student.is_file() and "untrained" in models["hdbet_student"]["note"]:
                make_hdbet_student(student)
        if args.nnunet_teacher and args.nnunet_case:
            cases["nnunet_case"] = args.nnunet_case
            models["nnunet_teacher"] = {"path": args.nnunet_teacher, "family": "nnunet", "role": "teacher",
                                        "cases": ["nnunet_case"], "predictor": True}
            if args.nnunet_student:
                models["nnunet_student"] = {"path": args.nnunet_student, "family": "nnunet", "role": "student",
                                            "cases": ["nnunet_case"]}
        references = _references(cases)
        results: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        main_case = {"ct": "s1_ct", "hdbet": "t1_head", "nnunet": "nnunet_case"}

        def write(done: bool) -> dict[str, Any]:
            merged: dict[str, Any] = {}
            for key, per_case in results.items():
                merged.setdefault(key.split("@")[0], {}).update(per_case)
            data = {
                "benchmark": "segment_speed",
                **_measure.speed_provenance("benchmarks/segment_speed.py", args.threads, argv, load_before),
                "complete": done,
                "config": {"threads": args.threads, "reps": args.reps, "settings": {s: SETTINGS[s] for s in settings},
                           "cases": {k: Path(v).name for k, v in cases.items()},
                           "models": {k: dict(v) for k, v in models.items()}, "main_case": main_case,
                           "prepared_with": prepared},
                "headline": headline(merged, main_case),
                "results": merged,
                "skipped": skipped,
                "not_run_yet": [m for m in models if m not in results and m not in skipped],
                "elapsed_seconds": time.perf_counter() - started,
            }
            _measure.write_json(Path(args.output), data)
            return data

        for name, spec in models.items():
            path = spec["path"]
            if not str(path).startswith("preset:") and not Path(path).exists():
                skipped[name] = f"{path} does not exist"
                continue
            results[name] = {}
            for case in spec.get("cases", []):
                if case not in cases:
                    continue
                per: dict[str, Any] = {}
                runs = [s for s in settings if s in spec.get("settings", settings)] + (["predictor"] if spec.get("predictor") else [])
                for setting in runs:
                    out = tmp / f"{name}-{case}-{setting}.nii.gz"
                    print(f"[segment_speed] {name} {case} {setting} (load {os.getloadavg()[0]:.2f})", file=sys.stderr,
                          flush=True)
                    spec_ = {"model": str(path), "image": cases[case], "out": str(out), "setting": setting,
                             "reps": args.reps, "threads": args.threads}
                    per[setting] = _run_worker({**spec_, "part": "time"}, args.in_process)
                    if "error" not in per[setting]:
                        memory = _run_worker({**spec_, "part": "memory", "out": str(out) + ".memory.nii.gz"},
                                             args.in_process)
                        per[setting].update(memory if "error" not in memory else {"memory_error": memory["error"]})
                    per[setting]["_out"] = str(out)
                reference = (per.get("before") or per.get("fp32") or {}).get("_out")  # the fp32 PyTorch result
                same_window = (per.get("fp32") or {}).get("_out")  # PyTorch fp32 with this path's window and restore
                for setting, record in per.items():
                    out = record.pop("_out")
                    if not Path(out).is_file():
                        continue
                    if reference and Path(reference).is_file():
                        record["dice_vs_fp32_pytorch"] = mean_dice(out, reference)
                    if same_window and Path(same_window).is_file() and setting != "fp32":
                        record["dice_vs_fp32_same_window"] = mean_dice(out, same_window)
                    if case in references:
                        record["dice_vs_reference"] = mean_dice(out, references[case])
                results[name][case] = per
            write(False)
        data = write(True)
        plot(data, Path(args.output).with_suffix(".png"))
    print(json.dumps(data["headline"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
