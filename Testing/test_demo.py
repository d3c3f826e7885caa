"""``recokd demo``: the label-free heads demo (default; a tiny stand-in teacher here) and ``--task ct``."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from ReCoKDLib.checkpoint import read_model_card
from ReCoKDLib.cli import main
from ReCoKDLib.data.io import Geometry, read_image, write_image
from ReCoKDLib.demo import MODEL_NAMES, format_table, quick_config, run_ct_demo
from ReCoKDLib.demo_heads import HeadsDemoConfig, dice, format_heads_table, run_heads_demo
from ReCoKDLib.progress import Reporter

STRIDES = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
TAPS = [("downsamples.0", 2, 8), ("downsamples.1", 4, 8), ("downsamples.2", 8, 8), ("bottleneck", 16, 8)]


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--task" in text and "--full" in text and "--out" in text and "metrics.json" in text and "HD-BET" in text


def _stand_in_teacher(folder):
    """A tiny MONAI DynUNet as a teacher preset with HD-BET's shape: 2 classes, taps at strides 2..16.

    Its weights make it say "brain" where the image is bright, so the students have something to learn.
    """
    from monai.networks.nets import DynUNet

    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "kernel_size": [[3, 3, 3]] * 5,
              "strides": [list(s) for s in STRIDES], "upsample_kernel_size": [list(s) for s in STRIDES[1:]],
              "filters": [8] * 5, "norm_name": "instance", "deep_supervision": False}
    torch.manual_seed(0)
    net = DynUNet(**kwargs)
    torch.save(net.state_dict(), folder / "stand_in.pt")
    preset = {"format": "recokd-teacher-preset", "name": "stand-in", "entry_point": "monai.networks.nets:DynUNet",
              "kwargs": kwargs, "weights": "stand_in.pt", "classes": ["background", "brain"],
              "spacing": [3.0, 3.0, 3.0], "normalization": {"scheme": "zscore", "nonzero": False},
              "patch_size": [32, 32, 32], "pad_multiple": 16, "output": "logits",
              "postprocessing": {"keep_largest_component": ["brain"]},
              "taps": [{"module": m, "stride": [s] * 3, "channels": c} for m, s, c in TAPS]}
    path = folder / "stand_in.json"
    path.write_text(json.dumps(preset))
    return path


def _heads(root):
    """A Dataset904-like folder: 3 unlabelled training heads, 2 held out (one with a reference mask)."""
    data = root / "Heads"
    (data / "imagesTr").mkdir(parents=True)  # empty, as in the fetched dataset
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, 24)] * 3, indexing="ij")
    names = ["train_a", "train_b", "train_c", "held_ref", "held_plain"]
    for i, case in enumerate(names):
        r = np.sqrt(zz**2 + yy**2 + xx**2) * (1.0 + 0.05 * i)
        head = np.where(r < 0.9, 300.0, 0.0) + np.where(r < 0.6, 500.0, 0.0) + rng.normal(0, 10, r.shape)
        write_image(head.astype(np.float32), Geometry(spacing=(3.0, 3.0, 3.0)), data / "imagesTs" / f"{case}_0000.nii.gz")
    write_image((np.sqrt(zz**2 + yy**2 + xx**2) * 1.15 < 0.6).astype(np.uint8), Geometry(spacing=(3.0, 3.0, 3.0)),
                data / "labelsTs" / "held_ref.nii.gz")
    (data / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "brain": 1}, "numTraining": 0,
        "file_ending": ".nii.gz", "label_free_split": {"train": names[:3], "test": names[3:]}}))
    return data


def test_heads_demo_distils_through_the_engine_evaluates_and_reuses_every_stage(tmp_path):
    data = _heads(tmp_path)
    config = HeadsDemoConfig(teacher=str(_stand_in_teacher(tmp_path)), dataset=data.name,
                             student_filters=(4, 8, 8, 8), steps=3, patch_size=(32, 32, 32), batch_size=1,
                             latency_repeats=2, bf16=False)
    out = tmp_path / "demo"
    events = []
    metrics = run_heads_demo(out, data_dir=tmp_path, config=config, reporter=Reporter(events.append))

    assert json.loads((out / "metrics.json").read_text())["student"]["dice_vs_teacher"] == metrics["student"]["dice_vs_teacher"]
    teacher, student = metrics["teacher"], metrics["student"]
    assert metrics["train_heads"] == ["train_a", "train_b", "train_c"]
    assert set(student["dice_vs_teacher"]) == {"held_ref", "held_plain"}
    assert all(0.0 <= d <= 1.0 for d in student["dice_vs_teacher"].values())
    assert set(teacher["dice_vs_reference"]) == set(student["dice_vs_reference"]) == {"held_ref"}
    assert teacher["params"] > student["params"] > 0
    assert metrics["speedup"] == pytest.approx(teacher["latency_s"] / student["latency_s"])
    assert set(metrics["targets_met"]) == {"dice_vs_teacher", "reference_gap", "speedup"}
    # The student went through the engine with the teacher's outputs cached once per training head.
    assert student["teacher_outputs"]["mode"] == "cache"
    assert student["teacher_outputs"]["computed"] == 3 and student["teacher_outputs"]["cases"] == 3
    card = read_model_card(out / "student" / "model_last.pt")
    # the default strided stem: the student's four stages sit at the teacher's tap strides 2, 4, 8, 16
    assert card.role == "student" and card.tap_names == ["input_block", "downsamples.0", "downsamples.1", "bottleneck"]
    assert card.architecture["config"]["strides"][0] == [2, 2, 2]
    # the student is segmented as its teacher is: the teacher's post-processing is on its card
    assert card.postprocessing == {"keep_largest_component": ["brain"]} == student["postprocessing"]
    assert set(student["dice_vs_teacher_raw"]) == {"held_ref", "held_plain"} and "dice_vs_reference_raw" in teacher
    assert sorted(card.provenance["cases"]) == ["train_a", "train_b", "train_c"]  # held-out heads never trained on
    stages = {e["stage"] for e in events if e["event"] == "progress"}
    assert {"preprocess", "teacher-cache", "distill", "overlap", "evaluate", "demo"} <= stages
    # The overlap recokd segment uses for the student was chosen on the training heads against the teacher's
    # segmentation of them, and written into the card of out/student.pt (the engine's model_last.pt is unchanged).
    choice = student["overlap_choice"]
    assert choice["reference"].startswith("the teacher's segmentation of the training heads (train_a, train_b")
    assert [t["overlap"] for t in choice["trials"]] == [0.5, 0.25, 0.1, 0.0]
    assert set(choice["trials"][0]["dice_per_volume"]) == {"train_a", "train_b", "train_c"}
    chosen_card = read_model_card(out / "student.pt")
    assert chosen_card.inference == {"overlap": choice["chosen"]} == {"overlap": student["overlap"]}
    assert card.inference == {} and student["model"] == str(out / "student.pt")
    assert "sliding-window overlap (card)" in (out / "summary.txt").read_text()
    assert "| overlap | mean Dice vs reference | windows | seconds |" in (out / "report.md").read_text()
    assert "Dice vs teacher: mean" in (out / "summary.txt").read_text() and (out / "report.md").is_file()
    # Scored and timed on the path recokd segment runs: its label map is the demo's mask, on the head's grid.
    assert metrics["evaluation"] == "segment_volume" and student["network_s"] <= student["latency_s"]
    assert set(student["stage_seconds"]) == {"preprocess", "infer", "restore", "postprocess"}
    assert len(student["latencies_s"]) == 2 * 2 and len(teacher["latencies_s"]) == 2  # repeats x heads
    assert set(student["seconds_per_head"]) == set(teacher["seconds_per_head"]) == {"held_ref", "held_plain"}
    seg = tmp_path / "held_ref_seg.nii.gz"
    assert main(["segment", str(out / "student.pt"), str(data / "imagesTs" / "held_ref_0000.nii.gz"),
                 str(seg), "--progress", "json"]) == 0
    with np.load(out / "evaluation" / "student_masks.npz") as npz:
        assert np.array_equal(read_image(seg)[0] == 1, npz["held_ref"]) and npz["held_ref"].shape == (24, 24, 24)

    # A second run reuses the preprocessing, the finished student, its overlap and both evaluations: no training,
    # no pass.
    events = []
    again = run_heads_demo(out, data_dir=tmp_path, config=config, reporter=Reporter(events.append))
    assert not [e for e in events if e["event"] == "progress"
                and e["stage"] in ("distill", "teacher-cache", "overlap", "evaluate")]
    assert sum("reusing" in (e.get("message") or "") for e in events) == 4
    assert again["student"]["dice_vs_teacher"] == student["dice_vs_teacher"]
    assert again["teacher"]["latency_s"] == teacher["latency_s"]
    # The output folder moved elsewhere (its teacher cache now has another path) is still the same run.
    moved = tmp_path / "moved" / "demo"
    shutil.move(str(out), str(moved))
    events = []
    run_heads_demo(moved, data_dir=tmp_path, config=config, reporter=Reporter(events.append))
    assert not [e for e in events if e["event"] == "progress"
                and e["stage"] in ("distill", "teacher-cache", "overlap", "evaluate")]
    assert sum("reusing" in (e.get("message") or "") for e in events) == 4


def test_heads_demo_says_what_is_missing(tmp_path, capsys):
    (tmp_path / "Heads" / "imagesTr").mkdir(parents=True)
    (tmp_path / "Heads" / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "brain": 1},
                                                                  "channel_names": {"0": "T1"}, "numTraining": 0,
                                                                  "file_ending": ".nii.gz"}))
    config = HeadsDemoConfig(teacher=str(_stand_in_teacher(tmp_path)), dataset="Heads")
    with pytest.raises(ValueError, match="label_free_split"):
        run_heads_demo(tmp_path / "out", data_dir=tmp_path, config=config)
    # The student's overlap: auto (chosen on the training heads), a fraction, or the product's default.
    for bad in (1.0, -0.1, "fast", True):
        with pytest.raises(ValueError, match="inference_overlap"):
            HeadsDemoConfig(inference_overlap=bad)
    assert HeadsDemoConfig().inference_overlap == "auto"
    from ReCoKDLib.cli import build_parser
    from ReCoKDLib.commands.demo import heads_config

    assert heads_config(build_parser("demo").parse_args(["demo", "--overlap", "0.25"])).inference_overlap == 0.25
    assert heads_config(build_parser("demo").parse_args(["demo"])).inference_overlap == "auto"
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--overlap", "1", "--out", str(tmp_path / "o"), "--progress", "json"])
    assert exc.value.code == 2 and "the overlap must be in [0, 1)" in capsys.readouterr().err
    # Options of the CT demo are refused by the default (heads) demo, and the other way round.
    assert main(["demo", "--full", "--out", str(tmp_path / "o"), "--data", str(tmp_path), "--progress", "json"]) != 0
    assert "--task ct" in capsys.readouterr().err
    assert main(["demo", "--task", "ct", "--teacher", "x.json", "--out", str(tmp_path / "o"), "--progress", "json"]) != 0
    assert "--task heads" in capsys.readouterr().err
    assert main(["demo", "--student-stem", "strided", "--out", str(tmp_path / "o"), "--progress", "json"]) != 0
    assert "--task ct" in capsys.readouterr().err
    from ReCoKDLib.commands.demo import ct_config

    chosen = ct_config(build_parser("demo").parse_args(["demo", "--task", "ct", "--student-norm", "batch",
                                                        "--student-stem", "strided"]))
    assert (chosen.student_norm, chosen.student_stem) == ("batch", "strided")


def test_dice_and_table():
    a = np.zeros((4, 4, 4), bool)
    b = a.copy()
    a[:2], b[1:3] = True, True
    assert dice(a, b) == pytest.approx(0.5) and dice(a & False, b & False) == 1.0
    with pytest.raises(ValueError, match="shapes"):
        dice(a, b[:2])
    metrics = {"teacher": {"params": 16_000_000, "latency_s": 40.0, "network_s": 38.5,
                           "seconds_per_head": {"colin27": 19.25, "other": 60.75},
                           "dice_vs_reference": {"colin27": 0.95}},
               "student": {"params": 1_400_000, "latency_s": 2.0, "network_s": 0.25, "dice_vs_reference": {"colin27": 0.94},
                           "seconds_per_head": {"colin27": 1.75, "other": 2.25},
                           "dice_vs_teacher": {"colin27": 0.97, "other": 0.98}, "dice_vs_teacher_mean": 0.975},
               "speedup": 20.0}
    table = format_heads_table(metrics)
    assert "0.975" in table and "16,000,000" in table and "20.0x" in table and "colin27" in table
    assert "38.50" in table and "0.25" in table  # the network's share of each model's time
    assert "19.25" in table and "60.75" in table and "1.75" in table and "2.25" in table  # each head's seconds


def test_ct_demo_end_to_end_then_reuses_finished_runs(tmp_path, data_root, ct_dataset):
    config = replace(quick_config(0.005), latency_repeats=1)  # a few steps per run
    out = tmp_path / "demo"
    metrics = run_ct_demo(out, data_dir=data_root, config=config, device="cpu")

    organs = ct_dataset.class_names[1:]
    assert list(metrics) == list(MODEL_NAMES)
    assert json.loads((out / "metrics.json").read_text()).keys() == metrics.keys()
    for name, record in metrics.items():
        assert list(record["dice"]) == organs, name
        assert 0.0 <= record["mean_dice"] <= 1.0
        assert record["params"] > 0 and record["latency_s"] > 0
        # bf16 latency: null where this CPU has no bf16 or bf16 changes an untrained model's classes (refused)
        assert record["latency_bf16_s"] is None or record["latency_bf16_s"] > 0
    # The students are the teacher's architecture with widths / 4: 16x fewer parameters or so.
    assert metrics["student"]["params"] == metrics["distilled"]["params"]
    assert metrics["teacher"]["params"] > 10 * metrics["student"]["params"]
    assert (out / "report.html").stat().st_size > 0
    summary = (out / "summary.txt").read_text()
    assert "mean Dice" in summary and "distilled" in summary

    assert read_model_card(out / "student" / "model_last.pt").role == "student"
    distilled_card = read_model_card(out / "distilled" / "model_last.pt")
    assert distilled_card.role == "student" and "recokd" in distilled_card.kd["methods"]

    # A second run reuses every finished stage: no training step is reported.
    events = []
    again = run_ct_demo(out, data_dir=data_root, config=config, device="cpu", reporter=Reporter(events.append))
    assert not [e for e in events if e["event"] == "progress" and e["stage"] in ("train-teacher", "distill")]
    assert sum("reusing" in (e.get("message") or "") for e in events) == 3
    assert {n: r["mean_dice"] for n, r in again.items()} == {n: r["mean_dice"] for n, r in metrics.items()}

    # The students' normalisation and stem (DemoConfig.student_norm / student_stem) are both students'
    # network; the other choice trains both students again and reuses the teacher.
    assert _student_networks(out) == _expected_students(config)
    other = replace(config, student_norm=None if config.student_norm == "batch" else "batch",
                    student_stem="full" if config.student_stem == "strided" else "strided")
    events.clear()
    run_ct_demo(out, data_dir=data_root, config=other, device="cpu", reporter=Reporter(events.append))
    assert sum("reusing" in (e.get("message") or "") for e in events) == 1  # the teacher only
    assert _student_networks(out) == _expected_students(other)


def _student_networks(out):
    """(normalisation, has a strided stem) of the CT demo's two students."""
    from ReCoKDLib.networks import UNetConfig

    networks = {name: UNetConfig.from_dict(read_model_card(out / name / "model_last.pt").architecture["config"])
                for name in ("student", "distilled")}
    return {name: (n.norm, n.strided_stem) for name, n in networks.items()}


