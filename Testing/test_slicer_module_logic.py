"""The Slicer module's code (``ReCoKD/ReCoKDModule``) outside Slicer: under ``sys.modules`` stubs
for what slicer-core lacks, and on a real MRML scene (slicer-core) where MRML matters.

Each test that mirrors a Slicer, CTK or PythonQt behaviour names the source it follows.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import slicer_stubs

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# import


def test_import_installs_nothing_and_keeps_the_widget_mro(stubs, code):
    # pip_install / pip_ensure are tripwires: importing everything would have raised
    for name in ("versions", "parameters", "jobProgress", "commandLines", "process", "requirements",
                 "modelChoices", "roi", "logic", "panel", "selfTest"):
        getattr(code, name)
    shell = slicer_stubs.import_shell()
    assert shell.ReCoKDLogic is code.logic.ReCoKDLogic
    assert code.panel.ReCoKDPanel.__mro__[1].__name__ == "VTKObservationMixin"
    assert shell.ReCoKDWidget.__mro__[1].__name__ == "ScriptedLoadableModuleWidget"


# --------------------------------------------------------------------------------------------
# progress parsing


def _events_from_reporter() -> list[str]:
    from ReCoKDLib.progress import JsonLinesReporter

    stream = io.StringIO()
    reporter = JsonLinesReporter(stream)
    reporter.start("distill", total=4)
    reporter.progress("distill", 1, 4, losses={"total": 1.5, "seg": 1.0, "kd": 0.5}, lr=0.01)
    reporter.progress("distill", 2, 4, losses={"total": 1.2, "seg": 0.8, "kd": 0.4}, lr=0.01)
    reporter.metrics("validate", {"mean_dice": 0.61, "dice": {"liver": 0.61}}, step=2)
    reporter.checkpoint("distill", "/runs/ct/checkpoint_last.pt", step=2)
    reporter.warning("distill", "non-finite loss; step skipped")
    return stream.getvalue().splitlines()


def test_progress_follows_the_reporter_schema(code):
    progress = code.jobProgress.JobProgress()
    for line in _events_from_reporter():
        progress.feed(line)
    assert progress.stage == "distill" and progress.step == 2 and progress.total == 4
    assert progress.fraction() == pytest.approx(0.5)
    assert progress.losses == [(1, 1.5), (2, 1.2)]
    assert progress.dice == [(2, 0.61)]
    assert progress.checkpoints == ["/runs/ct/checkpoint_last.pt"]
    assert progress.log[-1] == "[distill] warning: non-finite loss; step skipped"
    assert progress.error is None and not progress.done


def test_each_log_line_is_handed_to_the_log_pane_once(code):
    """Issue 16 (8): the panel appended ``log[-1]`` on every event, so the last line repeated on
    every progress event. ``takeNewLog`` hands each line out once."""
    progress = code.jobProgress.JobProgress()
    pane = []
    for line in _events_from_reporter():
        progress.feed(line)
        pane.extend(progress.takeNewLog())
    assert pane == ["[distill] started", "[validate] mean_dice 0.6100", "[distill] checkpoint written: "
                    "/runs/ct/checkpoint_last.pt", "[distill] warning: non-finite loss; step skipped"]
    for step in range(3, 400):  # a long run keeps a bounded tail and still hands out only new lines
        progress.feed(json.dumps({"event": "log", "stage": "distill", "message": f"line {step}"}))
        assert progress.takeNewLog() == [f"[distill] line {step}"]
    assert len(progress.log) <= code.jobProgress.LOG_TAIL


def test_progress_eta_error_done_and_plain_text(code):
    progress = code.jobProgress.JobProgress()
    progress.feed('{"v":1,"event":"progress","stage":"segment","step":30,"total":120,"eta_s":3725.0,"time":1.0}\n')
    assert progress.etaText() == "segment: 30/120, 1 h 02 min left"
    progress.feed("Traceback (most recent call last):")  # stderr text is kept, not dropped
    progress.feed("   ")
    progress.feed("[1, 2]")  # JSON but not an event
    assert progress.log == ["Traceback (most recent call last):", "[1, 2]"]
    progress.feed('{"v":1,"event":"error","stage":"segment","message":"CUDA out of memory"}')
    assert progress.error == "CUDA out of memory"
    progress.feed('{"v":1,"event":"done","stage":"segment","path":"/tmp/out.nrrd","classes":["background","liver"]}')
    assert progress.done and progress.resultPath == "/tmp/out.nrrd" and progress.fraction() == 1.0
    assert progress.result["classes"] == ["background", "liver"]
    fresh = code.jobProgress.JobProgress()
    fresh.feed('{"event":"progress","stage":"preprocess","step":5,"total":5,"eta_s":0}')
    fresh.feed('{"event":"start","stage":"distill","total":100}')
    assert (fresh.stage, fresh.step, fresh.total, fresh.fraction()) == ("distill", 0, 100, 0.0)


def test_format_duration(code):
    assert [code.jobProgress.formatDuration(s) for s in (None, float("nan"), 42, 185, 7260)] == [
        "", "", "42 s", "3 min 05 s", "2 h 01 min"]


# --------------------------------------------------------------------------------------------
# PythonQt's QByteArray (issue 16 defect 2)


class PythonQtByteArray:
    """What ``QProcess.readAllStandardOutput()`` returns in Slicer: PythonQt's wrapped QByteArray.

    Mirrors MeVisLab/pythonqt (commit 642c06b6): ``src/PythonQtInstanceWrapper.cpp`` builds every
    wrapper type with ``tp_as_buffer = nullptr``, ``tp_as_sequence = nullptr`` and ``nb_index =
    nullptr`` (so ``bytes(obj)`` raises ``TypeError``), ``src/PythonQtConversion.cpp`` no longer
    converts QByteArray to a Python object implicitly, and
    ``generated_cpp_515/com_trolltech_qt_core_builtin/com_trolltech_qt_core_builtin0.h``
    ``PythonQtWrapper_QByteArray::data`` returns ``PyBytes_FromStringAndSize``. Slicer reads
    process output with ``.data()`` (``Modules/Scripted/DICOMLib/DICOMExportScene.py``, v5.10.0).
    """

    def __init__(self, raw: bytes):
        self._raw = raw

    def data(self) -> bytes:
        return self._raw


def test_process_output_is_read_from_pythonqt_byte_arrays(code):
    with pytest.raises(TypeError):
        bytes(PythonQtByteArray(b"x"))  # what the old reader did: every read raised
    runner = code.process.QProcessRunner()
    lines = []
    runner._read("out", PythonQtByteArray(b'{"event":"start","stage":"segment"}\n{"event":"progress",'), lines.append)
    runner._read("out", PythonQtByteArray('"stage":"segment","step":1,"total":2}\nDice 0.9 \xe2\x9c\x93\n'.encode(
        "latin-1")), lines.append)
    assert lines[0] == '{"event":"start","stage":"segment"}'
    assert json.loads(lines[1])["step"] == 1 and lines[2].startswith("Dice 0.9")
    assert code.process.byteArrayText(b"plain bytes") == "plain bytes"


# --------------------------------------------------------------------------------------------
# command lines and devices


def test_distill_command_line_and_device_mapping(code):
    lines = code.commandLines
    options = lines.DistillOptions("/m/teacher.pt", "/d/Dataset001", "/runs/a", method="ms_ca", reduction=8,
                                   steps=3, device="cuda:1", resume=True)
    args, env = lines.distillArguments(options)
    assert args[:4] == ["-m", "ReCoKDLib", "distill", "/m/teacher.pt"]
    pairs = dict(zip(args[4:-1:2], args[5::2]))
    assert pairs["--data"] == "/d/Dataset001" and pairs["--out"] == "/runs/a"
    assert pairs["--kd"] == "ms_ca" and pairs["--reduction"] == "8" and pairs["--steps"] == "3"
    assert pairs["--device"] == "cuda" and pairs["--progress"] == "json"
    assert args[-1] == "--resume" and env == {"CUDA_VISIBLE_DEVICES": "1"}
    assert lines.deviceArguments("auto") == ("auto", {})
    assert lines.deviceArguments("CPU") == ("cpu", {})
    assert lines.deviceArguments("GPU 0") == ("cuda", {"CUDA_VISIBLE_DEVICES": "0"})  # older scenes
    with pytest.raises(lines.ReCoKDInputError, match="Unknown device"):
        lines.deviceArguments("tpu")
    seg_args, _ = lines.segmentArguments("/m/s.pt", "/tmp/in.nrrd", "/tmp/out.nrrd", "cpu")
    assert seg_args == ["-m", "ReCoKDLib", "segment", "/m/s.pt", "/tmp/in.nrrd", "/tmp/out.nrrd",
                        "--device", "cpu", "--progress", "json"]


def test_in_process_devices_are_torch_devices(code):
    """Issue 16 defect 5: "GPU 1" was handed to ``resolve_device`` as is (torch: unknown device)."""
    lines = code.commandLines
    assert [lines.torchDevice(d) for d in ("auto", "CPU", "GPU 0", "gpu1", "cuda:1", "cuda 2", "CUDA")] == [
        "auto", "cpu", "cuda:0", "cuda:1", "cuda:1", "cuda:2", "cuda"]
    choices = lines.deviceChoices(["NVIDIA H100", "RTX 4090"])
    assert [c[0] for c in choices] == ["auto", "cpu", "cuda:0", "cuda:1"]
    assert "RTX 4090" in choices[3][1] and all(c[2] for c in choices)
    torch = pytest.importorskip("torch")
    for device, _text, _tip in choices[1:]:  # every stored value but "auto" (resolve_device's) is torch's
        torch.device(lines.torchDevice(device))


@pytest.mark.parametrize("command", ["distill", "train-teacher", "segment"])
def test_command_lines_parse_with_the_real_cli(code, command):
    from ReCoKDLib import cli

    lines = code.commandLines
    args = {
        "distill": lambda: lines.distillArguments(lines.DistillOptions("t.pt", "data", "out", "ms_sard", 8, 5, "cuda:0", True)),
        "train-teacher": lambda: lines.trainTeacherArguments("data", "out/teacher", 5, "cpu"),
        "segment": lambda: lines.segmentArguments("s.pt", "in.nrrd", "out.nrrd", "auto"),
    }[command]()[0]
    assert args[:3] == ["-m", "ReCoKDLib", command]
    parsed = cli.build_parser(command).parse_args(args[2:])
    assert parsed.command == command and parsed.progress == "json"
    if command == "distill":
        assert (parsed.teacher, parsed.data, parsed.out, parsed.kd, parsed.reduction, parsed.steps, parsed.device,
                parsed.resume, parsed.teacher_outputs, parsed.no_labels) == (
            "t.pt", "data", "out", "ms_sard", 8, 5, "cuda", True, "auto", False)


@pytest.mark.parametrize("command", ["distill", "segment", "train-teacher"])
def test_trusted_entry_points_reach_the_commands_whose_parser_takes_them(code, command):
    """One ``--trust-entry-point NAME`` per trusted name, read back by the CLI's own parser, for the
    commands that load models (``cli.MODEL_COMMANDS``); ``train-teacher`` loads none and its parser
    refuses the option, so its command line never carries it."""
    from ReCoKDLib import cli

    lines = code.commandLines
    trusted = {"mypkg.nets:Big", "another.pkg.mod:Net"}
    args = {
        "distill": lambda: lines.distillArguments(lines.DistillOptions("t.pt", "data", "out"), trusted),
        "segment": lambda: lines.segmentArguments("s.pt", "in.nrrd", "out.nrrd", "cpu", trusted),
        "train-teacher": lambda: lines.trainTeacherArguments("data", "out/teacher", 5, "cpu"),
    }[command]()[0]
    if command == "train-teacher":
        assert command not in cli.MODEL_COMMANDS and "--trust-entry-point" not in args
        with pytest.raises(SystemExit):
            cli.build_parser(command).parse_args(args[2:] + ["--trust-entry-point", "mypkg.nets:Big"])
        return
    assert command in cli.MODEL_COMMANDS
    parsed = cli.build_parser(command).parse_args(args[2:])
    assert parsed.trust_entry_point == ["another.pkg.mod:Net", "mypkg.nets:Big"]
    assert lines.trustArguments(()) == []  # nothing trusted: the command line is as before


def test_the_logic_trusts_by_exact_name_for_its_child_jobs(code, tmp_path):
    runners = []
    logic = _logic(code, runners)
    assert logic.trustedEntryPoints == set(), "a new logic (a new Slicer session) trusts nothing"
    with pytest.raises(code.commandLines.ReCoKDInputError, match="package.module:callable"):
        logic.trustEntryPoint("os.system; rm -rf /")
    assert logic.trustEntryPoint("  torch.nn:Conv3d ") == "torch.nn:Conv3d"
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"weights")
    logic.distill(teacher, tmp_path, tmp_path / "out")
    arguments = runners[0].calls[0][2]
    assert arguments[-2:] == ["--trust-entry-point", "torch.nn:Conv3d"]
    from ReCoKDLib.trust import current_trusted

    assert current_trusted() == frozenset(), "trusting for the panel's jobs trusts nothing process-wide"


def test_an_untrusted_error_record_names_the_entry_point_for_the_panel(code, tmp_path, capsys):
    """The child's JSON ``error`` event (``recokd segment --progress json``, run here in-process)
    carries ``entry_point`` and ``entry_point_source`` (``ReCoKDLib.trust.error_fields``);
    ``JobProgress`` keeps them, so the panel asks about that exact name without parsing text."""
    pytest.importorskip("torch")
    from ReCoKDLib import cli
    from ReCoKDLib.data.io import Geometry, write_image

    model = _entry_point_model(tmp_path)
    image = write_image(np.zeros((8, 8, 8), np.float32), Geometry((2.0, 2.0, 2.0)), tmp_path / "in.nrrd")
    assert cli.main(["segment", str(model), str(image), str(tmp_path / "out.nrrd"), "--progress", "json"]) == 2
    progress = code.jobProgress.JobProgress()
    for line in capsys.readouterr().out.splitlines():
        progress.feed(line)
    assert progress.untrustedEntryPoint == "torch.nn:Conv3d"
    assert progress.untrustedSource == f"the model card of {model}" and "--trust-entry-point" in progress.error
    plain = code.jobProgress.JobProgress()
    plain.feed(json.dumps({"event": "error", "stage": "segment", "message": "disk full"}))
    assert plain.error == "disk full" and plain.untrustedEntryPoint is None


def _entry_point_model(tmp_path, factory="torch.nn:Conv3d"):
    """A model file whose card names ``factory`` (not allow-listed: ``Testing/test_trust.py``)."""
    torch = pytest.importorskip("torch")
    from ReCoKDLib.checkpoint import ModelCard, save_model

    kwargs = {"in_channels": 1, "out_channels": 2, "kernel_size": 1}
    card = ModelCard(architecture={"kind": "entry_point", "factory": factory, "kwargs": kwargs},
                     classes=["background", "organ"], spacing=[2.0, 2.0, 2.0], normalization={"scheme": "zscore"},
                     patch_size=[8, 8, 8])
    torch.manual_seed(0)
    return save_model(tmp_path / "downloaded.pt", torch.nn.Conv3d(**kwargs).state_dict(), card)



# --------------------------------------------------------------------------------------------
# cancel sequence and child jobs


class FakeRunner:
    def __init__(self, stops_on_terminate: bool = True):
        self.calls: list = []
        self.running = False
        self.stops_on_terminate = stops_on_terminate

    def start(self, program, arguments, environment, onLine, onFinished):
        self.calls.append(("start", program, list(arguments), dict(environment)))
        self.running, self.onLine, self.onFinished = True, onLine, onFinished

    def isRunning(self):
        return self.running

    def terminate(self):
        self.calls.append(("terminate",))
        if self.stops_on_terminate:
            self.running = False
            self.onFinished(143)

    def kill(self):
        self.calls.append(("kill",))
        self.running = False
        self.onFinished(-9)

    def finish(self, lines, exit_code=0):
        for line in lines:
            self.onLine(line)
        self.running = False
        self.onFinished(exit_code)


def test_cancel_asks_first_then_kills_the_tree_after_the_grace_period(code, tmp_path):
    scheduled, finished = [], []
    runner = FakeRunner(stops_on_terminate=False)
    job = code.process.ChildJob(runner, tmp_path / "run", finished=finished.append,
                                schedule=lambda ms, fn: scheduled.append((ms, fn)), graceMs=1234)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "STOP").write_text("old request")
    job.start("python", ["-m", "ReCoKDLib", "distill"], {})
    assert not job.stopFile.exists(), "a stale STOP file must not stop the new run"
    job.cancel()
    assert job.stopFile.is_file()
    assert [c[0] for c in runner.calls] == ["start", "terminate"]
    assert [ms for ms, _ in scheduled] == [1234]
    scheduled[0][1]()
    assert [c[0] for c in runner.calls] == ["start", "terminate", "kill"]
    assert job.killed and job.cancelled and finished == [job]
    assert job.progress.error is None, "a cancelled job is not an error"


def test_cancel_does_not_kill_a_child_that_stopped(code, tmp_path):
    scheduled = []
    runner = FakeRunner(stops_on_terminate=True)
    job = code.process.ChildJob(runner, tmp_path, schedule=lambda ms, fn: scheduled.append(fn))
    job.start("python", [], {})
    job.cancel()
    scheduled[0]()
    assert [c[0] for c in runner.calls] == ["start", "terminate"] and not job.killed


def test_failed_child_reports_its_last_output(code, tmp_path):
    runner = FakeRunner(stops_on_terminate=False)
    seen = []
    job = code.process.ChildJob(runner, tmp_path, callback=lambda progress, record: seen.append(record))
    job.start("python", [], {})
    runner.finish(["Traceback (most recent call last):", "ValueError: teacher has 3 classes, labels have 5"], 1)
    assert "exit code 1" in job.progress.error and "labels have 5" in job.progress.error
    assert seen == [None, None]


def _logic(code, runners):
    def factory():
        runners.append(FakeRunner())
        return runners[-1]

    return code.logic.ReCoKDLogic(runnerFactory=factory, schedule=lambda ms, fn: None,
                                  python="/opt/Slicer/bin/PythonSlicer")


def test_logic_starts_one_training_child_with_the_library_on_its_path(code, tmp_path):
    runners = []
    logic = _logic(code, runners)
    with pytest.raises(code.commandLines.ReCoKDInputError, match="teacher"):
        logic.distill(tmp_path / "missing.pt", tmp_path, tmp_path / "out")
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"weights")
    job = logic.distill(teacher, tmp_path, tmp_path / "out", device="cuda:0", steps=2)
    _, program, arguments, env = runners[0].calls[0]
    assert program == "/opt/Slicer/bin/PythonSlicer" and "--steps" in arguments
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT) and env["CUDA_VISIBLE_DEVICES"] == "0"
    with pytest.raises(code.commandLines.ReCoKDInputError, match="already running"):
        logic.distill(teacher, tmp_path, tmp_path / "out")
    assert not logic.isRunning(code.logic.SEGMENT), "a segmentation may run beside a training job"
    logic.cancel()
    assert job.cancelled and (tmp_path / "out" / "STOP").is_file()
    runners[0].finish([])
    image = tmp_path / "scene_000.nii.gz"
    image.write_bytes(b"image")
    logic.distill(teacher, image, tmp_path / "out", teacherOutputs="live", withoutLabels=True)
    arguments = runners[1].calls[0][2]
    assert arguments[arguments.index("--teacher-outputs") + 1] == "live"
    assert arguments[arguments.index("--images") + 1] == str(image) and "--data" not in arguments
    with pytest.raises(code.commandLines.ReCoKDInputError, match="labelled data"):
        logic.distill(teacher, image, tmp_path / "out")  # an image file needs withoutLabels


def test_a_trained_teacher_does_not_block_the_next_distillation(code, tmp_path):
    """Issue 16 (8): "Train a teacher" wrote into the Distill output folder; the engine then refuses
    to distil there ("already holds a run"). The teacher's run goes to ``<out>/teacher``."""
    runners = []
    logic = _logic(code, runners)
    data = tmp_path / "data"
    data.mkdir()
    logic.trainTeacher(data, tmp_path / "out", steps=2)
    teacher_out = runners[0].calls[0][2][runners[0].calls[0][2].index("--out") + 1]
    assert Path(teacher_out) == tmp_path / "out" / "teacher"
    runners[0].finish([json.dumps({"event": "done", "stage": "train-teacher",
                                   "best_path": str(tmp_path / "out" / "teacher" / "model_best.pt")})])
    teacher = tmp_path / "out" / "teacher" / "model_best.pt"
    teacher.parent.mkdir(parents=True)
    teacher.write_bytes(b"weights")
    logic.distill(teacher, data, tmp_path / "out")
    distill_out = runners[1].calls[0][2][runners[1].calls[0][2].index("--out") + 1]
    assert Path(distill_out) == tmp_path / "out" and Path(distill_out) != Path(teacher_out)
    with pytest.raises(code.commandLines.ReCoKDInputError, match="output folder"):
        logic.trainTeacher(data, Path(""))  # an empty path edit


