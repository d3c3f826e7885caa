"""``benchmarks/nnunet_folder.py`` end to end at the smallest budget: the fixture's ``3d_tiny``
configuration (``--tiny``; the real-size 3d_fullres teacher takes minutes per iteration on CI's CPUs),
1 epoch x 1 iteration of ``nnUNetTrainer``, 2 distill steps; then a rerun reuses every stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nnunetv2", reason="the nnunet extra (nnunetv2) builds the model folder")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "nnunet_folder.py"


def _run(out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--epochs", "1", "--iterations", "1",
                           "--distill-steps", "2", "--threads", "1", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "nnunet_folder.json").read_text())


@pytest.mark.slow
def test_nnunet_folder_builds_teacher_student_and_command(ct_dataset, tmp_path):
    from ReCoKDLib.nnunet.checkpoint import load_nnunet_checkpoint
    from ReCoKDLib.teachers import load_model

    out = tmp_path / "nf"
    data = _run(out)
    teacher, student = Path(data["teacher_folder"]), Path(data["student_folder"])
    assert teacher == out / "res" / "Dataset901_CTAbdomenOrgans" / "nnUNetTrainer__nnUNetPlans__3d_tiny"
    # the teacher: nnU-Net's layout, fold 0 trained by nnUNetTrainer, loadable by ReCoKD
    for name in ("dataset.json", "plans.json", "fold_0/checkpoint_final.pth"):
        assert (teacher / name).is_file(), name
    assert load_nnunet_checkpoint(teacher / "fold_0" / "checkpoint_final.pth")["trainer_name"] == "nnUNetTrainer"
    loaded = load_model(teacher)
    assert loaded.card.architecture["arch_kwargs"]["features_per_stage"] == [4, 8, 16, 32]
    assert len(loaded.card.classes) == 12  # background + the 11 organs
    # the student: its own export root, never beside the teacher
    assert student.parent.parent == out / "export" and student.name == "nnUNetTrainer__nnUNetPlans__3d_tiny_recokd"
    for name in ("dataset.json", "plans.json", "fold_0/checkpoint_final.pth"):
        assert (student / name).is_file(), name
    assert len(list((out / "export").rglob("dataset.json"))) == 1
    assert load_model(student).card.classes == loaded.card.classes
    assert 0 < data["student"]["parameters"] < data["teacher"]["parameters"]
    # the JSON names them, the case, the budgets, the honest warning and the command to run
    assert data["case"].endswith("imagesTr/totalseg_s1_0000.nii.gz") and Path(data["case"]).is_file()
    assert data["budgets"]["teacher_epochs"] == 1 and data["budgets"]["distill_steps"] == 2
    assert "NOT to convergence" in data["warning"]
    command = data["segment_speed_command"]
    assert command.startswith("python benchmarks/segment_speed.py --threads 2 --reps 3")
    for flag, value in (("--nnunet-teacher", teacher), ("--nnunet-student", student), ("--nnunet-case", data["case"]),
                        ("--models", data["segment_speed_models"])):
        assert f"{flag} {value}" in command
    assert json.loads(Path(data["segment_speed_models"]).read_text()) == {}
    # a rerun reuses every stage: same folders, the same weights files untouched
    checkpoints = [teacher / "fold_0" / "checkpoint_final.pth", student / "fold_0" / "checkpoint_final.pth"]
    stamps = [(c.stat().st_mtime_ns, c.read_bytes()) for c in checkpoints]
    again = _run(out)
    assert again["teacher_folder"] == data["teacher_folder"] and again["student_folder"] == data["student_folder"]
    assert [(c.stat().st_mtime_ns, c.read_bytes()) for c in checkpoints] == stamps
    assert again["earlier_stage_seconds"] == [data["stage_seconds"]]


def test_segment_speed_headline_reads_the_nnunet_models():
    """The ratio this script's folders are for (segment_speed.headline)."""
    sys.path.insert(0, str(SCRIPT.parent))
    import segment_speed

    results = {"nnunet_teacher": {"nnunet_case": {"predictor": {"seconds": 10.0}}},
               "nnunet_student": {"nnunet_case": {"best": {"seconds": 2.0}}}}
    main_case = {"ct": "s1_ct", "hdbet": "t1_head", "nnunet": "nnunet_case"}
    assert segment_speed.headline(results, main_case)["nnunet_student_vs_predictor"] == pytest.approx(5.0)