def _expected_students(config):
    chosen = (config.student_norm or "instance", config.student_stem == "strided")
    return {"student": chosen, "distilled": chosen}


def test_format_table_lists_models_and_classes():
    record = {"dice": {"liver": 0.5, "spleen": None}, "mean_dice": 0.25, "params": 1000, "latency_s": 1.5}
    table = format_table({"teacher": record, "student": record})
    assert "liver" in table and "spleen" in table and "n/a" in table and "1,000" in table


def test_a_run_finished_before_a_new_training_option_existed_is_reused(tmp_path):
    """A DONE.json written before a ``TrainConfig`` field existed (here ``student_stem``) names the
    same run as the field's default; another value is another run."""
    from ReCoKDLib.checkpoint import ModelCard, save_model
    from ReCoKDLib.demo import _finished_model
    from ReCoKDLib.engine.config import TrainConfig
    from ReCoKDLib.networks import build_unet, preset

    config = preset("tiny", num_classes=2)
    card = ModelCard({"kind": "dynunet", "config": config.to_dict()}, ["background", "a"], [1.0, 1.0, 1.0],
                     {"scheme": "zscore"}, [16, 16, 16])
    save_model(tmp_path / "model_last.pt", build_unet(config).state_dict(), card)
    expected = TrainConfig(steps=3).to_dict()
    older = {k: v for k, v in expected.items() if k != "student_stem"}
    (tmp_path / "DONE.json").write_text(json.dumps({"train_config": older, "step": 3}))
    assert _finished_model(tmp_path, expected) == tmp_path / "model_last.pt"
    assert _finished_model(tmp_path, TrainConfig(steps=3, student_stem="strided").to_dict()) is None
    assert _finished_model(tmp_path, TrainConfig(steps=4).to_dict()) is None