@pytest.mark.skipif(not Path("/proc").is_dir() or os.name != "posix", reason="process-tree walk needs POSIX /proc")
def test_process_tree_is_found_and_killed(code):
    parent = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    try:
        deadline = time.monotonic() + 10
        children = []
        while len(children) < 2 and time.monotonic() < deadline:
            children = code.process.descendantPids(parent.pid)
            time.sleep(0.05)
        assert len(children) == 2
        code.process.signalProcessTree(parent.pid, signal.SIGKILL)
        assert parent.wait(timeout=10) != 0
        deadline = time.monotonic() + 10

        def alive(pid):
            return Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"

        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in children if alive(pid)]
    finally:
        if parent.poll() is None:
            parent.kill()


# --------------------------------------------------------------------------------------------
# ROI, crop geometry, map selection, overlay opacity


def test_roi_box_and_crop_geometry_on_an_oblique_grid(code):
    from ReCoKDLib.data.io import Geometry

    a = np.deg2rad(25.0)
    direction = (np.cos(a), -np.sin(a), 0.0, np.sin(a), np.cos(a), 0.0, 0.0, 0.0, 1.0)
    geometry = Geometry((0.8, 1.2, 2.0), (10.0, -5.0, 3.0), direction)
    shape = (20, 30, 40)
    ijk_to_ras = geometry.ijk_to_ras()
    corners = np.array([[i, j, k, 1.0] for i in (10, 14) for j in (5, 9) for k in (2, 4)]) @ ijk_to_ras.T
    bounds = [v for axis in range(3) for v in (corners[:, axis].min(), corners[:, axis].max())]
    box = code.roi.roiVoxelBox(bounds, ijk_to_ras, shape)
    k, j, i = box
    assert k.start <= 2 and k.stop >= 5 and j.start <= 5 and j.stop >= 10 and i.start <= 10 and i.stop >= 15
    assert all(s.start >= 0 for s in box) and (k.stop, j.stop, i.stop) <= shape
    crop = code.roi.cropGeometry(geometry, box)
    np.testing.assert_allclose(crop.index_to_physical([[0, 0, 0]]),
                               geometry.index_to_physical([[i.start, j.start, k.start]]))
    with pytest.raises(code.commandLines.ReCoKDInputError, match="does not overlap"):
        code.roi.roiVoxelBox([1e4, 1e4 + 1, 1e4, 1e4 + 1, 1e4, 1e4 + 1], ijk_to_ras, shape)


