"""One run per run folder (issue 18, item 9): a second run is refused with the owner's pid and host,
a lock left by a killed run is taken over with an explanation, nested holders in one process are fine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ReCoKDLib.cli import main
from ReCoKDLib.runlock import LOCK_NAME, RunFolderBusyError, RunFolderLock, StaleLockWarning, read_owner

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")

_HOLD = """
import sys, time
from ReCoKDLib.runlock import RunFolderLock
with RunFolderLock(sys.argv[1], command="recokd distill --out run"):
    print("HELD", flush=True)
    time.sleep(600)
"""


@pytest.fixture()
def holder(tmp_path):
    """Another process holding ``tmp_path / 'run'``."""
    folder = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "HELD"
    yield folder, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    proc.stdout.close()


def test_a_second_run_is_refused_naming_the_owner(holder):
    folder, proc = holder
    with pytest.raises(RunFolderBusyError) as info:
        with RunFolderLock(folder):
            pass
    message = str(info.value)
    assert f"pid {proc.pid} on {socket.gethostname()}" in message and "recokd distill --out run" in message
    assert "choose another --out" in message
    assert read_owner(folder)["pid"] == proc.pid  # the refused run touched nothing


def test_a_lock_left_by_a_killed_run_is_taken_over_and_explained(holder):
    folder, proc = holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert (folder / LOCK_NAME).is_file()  # kill -9 left the file behind
    with pytest.warns(StaleLockWarning, match=rf"stale lock of pid {proc.pid} .*that process is gone"):
        with RunFolderLock(folder) as lock:
            assert read_owner(folder)["pid"] == os.getpid() and lock.stale_owner["pid"] == proc.pid
    assert not (folder / LOCK_NAME).exists()  # released: the file goes


def test_a_lock_of_another_host_is_refused_with_how_to_clear_it(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": 4242, "host": "other-node", "started": time.time(),
                                                "command": "recokd train-teacher"}))
    with pytest.raises(RunFolderBusyError, match=r"pid 4242 on other-node.*another host.*delete .*\.recokd\.lock"):
        RunFolderLock(folder).acquire()


def test_one_process_may_hold_a_folder_twice(tmp_path):
    with RunFolderLock(tmp_path / "run"):
        with RunFolderLock(tmp_path / "run"):
            assert read_owner(tmp_path / "run")["pid"] == os.getpid()
        assert (tmp_path / "run" / LOCK_NAME).is_file()  # the outer holder still holds it
    assert not (tmp_path / "run" / LOCK_NAME).exists()


@pytest.mark.parametrize("command", ["train-teacher", "distill", "demo"])
def test_training_commands_refuse_a_busy_run_folder_before_any_work(holder, tiny_ct_case, capsys, command):
    folder, proc = holder
    args = {"train-teacher": ["train-teacher", "--pairs", f"{tiny_ct_case.image_paths[0]}:{tiny_ct_case.label_path}",
                              "--classes", "background,liver", "--arch", "tiny", "--steps", "1"],
            "distill": ["distill", "preset:hd-bet", "--images", str(tiny_ct_case.image_paths[0]), "--steps", "1"],
            "demo": ["demo", "--teacher-steps", "1", "--student-steps", "1"]}[command]
    before = sorted(p.name for p in folder.iterdir())
    assert main([*args, "--out", str(folder), "--progress", "json"]) == 2
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines()]
    assert [e["event"] for e in events] == ["error"], events  # nothing started: no preprocessing, no download
    assert f"pid {proc.pid}" in events[0]["message"] and captured.err.count("error:") == 1
    assert sorted(p.name for p in folder.iterdir()) == before