def test_a_checkpoint_of_another_configuration_is_not_resumed(tmp_path):
    """The engine resumes a checkpoint with the configuration stored in it, so the demo resumes only
    a checkpoint of the run it asks for (a new budget is the same run); another one starts afresh."""
    from types import SimpleNamespace

    from ReCoKDLib.demo import run_or_reuse
    from ReCoKDLib.engine.config import TrainConfig

    calls = []

    def starter(config):
        def start(resume):
            calls.append(resume)
            torch.save({"config": json.dumps(config.to_dict()), "step": config.steps}, tmp_path / "checkpoint.pt")
            (tmp_path / "model_last.pt").write_bytes(b"")
            return SimpleNamespace(cancelled=False, step=config.steps, last_model=tmp_path / "model_last.pt")
        return start

    events = []
    reporter = Reporter(events.append)
    first = TrainConfig(steps=3)
    run_or_reuse("student", tmp_path, first, starter(first), reporter)
    (tmp_path / "DONE.json").unlink()  # as if interrupted before the end
    longer = first.replace(steps=5)  # a new budget for the same run: resumed
    run_or_reuse("student", tmp_path, longer, starter(longer), reporter)
    other = first.replace(student_stem="strided")  # another run: afresh, with a warning
    run_or_reuse("student", tmp_path, other, starter(other), reporter)
    assert calls == [False, True, False]
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert len(warnings) == 1 and "another configuration" in warnings[0]
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")  # unreadable: afresh too
    (tmp_path / "DONE.json").unlink()
    run_or_reuse("student", tmp_path, other, starter(other), reporter)
    assert calls[-1] is False