def test_select_map_key(code):
    keys = ["0/class_mask/1", "0/class_mask/2", "0/fg_mask", "0/teacher_spatial_attention",
            "1/teacher_spatial_attention", "0/discrepancy", "0/teacher_affinity"]
    select = code.roi.selectMapKey
    assert select(keys, 0, "region mask", "2") == "0/class_mask/2"
    assert select(keys, 0, "region mask") == "0/fg_mask"
    assert select(keys, 1, "teacher attention") == "1/teacher_spatial_attention"
    assert select(keys, 0, "difference", "1") == "0/discrepancy"
    with pytest.raises(code.commandLines.ReCoKDInputError, match="available: 1/teacher_spatial_attention"):
        select(keys, 1, "student affinity")


def test_overlay_opacity_reaches_every_slice_view(code, stubs):
    """Issue 16 (8): the slider read ``layoutManager().sliceWidget("Red"/"Yellow"/"Green")``, which is
    None for a view never created. ``slicer.util.setSliceViewerLayers(foregroundOpacity=)``
    (``Base/Python/slicer/util.py``, v5.10.0) walks every ``vtkMRMLSliceCompositeNode`` instead."""
    code.logic.ReCoKDLogic.setOverlayOpacity(0.3)
    assert stubs["slicer.util"].layer_calls == [{"foregroundOpacity": 0.3}]


