"""One exit-code convention for the whole CLI (issue 18, item 11), errors said once, signals.

0 ok, 1 failure while running, 2 bad input, 130 interrupted (Ctrl+C), 143 stopped by SIGTERM with
what to do next (:mod:`ReCoKDLib.commands.runner`). Commands run in this process where that is
enough, and as real child processes where a signal is sent.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ReCoKDLib.cli import main
from ReCoKDLib.commands.runner import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_TERMINATED, run_command

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
ROOT = Path(__file__).resolve().parents[1]


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def fine_model(tmp_path_factory):
    """A tiny U-Net with a 1 mm card: the 3 mm CT crop becomes 96x192x192 voxels, ~1700 windows (seconds)."""
    import torch

    from ReCoKDLib.checkpoint import ModelCard, save_model
    from ReCoKDLib.networks import build_unet, preset

    torch.manual_seed(0)
    config = preset("tiny", num_classes=3)
    card = ModelCard(architecture={"kind": "dynunet", "config": config.to_dict()}, classes=["background", "a", "b"],
                     spacing=[1.0, 1.0, 1.0], normalization={"scheme": "zscore"}, patch_size=[16, 32, 32])
    return save_model(tmp_path_factory.mktemp("model") / "fine.pt", build_unet(config).state_dict(), card)


# ---------------------------------------------------------------------------------------------
# Bad input is 2 in every command


def test_bad_input_exits_2_in_every_command(tmp_path, capsys, tiny_ct_case):
    missing = str(tmp_path / "missing.pt")
    image = str(tiny_ct_case.image_paths[0])
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    commands = {
        "segment": ["segment", missing, image, str(tmp_path / "s.nii.gz")],
        "evaluate": ["evaluate", "--model", f"m={missing}", "--pairs", f"{image}:{image}", "--out", str(tmp_path / "e")],
        "inspect": ["inspect", "--image", image, "--teacher", missing, "--student", missing, "--out", str(tmp_path / "i"),
                    "--no-png"],
        "export": ["export", missing, "--out", str(tmp_path / "x")],
        "distill": ["distill", missing, "--images", image, "--out", str(tmp_path / "d"), "--steps", "1"],
        "train-teacher": ["train-teacher", "--pairs", f"{image}:{image}", "--out", str(tmp_path / "t")],  # no --classes
        "demo": ["demo", "--out", str(blocker)],  # a file where the run folder should go
        "data fetch": ["data", "fetch", "--only", "no-such-dataset", "--dest", str(tmp_path / "f")],
    }
    for name, argv in commands.items():
        assert main([*argv, "--progress", "none"]) == EXIT_BAD_INPUT, name
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "Traceback" not in err, (name, err)


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["segment", "--overlap"])
    assert info.value.code == EXIT_BAD_INPUT


# ---------------------------------------------------------------------------------------------
# Said once, in every progress mode


@pytest.mark.parametrize("progress", ["auto", "bar", "none", "json"])
def test_an_error_is_said_once(tmp_path, capsys, progress, tiny_ct_case):
    missing = tmp_path / "missing.pt"
    code = main(["segment", str(missing), str(tiny_ct_case.image_paths[0]), str(tmp_path / "s.nii.gz"),
                 "--progress", progress])
    out, err = capsys.readouterr()
    assert code == EXIT_BAD_INPUT
    assert err.count(str(missing)) == 1, err  # one line for people on stderr
    errors = [e for e in _events(out) if e["event"] == "error"]
    assert len(errors) == (1 if progress == "json" else 0)  # and one event for programs


@pytest.mark.parametrize("progress", ["bar", "none"])
def test_an_error_the_engine_reported_is_not_said_again(tmp_path, capsys, progress, tiny_ct_case):
    code = main(["train-teacher", "--pairs", f"{tiny_ct_case.image_paths[0]}:{tiny_ct_case.label_path}",
                 "--classes", ",".join(f"c{i}" for i in range(12)), "--arch", "tiny", "--patch", "15,32,32",
                 "--steps", "1", "--val-cases", "0", "--device", "cpu", "--out", str(tmp_path / "run"),
                 "--progress", progress])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and err.count("multiple of") == 1, err


# ---------------------------------------------------------------------------------------------
# The runner itself: failures, interruptions, the unexpected


def _run(job, progress="none", **kwargs) -> int:
    return run_command(argparse.Namespace(progress=progress), "test", job, **kwargs)


def test_failures_interruptions_and_surprises_have_their_codes(capsys):
    def fails(reporter):
        raise OSError(28, "No space left on device")

    def interrupted(reporter):
        raise KeyboardInterrupt

    def surprise(reporter):
        raise TypeError("a bug")

    assert _run(fails) == EXIT_FAILURE and "No space left" in capsys.readouterr().err
    assert _run(interrupted, resume_hint="continue with: recokd x --resume") == EXIT_INTERRUPTED
    assert "interrupted; continue with: recokd x --resume" in capsys.readouterr().err
    assert _run(surprise) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "unexpected TypeError: a bug" in err and "Traceback" not in err and err.count("\n") == 1
    trace = Path(err.split("the traceback is in ")[1].split(";")[0])
    assert "raise TypeError" in trace.read_text()
    trace.unlink()


def test_out_of_memory_is_a_failure_with_sizes(capsys):
    import torch

    def numpy_oom(reporter):
        np.empty((10**5,) * 3)

    def torch_oom(reporter):
        torch.empty(2**50)

    assert _run(numpy_oom, memory_hint="--batch") == EXIT_FAILURE
    assert "out of memory: unable to allocate 7.11 PiB" in capsys.readouterr().err
    assert _run(torch_oom, memory_hint="--batch") == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "an allocation of 4 PiB failed on the CPU" in err and "Lower --batch" in err


# ---------------------------------------------------------------------------------------------
# SIGTERM: says it stopped, how to go on, and exits 143


def _popen(argv):
    return subprocess.Popen([sys.executable, "-m", "ReCoKDLib", *argv, "--progress", "json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=str(ROOT))


def _terminate_when(proc, predicate) -> list[dict]:
    seen = []
    for line in proc.stdout:
        event = json.loads(line)
        seen.append(event)
        if predicate(event):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    err = proc.stderr.read()
    proc.wait(timeout=120)
    proc.stdout.close()
    proc.stderr.close()
    return seen + _events(rest), err


def test_sigterm_stops_segment_with_143_and_no_partial_output(tmp_path, fine_model, tiny_ct_case):
    out = tmp_path / "out"
    out.mkdir()
    proc = _popen(["segment", str(fine_model), str(tiny_ct_case.image_paths[0]), str(out / "seg.nii.gz"),
                   "--device", "cpu"])
    events, err = _terminate_when(proc, lambda e: e["event"] == "progress" and e["stage"] == "segment")
    assert proc.returncode == EXIT_TERMINATED, err
    assert events[-1]["event"] == "error" and events[-1]["message"].startswith("stopped by SIGTERM")
    assert "stopped by SIGTERM; run the same command again" in err and "Traceback" not in err
    assert list(out.iterdir()) == []


def _train_argv(tiny_ct_case, run: Path, steps: int) -> list[str]:
    return ["train-teacher", "--pairs", f"{tiny_ct_case.image_paths[0]}:{tiny_ct_case.label_path}",
            "--classes", ",".join(f"c{i}" for i in range(12)), "--arch", "tiny", "--patch", "16,32,32",
            "--steps", str(steps), "--val-cases", "0", "--checkpoint-every", "1000", "--device", "cpu",
            "--out", str(run)]


def test_sigterm_stops_training_with_a_checkpoint_143_and_the_resume_command(tmp_path, tiny_ct_case):
    run = tmp_path / "run"
    proc = _popen(_train_argv(tiny_ct_case, run, 200))
    events, err = _terminate_when(proc, lambda e: e["event"] == "progress" and e["stage"] == "train-teacher"
                                  and e["step"] >= 2)
    assert proc.returncode == EXIT_TERMINATED, err
    done = [e for e in events if e["event"] == "done" and e["stage"] == "train-teacher"]
    assert done and done[-1]["cancelled"] is True and (run / "checkpoint.pt").is_file()
    assert "stopped by SIGTERM; continue with: recokd train-teacher" in err and "--resume" in err
    assert not (run / ".recokd.lock").exists()
    resumed = subprocess.run([sys.executable, "-m", "ReCoKDLib", *_train_argv(tiny_ct_case, run, done[-1]["step"] + 1),
                              "--resume", "--progress", "none"],
                             capture_output=True, text=True, env=ENV, cwd=str(ROOT), timeout=300)
    assert resumed.returncode == 0, resumed.stderr
