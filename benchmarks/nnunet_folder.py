"""Build the inputs of ``segment_speed.py``'s ``nnunet_student_vs_predictor``: a real-size nnU-Net v2
model folder and its ReCoKD student exported as an nnU-Net folder, reproducibly, from the fetched CT.

What it measures: nothing by itself. It builds, under ``--out`` (default ``runs/nnunet_folder``):

1. ``raw/Dataset901_CTAbdomenOrgans``: the one training case of the fetched CT dataset (TotalSegmentator
   S1, 3 mm, 11 organs) in nnU-Net's raw layout; ``pre/``: nnU-Net's own fingerprint, plans and
   ``3d_fullres`` preprocessing (the default architecture nnU-Net plans for this scan, PlainConvUNet
   32..320 features); ``res/.../nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0``: trained by
   ``nnUNetTrainer`` itself on CPU for ``--epochs`` x ``--iterations`` (seeded). **Not trained to
   convergence: Dice numbers of this teacher or its student mean nothing**; only their speed does.
   Fold 0 with a one-case split (``splits_final.json``: train = validation = S1): nnU-Net's own 5-fold
   split needs >= 5 cases, and ``segment_speed.py`` runs ``nnUNetPredictor`` on fold 0.
2. ``student/``: ``recokd distill`` of that folder (widths / 4, ``--distill-steps`` steps, no validation
   case: there is only one); ``export/``: ``recokd export --nnunet`` of the student, a separate root
   (one ``dataset.json`` per root, as SlicerNNUnet expects).
3. ``nnunet_folder.json`` (``--output``): the folders, the case to segment (the S1 CT), parameter counts,
   budgets, stage times and the ``segment_speed.py`` command line; ``segment_speed_models.json`` (``{}``)
   makes that command run the nnU-Net models only.

Every stage is skipped when its output exists, so a rerun reuses a finished folder (7 s).
Measured on this 2-core machine with another benchmark on both cores, ``--threads 1``, defaults:
plan + preprocess 36 s, teacher (16.6 M parameters, patch 112x112x128, batch 2) 2 x 3 iterations
19 min, distill (1.04 M) 20 steps 11 min, export 3 s: 32 min in all.
``--tiny`` (tests only) trains the fixture's ``3d_tiny`` configuration (4-8-16-32, patch 32^3, see
``Testing/nnunet_fixture_build.py``) instead of ``3d_fullres``.

Usage::

    python benchmarks/nnunet_folder.py --threads 2                  # real size (defaults below)
    python benchmarks/nnunet_folder.py --tiny --epochs 1 --iterations 1 --distill-steps 2 --out /tmp/nf  # tests
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "Testing"))
import nnunet_fixture_build as fixture  # noqa: E402  (imports nothing of nnunetv2 at module level)

DATASET_ID = 901
DATASET_NAME = "Dataset901_CTAbdomenOrgans"
CASE = "totalseg_s1"
PLANS = "nnUNetPlans"
NOT_CONVERGED = ("teacher trained by nnUNetTrainer for a few iterations only, NOT to convergence: Dice numbers of "
                 "the teacher and its student mean nothing; the folders are for timing nnUNetPredictor vs ReCoKD")


def write_raw(raw: Path, data_dir: Path) -> Path:
    """S1 image and label in nnU-Net's raw layout, with a minimal dataset.json (the fetched one's labels)."""
    ds = raw / DATASET_NAME
    if (ds / "dataset.json").is_file():
        return ds
    source = data_dir / DATASET_NAME
    meta = json.loads((source / "dataset.json").read_text())
    for sub, name in (("imagesTr", f"{CASE}_0000.nii.gz"), ("labelsTr", f"{CASE}.nii.gz")):
        (ds / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(source / sub / name, ds / sub / name)
    dataset_json = {key: meta[key] for key in ("channel_names", "labels", "file_ending")}
    dataset_json.update(numTraining=1, name=DATASET_NAME)
    (ds / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return ds


def plan_and_preprocess(pre: Path, tiny: bool) -> str:
    """nnU-Net's fingerprint, plans and 3d_fullres preprocessing, a one-case split for fold 0; the
    configuration to train (``3d_tiny`` added to the plans with ``tiny``)."""
    plans_file = pre / DATASET_NAME / f"{PLANS}.json"
    data_folder = pre / DATASET_NAME / f"{PLANS}_3d_fullres"
    if not (plans_file.is_file() and data_folder.is_dir() and any(data_folder.glob(f"{CASE}*"))):
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprints, plan_experiments, preprocess)

        extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True, verbose=False,
                             show_progress_bar=False)
        assert plan_experiments([DATASET_ID]) == PLANS
        preprocess([DATASET_ID], PLANS, configurations=("3d_fullres",), num_processes=(1,), verbose=False,
                   show_progress_bar=False)
    if tiny and fixture.CONFIGURATION not in json.loads(plans_file.read_text())["configurations"]:
        fixture.add_tiny_configuration(plans_file)
    (pre / DATASET_NAME / "splits_final.json").write_text(json.dumps([{"train": [CASE], "val": [CASE]}]))
    return fixture.CONFIGURATION if tiny else "3d_fullres"


def train_teacher(folder: Path, configuration: str, epochs: int, iterations: int, seed: int) -> None:
    """``nnUNetTrainer`` on fold 0 (the fixture's ``train``), one validation iteration per epoch."""
    if (folder / "fold_0" / "checkpoint_final.pth").is_file():
        return
    shutil.rmtree(folder / "fold_0", ignore_errors=True)  # an interrupted run starts again
    os.environ["nnUNet_n_proc_DA"] = "0"  # single-threaded augmentation (never while planning)
    fixture.train(PLANS, seed, epochs, iterations, dataset_id=DATASET_ID, configuration=configuration, fold=0,
                  val_iterations=1)
    if not (folder / "fold_0" / "checkpoint_final.pth").is_file():
        raise RuntimeError(f"nnUNetTrainer did not write {folder / 'fold_0' / 'checkpoint_final.pth'}")


def recokd(*args: str) -> None:
    """``recokd ARGS`` in a subprocess (this interpreter, the repository as working folder)."""
    command = [sys.executable, "-m", "ReCoKDLib", *args]
    print("[nnunet_folder] " + " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def distill_student(teacher: Path, raw_ds: Path, out: Path, steps: int, seed: int) -> Path:
    """``recokd distill`` (widths / 4, ReCo-KD defaults, no validation case); resumes an interrupted run."""
    history = out / "history.json"
    done = history.is_file() and (json.loads(history.read_text()).get("train") or [{}])[-1].get("step") == steps
    if not ((out / "model_last.pt").is_file() and done):
        recokd("distill", str(teacher), "--data", str(raw_ds), "--reduction", "4", "--steps", str(steps),
               "--val-cases", "0", "--ema-decay", "0", "--seed", str(seed), "--out", str(out),
               *(["--resume"] if (out / "checkpoint.pt").is_file() else []))
    return out / "model_last.pt"


def export_student(student: Path, root: Path) -> Path:
    """``recokd export --nnunet ROOT``: ROOT holds only this student's folder."""
    pattern = f"{DATASET_NAME}/*_recokd/fold_0/checkpoint_final.pth"  # <teacher configuration>_recokd
    found = [p.parent.parent for p in root.glob(pattern)]
    if not found:
        recokd("export", "--nnunet", str(root), "--model", str(student), "--progress", "none")
        found = [p.parent.parent for p in root.glob(pattern)]
    if len(found) != 1:
        raise RuntimeError(f"expected one exported nnU-Net folder under {root}, found {found}")
    return found[0]


def describe(path: Path) -> dict:
    """Parameter count and architecture of a model (nnU-Net folder or ReCoKD file) as ReCoKD loads it."""
    from ReCoKDLib.networks import count_parameters
    from ReCoKDLib.teachers import load_model

    model = load_model(path)
    kwargs = model.card.architecture.get("arch_kwargs", {})
    return {"parameters": int(count_parameters(model.network)), "features_per_stage": kwargs.get("features_per_stage"),
            "patch_size": list(model.card.patch_size), "spacing": list(model.card.spacing)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "nnunet_folder"))
    parser.add_argument("--output", help="the JSON (default OUT/nnunet_folder.json)")
    parser.add_argument("--epochs", type=int, default=2, help="nnUNetTrainer epochs (default 2)")
    parser.add_argument("--iterations", type=int, default=3, help="training iterations per epoch (default 3)")
    parser.add_argument("--distill-steps", type=int, default=20, help="recokd distill steps (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")),
                        help="torch threads here and in the recokd subprocesses")
    parser.add_argument("--tiny", action="store_true", help="tests only: the fixture's 3d_tiny configuration")
    args = parser.parse_args(argv)

    from ReCoKDLib.data.fetch import default_data_dir

    out = Path(args.out).resolve()
    paths = {"nnUNet_raw": out / "raw", "nnUNet_preprocessed": out / "pre", "nnUNet_results": out / "res"}
    for key, value in paths.items():  # before nnunetv2 is imported: nnunetv2.paths reads them at import
        value.mkdir(parents=True, exist_ok=True)
        os.environ[key] = str(value)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    data_dir = default_data_dir()
    stages: dict[str, float] = {}

    def stage(name, fn, *a):
        started = time.perf_counter()
        result = fn(*a)
        stages[name] = round(time.perf_counter() - started, 1)
        print(f"[nnunet_folder] {name}: {stages[name]} s", file=sys.stderr, flush=True)
        return result

    raw_ds = stage("raw_dataset", write_raw, paths["nnUNet_raw"], data_dir)
    configuration = stage("plan_and_preprocess", plan_and_preprocess, paths["nnUNet_preprocessed"], args.tiny)
    teacher = paths["nnUNet_results"] / DATASET_NAME / f"nnUNetTrainer__{PLANS}__{configuration}"
    stage("train_teacher", train_teacher, teacher, configuration, args.epochs, args.iterations, args.seed)
    student_file = stage("distill_student", distill_student, teacher, raw_ds, out / "student", args.distill_steps,
                         args.seed)
    student = stage("export_student", export_student, student_file, out / "export")

    case = data_dir / DATASET_NAME / "imagesTr" / f"{CASE}_0000.nii.gz"
    models_json = out / "segment_speed_models.json"
    models_json.write_text("{}\n")  # no default models: segment_speed then runs the nnU-Net ones only
    output = Path(args.output) if args.output else out / "nnunet_folder.json"
    command = ["python", "benchmarks/segment_speed.py", "--threads", "2", "--reps", "3", "--nnunet-teacher",
               str(teacher), "--nnunet-student", str(student), "--nnunet-case", str(case), "--models",
               str(models_json), "--output", "benchmarks/results/segment_speed_nnunet.json"]
    previous = json.loads(output.read_text()) if output.is_file() else {}
    data = {
        "benchmark": "nnunet_folder",
        "warning": NOT_CONVERGED,
        "teacher_folder": str(teacher),
        "student_folder": str(student),
        "student_file": str(student_file),
        "case": str(case),
        "configuration": configuration,
        "fold": 0,
        "split": "one case: train = validation = " + CASE,
        "teacher": describe(teacher),
        "student": describe(student_file),
        "budgets": {"teacher_epochs": args.epochs, "teacher_iterations_per_epoch": args.iterations,
                    "teacher_val_iterations_per_epoch": 1, "distill_steps": args.distill_steps, "reduction": 4,
                    "seed": args.seed, "threads": args.threads},
        "stage_seconds": stages,  # this run's; a stage whose output existed takes ~0 s
        "earlier_stage_seconds": previous.get("earlier_stage_seconds", []) + (
            [previous["stage_seconds"]] if "stage_seconds" in previous else []),
        "segment_speed_models": str(models_json),
        "segment_speed_command": " ".join(command),
        "argv": ["benchmarks/nnunet_folder.py", *(argv if argv is not None else sys.argv[1:])],
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":  # nnU-Net's fingerprinting and preprocessing spawn workers that re-import this module
    raise SystemExit(main())