# --------------------------------------------------------------------------------------------
# dependencies, recent models, reload


def test_requirements_never_list_slicers_own_packages(code):
    names = [code.requirements.requirementName(r).lower() for r in code.requirements.requirements()]
    assert names and "monai" in names
    assert not {"simpleitk", "numpy", "requests", "vtk", "torch"} & set(names)


def test_setup_requirements_confirms_once_and_uses_pip_ensure(code, stubs, monkeypatch):
    requirements = code.requirements
    util, packaging = stubs["slicer.util"], stubs["slicer.packaging"]
    missing = [["monai", "tqdm"], []]
    monkeypatch.setattr(requirements, "missingModules", lambda path=None: missing.pop(0))
    prompts, installs = [], []
    util.confirmOkCancelDisplay = lambda text, *a, **k: prompts.append(text) or True
    packaging.pip_ensure = lambda reqs, **kw: installs.append((list(reqs), kw))
    assert requirements.setupPythonRequirements(confirm=True)
    assert len(prompts) == 1 and "monai" in prompts[0] and "torch" not in prompts[0]
    assert [r.name for r in installs[0][0]] == ["monai", "tqdm"]
    assert installs[0][1]["prompt_install"] is False
    assert {"SimpleITK", "numpy", "requests"} <= set(installs[0][1]["skip_packages"])
    missing[:] = [["monai"]]
    util.confirmOkCancelDisplay = lambda *a, **k: False
    packaging.pip_ensure = slicer_stubs._trip
    assert requirements.setupPythonRequirements(confirm=True) is False
    missing[:] = [["scipy"], []]  # Slicer 5.10 has no slicer.packaging: slicer.util.pip_install
    del stubs["slicer"].packaging
    util.confirmOkCancelDisplay = lambda *a, **k: True
    util.pip_install = lambda reqs: installs.append(("pip_install", list(reqs)))
    assert requirements.setupPythonRequirements(confirm=True)
    assert installs[-1][0] == "pip_install"


