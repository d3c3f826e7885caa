"""``recokd distill`` / ``recokd train-teacher`` as processes: JSON progress, kill -9 and exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from ReCoKDLib import cli
from ReCoKDLib.checkpoint import ModelCard, safe_torch_load, save_model
from ReCoKDLib.networks import build_unet, encoder_tap_names, preset

CT_NORMALIZATION = {"scheme": "ct", "clip": [-200.0, 300.0], "mean": 50.0, "std": 60.0}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def setup(tiny_ct_case, ct_dataset, tmp_path_factory):
    """A random tiny teacher file, the tiny CT pair and a shared preprocessing cache."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    config = preset("tiny", num_classes=len(ct_dataset.class_names))
    card = ModelCard({"kind": "dynunet", "config": config.to_dict()}, ct_dataset.class_names, [3.0, 3.0, 3.0],
                     CT_NORMALIZATION, [16, 32, 32], tap_names=encoder_tap_names(config))
    teacher = save_model(root / "teacher.pt", build_unet(config).state_dict(), card)
    pair = f"{tiny_ct_case.image_paths[0]}:{tiny_ct_case.label_path}"
    return {"root": root, "teacher": str(teacher), "pair": pair, "classes": ",".join(ct_dataset.class_names),
            "cache": str(root / "cache")}


def _distill_cmd(setup, out, steps, *extra):
    return [sys.executable, "-m", "ReCoKDLib", "distill", setup["teacher"], "--pairs", setup["pair"],
            "--classes", setup["classes"], "--cache-dir", setup["cache"], "--kd", "logit:1,fitnet:0.5",
            "--kd-weight", "1", "--kd-warmup", "3", "--steps", str(steps), "--batch", "2", "--patch", "16,32,32",
            "--val-cases", "0", "--checkpoint-every", "2", "--reduction", "2", "--deterministic", "--seed", "3",
            "--out", str(out), "--progress", "json", *extra]


def _json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every stdout line must be one JSON object


def _assert_same_state(a: dict, b: dict, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same_state(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_help_of_both_commands(capsys):
    for command in ("distill", "train-teacher"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "--resume" in text and "--progress" in text and "--device" in text
    with pytest.raises(SystemExit):
        cli.main(["distill", "--help"])
    text = capsys.readouterr().out
    assert "--kd-option" in text and "--frozen-aux" in text and "--reduction" in text


def test_kill_9_then_resume_equals_an_uninterrupted_run(setup):
    steps = 10
    full_out, killed_out = setup["root"] / "full", setup["root"] / "killed"
    full = subprocess.run(_distill_cmd(setup, full_out, steps), capture_output=True, text=True, env=ENV, timeout=300)
    assert full.returncode == 0, full.stderr
    events = _json_lines(full.stdout)
    assert events[-1]["event"] == "done" and events[-1]["step"] == steps
    assert [e["step"] for e in events if e["event"] == "progress" and e["stage"] == "distill"] == list(range(1, steps + 1))

    proc = subprocess.Popen(_distill_cmd(setup, killed_out, steps), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=ENV)
    seen = []
    for line in proc.stdout:
        event = json.loads(line)
        seen.append(event)
        if event["event"] == "checkpoint" and event.get("step") == 4:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not any(e["event"] == "done" and e["stage"] == "distill" for e in seen)
    stopped_at = safe_torch_load(killed_out / "checkpoint.pt")["step"]
    assert 4 <= stopped_at < steps

    resumed = subprocess.run(_distill_cmd(setup, killed_out, steps, "--resume"), capture_output=True, text=True,
                             env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    resumed_events = _json_lines(resumed.stdout)
    assert any(e["event"] == "log" and f"at step {stopped_at}" in e["message"] for e in resumed_events)
    a, b = safe_torch_load(full_out / "checkpoint.pt"), safe_torch_load(killed_out / "checkpoint.pt")
    assert a["step"] == b["step"] == steps
    for key in ("network", "ema", "aux", "optimizer", "samplers", "best_metric"):
        _assert_same_state(a[key], b[key], key)


def test_cli_errors_are_clear(setup, tmp_path):
    bad_kd = subprocess.run(_distill_cmd(setup, tmp_path / "x", 2)[:-2] + ["--progress", "none", "--kd", "recokk"],
                            capture_output=True, text=True, env=ENV, timeout=120)
    assert bad_kd.returncode == 2 and "Did you mean 'recokd'" in bad_kd.stderr  # bad input (the CLI convention)
    no_classes = subprocess.run(
        [sys.executable, "-m", "ReCoKDLib", "train-teacher", "--pairs", setup["pair"], "--out", str(tmp_path / "y"),
         "--progress", "json"], capture_output=True, text=True, env=ENV, timeout=120)
    assert no_classes.returncode == 2
    errors = [e for e in _json_lines(no_classes.stdout) if e["event"] == "error"]
    assert len(errors) == 1 and "--classes" in errors[0]["message"]


def test_train_teacher_cli_json_progress(setup):
    out = setup["root"] / "teacher_run"
    cmd = [sys.executable, "-m", "ReCoKDLib", "train-teacher", "--pairs", setup["pair"], "--classes", setup["classes"],
           "--arch", "tiny", "--spacing", "3", "--patch", "16,32,32", "--steps", "3", "--val-cases", "0",
           "--cache-dir", setup["cache"], "--out", str(out), "--progress", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    events = _json_lines(done.stdout)
    assert {e["stage"] for e in events} >= {"preprocess", "train-teacher"}
    assert events[-1]["event"] == "done" and events[-1]["path"] == str(out / "model_last.pt")
    card = json.loads((out / "model_last.json").read_text())
    assert card["role"] == "teacher" and card["spacing"] == [3.0, 3.0, 3.0]
    assert card["normalization"]["scheme"] == "ct" and len(card["classes"]) == 12


def test_kd_options_parse_into_the_spec():
    from ReCoKDLib.commands.distill import kd_spec_from_args

    spec = kd_spec_from_args("recokd:1,logit:0.5", ["recokd.stage_alpha=0.5", "logit.temperature=4"])
    assert spec == {"recokd": {"weight": 1.0, "stage_alpha": 0.5}, "logit": {"weight": 0.5, "temperature": 4}}
    assert kd_spec_from_args("recokd", ["stage_weights=[0.5,0.5]"])["recokd"]["stage_weights"] == [0.5, 0.5]
    with pytest.raises(ValueError, match="several KD methods"):
        kd_spec_from_args("recokd,logit", ["temperature=2"])
    with pytest.raises(ValueError, match="not in --kd"):
        kd_spec_from_args("recokd", ["fitnet.levels=[0]"])