class IniSettings:
    """``qt.QSettings`` as Slicer configures it (INI format): values come back as text, a missing
    key as None (``DICOM.py`` v5.10.0 compares ``settings.value(...) == "true"``)."""

    def __init__(self):
        self.store = {}

    def value(self, key):
        return self.store.get(key)

    def setValue(self, key, value):
        self.store[key] = str(value)


def test_the_last_used_model_is_remembered(code, tmp_path):
    choices = code.modelChoices
    settings = IniSettings()
    recent = choices.RecentModels(settings)
    assert recent.sources() == []
    recent.remember(str(tmp_path / "a.pt"))
    assert choices.RecentModels(settings).sources() == [str(tmp_path / "a.pt")]  # a new session reads it
    for name in "bcdefghijk":
        recent.remember(str(tmp_path / f"{name}.pt"))
    recent.remember(str(tmp_path / "e.pt"))
    sources = recent.sources()
    assert sources[0] == str(tmp_path / "e.pt") and len(sources) == choices.MAX_RECENT_MODELS
    assert len(set(sources)) == len(sources)
    settings.store[choices.RECENT_MODELS_KEY] = "not json"
    assert recent.sources() == []
    (tmp_path / "run").mkdir()
    assert choices.modelLabel(tmp_path / "run" / "model_best.pt") == "model_best.pt (run)"
    assert choices.modelLabel("preset:hd-bet") == "hd-bet (preset)"
    assert choices.modelLabel(tmp_path / "run") == "run (nnU-Net folder)"


def test_reload_imports_every_module_anew_in_import_order(stubs, monkeypatch):
    """Issue 16 (8): ``importlib.reload`` over ``sys.modules`` in reverse-sorted order reloaded
    ``ReCoKDLib.data.layout`` before ``ReCoKDLib.data.io``, so ``layout.read_image`` kept the old
    function. ``slicer.util.reloadScriptedModule`` (util.py, v5.10.0) re-imports only ReCoKD.py."""
    import ReCoKDLib.data.io  # noqa: F401
    import ReCoKDLib.data.layout  # noqa: F401

    saved = {n: m for n, m in sys.modules.items() if n.split(".")[0] in ("ReCoKDLib", "ReCoKDModule")}
    shell = slicer_stubs.import_shell()
    reimported = []

    def base_reload(self):  # what reloadScriptedModule does: execute ReCoKD.py again
        reimported.append(slicer_stubs.import_shell())

    monkeypatch.setattr(shell.ScriptedLoadableModuleWidget, "onReload", base_reload, raising=False)
    widget = shell.ReCoKDWidget.__new__(shell.ReCoKDWidget)
    widget.panel = None
    old_io = sys.modules["ReCoKDLib.data.io"]
    try:
        widget.onReload()
        assert reimported, "ReCoKD.py was not executed again"
        import ReCoKDLib.data.layout as layout

        new_io = sys.modules["ReCoKDLib.data.io"]
        assert new_io is not old_io, "ReCoKDLib was not imported anew"
        assert layout.read_image is new_io.read_image, "a stale binding survived the reload"
        assert sys.modules["ReCoKDModule.versions"] is not saved.get("ReCoKDModule.versions")
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] in ("ReCoKDLib", "ReCoKDModule")]:
            del sys.modules[name]
        sys.modules.update(saved)


# --------------------------------------------------------------------------------------------
# the logic on a real MRML scene (slicer-core) with tiny networks


@pytest.fixture()
def core(monkeypatch):
    """The module's code on the real slicer-core ``slicer`` and ``vtk``; only what slicer-core
    lacks (ScriptedLoadableModule, i18n, parameterNodeWrapper, qt, ctk) is stubbed."""
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' is not slicer-core")
    from ReCoKDLib import mrml

    keep = slicer_stubs.loaded_modules()
    modules = slicer_stubs.stub_modules()
    slicer_stubs.install(monkeypatch, modules, keep_real=("slicer", "slicer.util", "vtk"))
    logic = slicer_stubs.import_module_code("logic")
    yield slicer, mrml, logic
    slicer_stubs.forget_module_code(keep)


def _tiny_models(tmp_path):
    torch = pytest.importorskip("torch")
    from ReCoKDLib import checkpoint, networks

    torch.manual_seed(0)
    paths = {}
    teacher_config = networks.preset("tiny", num_classes=3)
    for role, config in (("teacher", teacher_config), ("student", networks.derive_student_config(teacher_config, 2))):
        card = checkpoint.ModelCard(
            architecture={"kind": "dynunet", "config": config.to_dict()}, classes=["background", "liver", "spleen"],
            spacing=[2.0, 1.0, 1.0], normalization={"scheme": "zscore"}, patch_size=[8, 16, 16], role=role,
            tap_names=networks.encoder_tap_names(config))
        network = networks.build_unet(config)
        with torch.no_grad():  # a bias towards class 1 so that segments surely appear
            last = [m for m in network.modules() if isinstance(m, torch.nn.Conv3d)][-1]
            last.bias[1] += 5.0
        paths[role] = checkpoint.save_model(tmp_path / f"{role}.pt", network.state_dict(), card)
    return paths


class FakeROI:
    """The one method the logic calls on a vtkMRMLMarkupsROINode."""

    def __init__(self, geometry, i, j, k):
        corners = np.array([[a, b, c, 1.0] for a in i for b in j for c in k]) @ geometry.ijk_to_ras().T
        self.bounds = [v for axis in range(3) for v in (corners[:, axis].min(), corners[:, axis].max())]

    def GetRASBounds(self, bounds):
        bounds[:] = self.bounds


@pytest.mark.mrml
def test_logic_segments_a_volume_node_inside_its_roi(core, tmp_path):
    slicer, mrml, logic_module = core
    from ReCoKDLib.data.io import Geometry

    scene = slicer.vtkMRMLScene()
    geometry = Geometry((1.0, 1.0, 2.0), (5.0, -3.0, 1.0))
    image = np.random.default_rng(2).normal(size=(10, 20, 18)).astype(np.float32)
    volume = mrml.volume_node_from_array(scene, image, geometry, "ct")
    models = _tiny_models(tmp_path)
    logic = logic_module.ReCoKDLogic()
    seg = logic.segment(volume, str(models["student"]), roiNode=FakeROI(geometry, (4, 11), (3, 12), (2, 6)),
                        device="cpu")
    labels = mrml.labelmap_from_segmentation_node(seg, volume, ["background", "liver", "spleen"])
    outside = np.ones(image.shape, bool)
    outside[2:7, 3:13, 4:12] = False
    assert labels[~outside].any() and not labels[outside].any(), "only voxels inside the ROI are segmented"
    assert seg.GetAttribute("ReCoKD.Model") == str(models["student"])


@pytest.mark.mrml
def test_in_process_segment_gets_a_torch_device(core, tmp_path, monkeypatch):
    """Issue 16 defect 5: the panel's device text went to ``resolve_device`` unmapped."""
    slicer, mrml, logic_module = core
    from ReCoKDLib.data.io import Geometry

    scene = slicer.vtkMRMLScene()
    volume = mrml.volume_node_from_array(scene, np.zeros((4, 5, 6), np.float32), Geometry(), "ct")
    model = tmp_path / "m.pt"
    model.write_bytes(b"x")
    logic = logic_module.ReCoKDLogic()
    seen = []
    monkeypatch.setattr(logic.sceneLogic(scene), "segment", lambda node, source, box, device, name: seen.append(device))
    for device in ("GPU 1", "cuda:1", "CPU"):
        logic.segment(volume, str(model), device=device)
    assert seen == ["cuda:1", "cuda:1", "cpu"]


@pytest.mark.mrml
def test_results_follow_the_volumes_parent_transform(core, tmp_path):
    """Issue 16 defect 7: a volume under a 30 mm translation got a segmentation without the
    transform: 30 mm off. Results now observe the volume's transform node (Slicer:
    ``Libs/MRML/Core/vtkMRMLTransformableNode.h`` ``SetAndObserveTransformNodeID``)."""
    slicer, mrml, logic_module = core
    from ReCoKDLib.data.io import Geometry

    scene = slicer.vtkMRMLScene()
    image = np.random.default_rng(4).normal(size=(8, 16, 16)).astype(np.float32)
    volume = mrml.volume_node_from_array(scene, image, Geometry((1.0, 1.0, 2.0)), "ct")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = slicer.util.vtkMatrixFromArray(np.array([[1, 0, 0, 30.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    models = _tiny_models(tmp_path)
    logic = logic_module.ReCoKDLogic()
    seg = logic.segment(volume, str(models["student"]), device="cpu")
    assert seg.GetTransformNodeID() == transform.GetID()
    volume_bounds, seg_bounds = [0.0] * 6, [0.0] * 6
    volume.GetRASBounds(volume_bounds)  # world coordinates: the transform applied
    seg.GetRASBounds(seg_bounds)
    assert seg_bounds[0] >= volume_bounds[0] - 1.0 and seg_bounds[1] <= volume_bounds[1] + 1.0, (seg_bounds,
                                                                                                volume_bounds)
    maps = logic.computeMaps(volume, str(models["teacher"]), str(models["student"]))
    overlay = logic.sceneLogic(scene).add_overlay(volume, maps, 0, "teacher attention")
    mask = logic.sceneLogic(scene).add_region_mask(volume, maps, 0)
    assert overlay.GetTransformNodeID() == mask.GetTransformNodeID() == transform.GetID()


@pytest.mark.mrml
def test_background_segment_keeps_the_model_cards_classes_and_colours(core, tmp_path):
    """Issue 16 (8): the background Segment named segments from the model but dropped its colours;
    it now takes both from the child's ``done`` event, as the in-process path does."""
    slicer, mrml, logic_module = core
    from ReCoKDLib.data.io import Geometry, write_image

    scene = slicer.vtkMRMLScene()
    geometry = Geometry((1.0, 1.0, 2.0), (2.0, 3.0, 4.0))
    volume = mrml.volume_node_from_array(scene, np.zeros((6, 10, 12), np.float32), geometry, "ct")
    box = (slice(1, 5), slice(2, 8), slice(3, 9))
    crop = np.zeros((4, 6, 6), np.uint8)
    crop[1:3, 1:4, 1:4] = 2
    crop[0, 0, 0] = 1
    labels_path = write_image(crop, geometry, tmp_path / "labels.nrrd")
    progress = slicer_stubs.import_module_code("jobProgress").JobProgress()
    colors = [[0, 0, 0], [0.1, 0.2, 0.3], [0.9, 0.8, 0.7]]
    progress.feed(json.dumps({"event": "done", "stage": "segment", "path": str(labels_path), "seconds": 1.5,
                              "classes": ["background", "liver", "spleen"], "colors": colors}))
    node = logic_module.ReCoKDLogic().addBackgroundResult(volume, geometry, (6, 10, 12), box, labels_path, progress,
                                                           "model.pt")
    segmentation = node.GetSegmentation()
    by_name = {segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegment(i).GetColor()
               for i in range(segmentation.GetNumberOfSegments())}
    assert set(by_name) == {"liver", "spleen"}
    np.testing.assert_allclose(by_name["spleen"], colors[2], atol=1e-6)
    np.testing.assert_allclose(by_name["liver"], colors[1], atol=1e-6)
    labels = mrml.labelmap_from_segmentation_node(node, volume, ["background", "liver", "spleen"])
    assert (labels[box] == crop).all() and labels.sum() == crop.sum()
    assert float(node.GetAttribute("ReCoKD.Seconds")) == 1.5


@pytest.mark.mrml
def test_a_scene_volume_alone_is_written_as_one_unlabelled_image(core, tmp_path):
    """Distillation without labels from the scene: the volume on its exact grid, as one image the
    CLI's ``--images`` reads (no label)."""
    slicer, mrml, logic_module = core
    from ReCoKDLib.commands.distill import image_cases
    from ReCoKDLib.data.io import Geometry, read_image

    scene = slicer.vtkMRMLScene()
    geometry = Geometry((1.0, 1.5, 2.0), (5.0, -3.0, 1.0))
    image = np.random.default_rng(3).normal(size=(6, 7, 8)).astype(np.float32)
    volume = mrml.volume_node_from_array(scene, image, geometry, "T1")
    logic = logic_module.ReCoKDLogic()
    path = logic.exportSceneImage(volume, tmp_path / "scene_images")
    assert path == tmp_path / "scene_images" / "scene_000.nii.gz"
    array, written = read_image(path, allow_channels=False)
    np.testing.assert_array_equal(array, image)
    np.testing.assert_allclose(written.spacing, geometry.spacing)
    np.testing.assert_allclose(written.origin, geometry.origin)
    cases = image_cases([str(path)])
    assert [c.case_id for c in cases] == ["scene_000"] and cases[0].label_path is None
    with pytest.raises(ValueError, match="training volume"):
        logic.exportSceneImage(None, tmp_path / "scene_images")


@pytest.mark.mrml
def test_segment_command_reports_classes_for_the_background_route(tmp_path):
    """The child's ``done`` event carries what the parent needs to build the node."""
    pytest.importorskip("torch")
    from ReCoKDLib import cli
    from ReCoKDLib.data.io import Geometry, write_image

    models = _tiny_models(tmp_path)
    image = write_image(np.random.default_rng(1).normal(size=(8, 16, 16)).astype(np.float32),
                        Geometry((1.0, 1.0, 2.0)), tmp_path / "in.nrrd")
    out = io.StringIO()
    sys_stdout = sys.stdout
    sys.stdout = out
    try:
        code = cli.main(["segment", str(models["student"]), str(image), str(tmp_path / "out.nrrd"),
                         "--device", "cpu", "--progress", "json"])
    finally:
        sys.stdout = sys_stdout
    assert code == 0
    done = [json.loads(line) for line in out.getvalue().splitlines() if '"done"' in line][-1]
    assert done["classes"] == ["background", "liver", "spleen"] and "colors" in done


@pytest.mark.mrml
def test_plot_view_node_is_never_one_of_a_closed_scene(core):
    """Issue 16 (8): the panel kept its plot view node; after a scene close it pointed at a node no
    longer in the scene. It is now looked up (by singleton tag) in the current scene each time."""
    slicer, _mrml, logic_module = core
    scene = slicer.vtkMRMLScene()
    logic = logic_module.ReCoKDLogic()
    first = logic.plotViewNode(scene)
    assert logic.plotViewNode(scene) is first and scene.IsNodePresent(first)
    scene.Clear(0)
    again = logic.plotViewNode(scene)
    assert scene.IsNodePresent(again) and again.GetSingletonTag() == logic_module.PLOT_VIEW_TAG


@pytest.mark.mrml
def test_teacher_sources_and_presets_of_the_panel(core, tmp_path):
    _slicer, _mrml, logic_module = core
    logic = logic_module.ReCoKDLogic
    models = _tiny_models(tmp_path)
    assert logic.teacherSource(models["teacher"], "") == str(models["teacher"])
    assert logic.teacherSource(models["teacher"], "hd-bet") == "preset:hd-bet"
    assert logic.isModelSource(models["teacher"]) and logic.isModelSource("preset:hd-bet")
    assert not logic.isModelSource(tmp_path / "missing.pt") and not logic.isModelSource("")
    assert not logic.isModelSource(tmp_path), "an empty folder is not an nnU-Net model folder"
    assert "2 classes (liver, spleen)" in logic.describeModel(models["teacher"])
    assert "hd-bet" in logic.teacherPresets()


@pytest.mark.mrml
def test_in_process_loading_runs_code_a_card_names_only_once_the_logic_trusts_it(core, tmp_path):
    """Segment and inspect load models in Slicer's process: a card naming a non-allow-listed entry
    point is refused (nothing imported) until :meth:`ReCoKDLogic.trustEntryPoint`; the name is read
    off the card (and off a teacher-preset file) before anything is loaded, for the panel to ask."""
    slicer, mrml, logic_module = core
    from ReCoKDLib import cli
    from ReCoKDLib.data.io import Geometry
    from ReCoKDLib.trust import UntrustedCodeError, current_trusted

    model = _entry_point_model(tmp_path)
    scene = slicer.vtkMRMLScene()
    volume = mrml.volume_node_from_array(scene, np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32),
                                         Geometry((2.0, 2.0, 2.0)), "ct")
    logic = logic_module.ReCoKDLogic()
    assert logic.untrustedEntryPoints(model) == [("torch.nn:Conv3d", f"the model card of {model}")]
    assert "1 classes (organ)" in logic.describeModel(model), "describing reads the card: no code runs"
    with pytest.raises(UntrustedCodeError) as info:
        logic.segment(volume, str(model), device="cpu")
    assert info.value.entry_point == "torch.nn:Conv3d"
    with pytest.raises(UntrustedCodeError):
        logic.computeMaps(volume, str(model), str(model))
    logic.trustEntryPoint("torch.nn:Conv3d")
    assert logic.untrustedEntryPoints(model) == []
    node = logic.segment(volume, str(model), device="cpu")
    assert node.GetAttribute("ReCoKD.Model") == str(model)
    assert current_trusted() == frozenset(), "trusted only around the logic's own loading"
    import torch

    scripted = tmp_path / "exported.ts"  # TorchScript: the card's architecture is never built
    torch.jit.trace(torch.nn.Conv3d(1, 2, 1), torch.zeros(1, 1, 4, 4, 4)).save(str(scripted))
    (tmp_path / "exported.json").write_text((tmp_path / "downloaded.json").read_text().replace("Conv3d", "Conv2d"))
    assert logic.untrustedEntryPoints(scripted) == []
    allowed = _entry_point_model(tmp_path / "allowed", "monai.networks.nets:UNet")
    assert logic.untrustedEntryPoints(allowed) == [] and logic.untrustedEntryPoints("preset:hd-bet") == []
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({
        "format": "recokd-teacher-preset", "name": "downloaded", "entry_point": "mypkg.nets:Big", "kwargs": {},
        "weights": "w.pt", "eval_hook": {"factory": "subprocess:run", "args": [["touch", "x"]]},
        "classes": ["background", "organ"], "spacing": [2.0, 2.0, 2.0], "normalization": {"scheme": "zscore"},
        "patch_size": [8, 8, 8]}))
    assert [name for name, _by in logic.untrustedEntryPoints(preset)] == ["mypkg.nets:Big", "subprocess:run"]
    assert all(str(preset.resolve()) in by for _name, by in logic.untrustedEntryPoints(preset))
    runners = []  # the background route: the child gets the same trust on its command line
    logic.runnerFactory = lambda: runners.append(FakeRunner()) or runners[-1]
    logic.schedule = lambda ms, fn: None
    logic.segmentInBackground(volume, str(model), device="cpu")
    parsed = cli.build_parser("segment").parse_args(runners[0].calls[0][2][2:])
    assert parsed.trust_entry_point == ["torch.nn:Conv3d"] and parsed.model == str(model)
    runners[0].finish([])


def test_presets_and_methods_are_listed_without_torch(tmp_path):
    """Issue 16 (8): the preset list was empty until torch was installed (``teacher_presets``
    imports torch). The panel's lists come from ``ReCoKDLib.choices``, which imports no torch."""
    script = ("import sys; sys.modules['torch'] = None\n"  # any torch import now fails
              "from ReCoKDLib.mrml.logic import available_presets\n"
              "from ReCoKDLib.choices import KD_METHODS\n"
              "print(available_presets(), len(KD_METHODS))")
    pytest.importorskip("slicer")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "'hd-bet'" in result.stdout and result.stdout.strip().endswith(" 12")
