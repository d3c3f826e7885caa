"""ReCoKD.py's pure parts, imported with ``sys.modules`` stubs for slicer, qt, ctk and vtk.

The stubs only let the module import; behaviour is tested on the Qt-free logic: progress parsing
(fed by the real ``ReCoKDLib.progress`` reporter), command lines, the cancel sequence with a mock
runner, ROI cropping on an oblique grid, dependency installation and reload.
"""

from __future__ import annotations

import importlib.util
import io
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_PATH = ROOT / "ReCoKD" / "ReCoKD.py"


class Tripwire(AssertionError):
    pass


def _trip(*args, **kwargs):
    raise Tripwire(f"installing at import time: {args} {kwargs}")


def _stub_modules() -> dict[str, types.ModuleType]:
    """Distinct empty base classes (not ``object``) keep the widget's multiple-inheritance MRO."""
    slicer = types.ModuleType("slicer")
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(slm, name, type(name, (), {"__init__": lambda self, *a, **k: None}))
    util = types.ModuleType("slicer.util")
    util.VTKObservationMixin = type("VTKObservationMixin", (), {"__init__": lambda self: None})
    util.pip_install = _trip
    util.confirmOkCancelDisplay = lambda *a, **k: True
    util.errorDisplay = lambda *a, **k: None
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = lambda values: ("Choice", tuple(values))
    pnw.WithinRange = lambda low, high: ("WithinRange", low, high)
    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = _trip
    for name in ("vtkMRMLMarkupsROINode", "vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode"):
        setattr(slicer, name, type(name, (), {}))
    slicer.ScriptedLoadableModule, slicer.util, slicer.i18n = slm, util, i18n
    slicer.parameterNodeWrapper, slicer.packaging = pnw, packaging
    return {"slicer": slicer, "slicer.ScriptedLoadableModule": slm, "slicer.util": util, "slicer.i18n": i18n,
            "slicer.parameterNodeWrapper": pnw, "slicer.packaging": packaging,
            "qt": types.ModuleType("qt"), "ctk": types.ModuleType("ctk"), "vtk": types.ModuleType("vtk")}


@pytest.fixture()
def recokd(monkeypatch):
    """ReCoKD.py loaded under stubs; the real modules are restored after the test."""
    stubs = _stub_modules()
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("ReCoKD_under_stubs", MODULE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._stubs = stubs
    return module


# --------------------------------------------------------------------------------------------
# import


def test_import_installs_nothing_and_keeps_the_widget_mro(recokd):
    # pip_install / pip_ensure are tripwires: the import above would have raised
    widget = recokd.ReCoKDWidget
    assert widget.__mro__[1].__name__ == "ScriptedLoadableModuleWidget"
    assert widget.__mro__[2].__name__ == "VTKObservationMixin"
    assert recokd.ReCoKDParameterNode.__annotations__["steps"] is not None


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


def test_progress_follows_the_reporter_schema(recokd):
    progress = recokd.JobProgress()
    for line in _events_from_reporter():
        progress.feed(line)
    assert progress.stage == "distill" and progress.step == 2 and progress.total == 4
    assert progress.fraction() == pytest.approx(0.5)
    assert progress.losses == [(1, 1.5), (2, 1.2)]
    assert progress.dice == [(2, 0.61)]
    assert progress.checkpoints == ["/runs/ct/checkpoint_last.pt"]
    assert any("checkpoint written: /runs/ct/checkpoint_last.pt" in line for line in progress.log)
    assert progress.log[-1] == "[distill] warning: non-finite loss; step skipped"
    assert progress.error is None and not progress.done


def test_progress_eta_error_done_and_plain_text(recokd):
    progress = recokd.JobProgress()
    progress.feed('{"v":1,"event":"progress","stage":"segment","step":30,"total":120,"eta_s":3725.0,"time":1.0}\n')
    assert progress.etaText() == "segment: 30/120, 1 h 02 min left"
    progress.feed("Traceback (most recent call last):")  # stderr text is kept, not dropped
    progress.feed("   ")
    progress.feed("[1, 2]")  # JSON but not an event
    assert progress.log == ["Traceback (most recent call last):", "[1, 2]"]
    progress.feed('{"v":1,"event":"error","stage":"segment","message":"CUDA out of memory"}')
    assert progress.error == "CUDA out of memory"
    progress.feed('{"v":1,"event":"done","stage":"segment","path":"/tmp/out.nrrd"}')
    assert progress.done and progress.resultPath == "/tmp/out.nrrd" and progress.fraction() == 1.0
    # a new stage restarts the count
    fresh = recokd.JobProgress()
    fresh.feed('{"event":"progress","stage":"preprocess","step":5,"total":5,"eta_s":0}')
    fresh.feed('{"event":"start","stage":"distill","total":100}')
    assert (fresh.stage, fresh.step, fresh.total, fresh.fraction()) == ("distill", 0, 100, 0.0)


def test_format_duration(recokd):
    assert [recokd.formatDuration(s) for s in (None, float("nan"), 42, 185, 7260)] == [
        "", "", "42 s", "3 min 05 s", "2 h 01 min"]


# --------------------------------------------------------------------------------------------
# command lines


def test_distill_command_line_and_device_mapping(recokd):
    options = recokd.DistillOptions("/m/teacher.pt", "/d/Dataset001", "/runs/a", method="ms_ca", reduction=8,
                                    steps=3, device="GPU 1", resume=True)
    args, env = recokd.distillArguments(options)
    assert args[:4] == ["-m", "ReCoKDLib", "distill", "/m/teacher.pt"]
    pairs = dict(zip(args[4:-1:2], args[5::2]))
    assert pairs["--data"] == "/d/Dataset001" and pairs["--out"] == "/runs/a"
    assert pairs["--kd"] == "ms_ca" and pairs["--reduction"] == "8" and pairs["--steps"] == "3"
    assert pairs["--device"] == "cuda" and pairs["--progress"] == "json"
    assert args[-1] == "--resume" and env == {"CUDA_VISIBLE_DEVICES": "1"}
    assert recokd.deviceArguments("auto") == ("auto", {})
    assert recokd.deviceArguments("CPU") == ("cpu", {})
    assert recokd.deviceArguments("cuda:0") == ("cuda", {"CUDA_VISIBLE_DEVICES": "0"})
    with pytest.raises(recokd.ReCoKDInputError, match="unknown device"):
        recokd.deviceArguments("tpu")
    seg_args, _ = recokd.segmentArguments("/m/s.pt", "/tmp/in.nrrd", "/tmp/out.nrrd", "cpu")
    assert seg_args == ["-m", "ReCoKDLib", "segment", "/m/s.pt", "/tmp/in.nrrd", "/tmp/out.nrrd",
                        "--device", "cpu", "--progress", "json"]


@pytest.mark.parametrize("command", ["distill", "train-teacher", "segment"])
def test_command_lines_parse_with_the_real_cli(recokd, command):
    """The panel's command lines are accepted by the CLI's own parsers."""
    from ReCoKDLib import cli

    if importlib.util.find_spec(cli.COMMANDS[command][0]) is None:
        pytest.skip(f"ReCoKDLib's {command} subcommand is not written yet")
    args = {
        "distill": lambda: recokd.distillArguments(recokd.DistillOptions("t.pt", "data", "out", "ms_sard", 8, 5, "GPU 0", True)),
        "train-teacher": lambda: recokd.trainTeacherArguments("data", "out", 5, "cpu"),
        "segment": lambda: recokd.segmentArguments("s.pt", "in.nrrd", "out.nrrd", "auto"),
    }[command]()[0]
    assert args[:3] == ["-m", "ReCoKDLib", command]
    parsed = cli.build_parser(command).parse_args(args[2:])
    assert parsed.command == command and parsed.progress == "json"
    if command == "distill":
        assert (parsed.teacher, parsed.data, parsed.out, parsed.kd, parsed.reduction, parsed.steps, parsed.device,
                parsed.resume) == ("t.pt", "data", "out", "ms_sard", 8, 5, "cuda", True)
    if command == "train-teacher":
        assert (parsed.data, parsed.out, parsed.steps, parsed.device) == ("data", "out", 5, "cpu")


def test_distill_options_say_what_is_missing(recokd, tmp_path):
    problems = recokd.DistillOptions("", str(tmp_path / "nowhere"), "", reduction=3, steps=0).validate()
    assert len(problems) == 5
    assert any("teacher" in p for p in problems) and any("2, 4 or 8" in p for p in problems)


# --------------------------------------------------------------------------------------------
# cancel sequence


class FakeRunner:
    def __init__(self, stops_on_terminate: bool):
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


def test_cancel_asks_first_then_kills_the_tree_after_the_grace_period(recokd, tmp_path):
    scheduled, finished = [], []
    runner = FakeRunner(stops_on_terminate=False)
    job = recokd.ChildJob(runner, tmp_path / "run", finished=finished.append,
                          schedule=lambda ms, fn: scheduled.append((ms, fn)), graceMs=1234)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "STOP").write_text("old request")
    job.start("python", ["-m", "ReCoKDLib", "distill"], {})
    assert not job.stopFile.exists(), "a stale STOP file must not stop the new run"
    job.cancel()
    assert job.stopFile.is_file()
    assert [c[0] for c in runner.calls] == ["start", "terminate"]
    assert [ms for ms, _ in scheduled] == [1234]
    scheduled[0][1]()  # the grace period ends with the child still running
    assert [c[0] for c in runner.calls] == ["start", "terminate", "kill"]
    assert job.killed and job.cancelled and finished == [job]
    assert job.progress.error is None, "a cancelled job is not an error"


def test_cancel_does_not_kill_a_child_that_stopped(recokd, tmp_path):
    scheduled = []
    runner = FakeRunner(stops_on_terminate=True)
    job = recokd.ChildJob(runner, tmp_path, schedule=lambda ms, fn: scheduled.append(fn))
    job.start("python", [], {})
    job.cancel()
    scheduled[0]()
    assert [c[0] for c in runner.calls] == ["start", "terminate"] and not job.killed


def test_failed_child_reports_its_last_output(recokd, tmp_path):
    runner = FakeRunner(stops_on_terminate=False)
    seen = []
    job = recokd.ChildJob(runner, tmp_path, callback=lambda progress, record: seen.append(record))
    job.start("python", [], {})
    runner.onLine("Traceback (most recent call last):")
    runner.onLine("ValueError: teacher has 3 classes, labels have 5")
    runner.onFinished(1)
    assert "exit code 1" in job.progress.error and "labels have 5" in job.progress.error
    assert seen == [None, None]


def test_logic_starts_one_child_with_the_library_on_its_path(recokd, tmp_path):
    runners = []

    def factory():
        runners.append(FakeRunner(stops_on_terminate=True))
        return runners[-1]

    logic = recokd.ReCoKDLogic(runnerFactory=factory, schedule=lambda ms, fn: None, python="/opt/Slicer/bin/PythonSlicer")
    with pytest.raises(recokd.ReCoKDInputError, match="teacher"):
        logic.distill(tmp_path / "missing.pt", tmp_path, tmp_path / "out")
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"weights")
    job = logic.distill(teacher, tmp_path, tmp_path / "out", device="GPU 0", steps=2)
    _, program, arguments, env = runners[0].calls[0]
    assert program == "/opt/Slicer/bin/PythonSlicer" and "--steps" in arguments
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT) and env["CUDA_VISIBLE_DEVICES"] == "0"
    with pytest.raises(recokd.ReCoKDInputError, match="already running"):
        logic.distill(teacher, tmp_path, tmp_path / "out")
    logic.cancel()
    assert job.cancelled and (tmp_path / "out" / "STOP").is_file()


@pytest.mark.skipif(not Path("/proc").is_dir() or os.name != "posix", reason="process-tree walk needs POSIX /proc")
def test_process_tree_is_found_and_killed(recokd):
    parent = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    try:
        deadline = time.monotonic() + 10
        children = []
        while len(children) < 2 and time.monotonic() < deadline:
            children = recokd.descendantPids(parent.pid)
            time.sleep(0.05)
        assert len(children) == 2
        recokd.signalProcessTree(parent.pid, signal.SIGKILL)
        assert parent.wait(timeout=10) != 0
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
                  for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()
                    and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"]
    finally:
        if parent.poll() is None:
            parent.kill()


# --------------------------------------------------------------------------------------------
# ROI, crop geometry, map selection


def test_roi_box_and_crop_geometry_on_an_oblique_grid(recokd):
    from ReCoKDLib.data.io import Geometry

    a = np.deg2rad(25.0)
    direction = (np.cos(a), -np.sin(a), 0.0, np.sin(a), np.cos(a), 0.0, 0.0, 0.0, 1.0)
    geometry = Geometry((0.8, 1.2, 2.0), (10.0, -5.0, 3.0), direction)
    shape = (20, 30, 40)
    ijk_to_ras = geometry.ijk_to_ras()
    # a world box around voxels i 10..14, j 5..9, k 2..4
    corners = np.array([[i, j, k, 1.0] for i in (10, 14) for j in (5, 9) for k in (2, 4)]) @ ijk_to_ras.T
    bounds = [v for axis in range(3) for v in (corners[:, axis].min(), corners[:, axis].max())]
    box = recokd.roiVoxelBox(bounds, ijk_to_ras, shape)
    k, j, i = box
    assert k.start <= 2 and k.stop >= 5 and j.start <= 5 and j.stop >= 10 and i.start <= 10 and i.stop >= 15
    assert all(s.start >= 0 for s in box) and (k.stop, j.stop, i.stop) <= shape
    crop = recokd.cropGeometry(geometry, box)
    np.testing.assert_allclose(crop.index_to_physical([[0, 0, 0]]),
                               geometry.index_to_physical([[i.start, j.start, k.start]]))
    assert crop.spacing == geometry.spacing and crop.direction == geometry.direction
    with pytest.raises(recokd.ReCoKDInputError, match="does not overlap"):
        recokd.roiVoxelBox([1e4, 1e4 + 1, 1e4, 1e4 + 1, 1e4, 1e4 + 1], ijk_to_ras, shape)


def test_select_map_key(recokd):
    # the keys ReCo-KD's loss returns (ReCoKDLib.losses.recokd) through inspection.compute_maps
    keys = ["0/class_mask/1", "0/class_mask/2", "0/fg_mask", "0/teacher_spatial_attention",
            "1/teacher_spatial_attention", "0/discrepancy", "0/teacher_affinity"]
    assert recokd.selectMapKey(keys, 0, "region mask", "2") == "0/class_mask/2"
    assert recokd.selectMapKey(keys, 0, "region mask") == "0/fg_mask"
    assert recokd.selectMapKey(keys, 1, "teacher attention") == "1/teacher_spatial_attention"
    assert recokd.selectMapKey(keys, 0, "difference", "1") == "0/discrepancy"
    with pytest.raises(recokd.ReCoKDInputError, match="class '7'"):
        recokd.selectMapKey(keys, 0, "region mask", "7")
    with pytest.raises(recokd.ReCoKDInputError, match="available: 1/teacher_spatial_attention"):
        recokd.selectMapKey(keys, 1, "student affinity")
    with pytest.raises(recokd.ReCoKDInputError, match="unknown map"):
        recokd.selectMapKey(keys, 0, "saliency")


# --------------------------------------------------------------------------------------------
# dependencies and reload


def test_requirements_never_list_slicers_own_packages(recokd):
    names = [r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in recokd.ReCoKDLogic.requirements()]
    assert names and "monai" in names
    assert not {"simpleitk", "numpy", "requests", "vtk", "torch"} & set(names)


def test_setup_requirements_confirms_once_and_uses_pip_ensure(recokd, monkeypatch):
    logic = recokd.ReCoKDLogic()
    util, packaging = recokd._stubs["slicer.util"], recokd._stubs["slicer.packaging"]
    missing = [["monai", "tqdm"], []]
    monkeypatch.setattr(recokd.ReCoKDLogic, "missingModules", classmethod(lambda cls: missing.pop(0)))
    prompts, installs = [], []
    util.confirmOkCancelDisplay = lambda text, *a, **k: prompts.append(text) or True
    packaging.pip_ensure = lambda reqs, **kw: installs.append((list(reqs), kw))
    assert logic.setupPythonRequirements(confirm=True)
    assert len(prompts) == 1 and "monai" in prompts[0] and "torch" not in prompts[0]
    assert [r.name for r in installs[0][0]] == ["monai", "tqdm"]  # only what is missing
    assert installs[0][1]["prompt_install"] is False  # the one confirmation was ours
    assert {"SimpleITK", "numpy", "requests"} <= set(installs[0][1]["skip_packages"])

    # declined: nothing installed
    missing[:] = [["monai"]]
    util.confirmOkCancelDisplay = lambda *a, **k: False
    packaging.pip_ensure = _trip
    assert logic.setupPythonRequirements(confirm=True) is False

    # Slicer < 5.12 has no slicer.packaging: slicer.util.pip_install is used
    missing[:] = [["scipy"], []]
    del recokd.slicer.packaging
    util.confirmOkCancelDisplay = lambda *a, **k: True
    util.pip_install = lambda reqs: installs.append(("pip_install", list(reqs)))
    assert logic.setupPythonRequirements(confirm=True)
    assert installs[-1][0] == "pip_install"


def test_reload_reloads_every_recokdlib_module(recokd, monkeypatch):
    import ReCoKDLib.progress  # noqa: F401  (make sure a submodule is loaded)

    reloaded, base = [], []
    monkeypatch.setattr(recokd.importlib, "reload", lambda module: reloaded.append(module.__name__))
    monkeypatch.setattr(recokd.ScriptedLoadableModuleWidget, "onReload", lambda self: base.append(True), raising=False)
    widget = recokd.ReCoKDWidget.__new__(recokd.ReCoKDWidget)
    widget.onReload()
    assert "ReCoKDLib.progress" in reloaded and "ReCoKDLib" in reloaded
    assert reloaded.index("ReCoKDLib.progress") < reloaded.index("ReCoKDLib")  # submodules first
    assert all(n == "ReCoKDLib" or n.startswith("ReCoKDLib.") for n in reloaded) and base == [True]


# --------------------------------------------------------------------------------------------
# the logic on a real MRML scene (slicer-core) with tiny networks


@pytest.fixture()
def real_mrml():
    """Import the MRML bridge with the real slicer-core *before* the stubs replace ``slicer``."""
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' is not slicer-core")
    from ReCoKDLib import mrml

    return slicer, mrml


@pytest.fixture()
def recokd_on_core(monkeypatch, real_mrml):
    """ReCoKD.py on the real slicer-core ``slicer`` and ``vtk``; only what slicer-core lacks
    (ScriptedLoadableModule, i18n, parameterNodeWrapper, qt, ctk) is stubbed."""
    slicer, _ = real_mrml
    stubs = _stub_modules()
    for name in ("slicer.ScriptedLoadableModule", "slicer.i18n", "slicer.parameterNodeWrapper", "qt", "ctk"):
        monkeypatch.setitem(sys.modules, name, stubs[name])
        if name.startswith("slicer."):
            monkeypatch.setattr(slicer, name.split(".")[1], stubs[name], raising=False)
    spec = importlib.util.spec_from_file_location("ReCoKD_on_core", MODULE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
        paths[role] = checkpoint.save_model(tmp_path / f"{role}.pt", networks.build_unet(config).state_dict(), card)
    return paths


@pytest.mark.mrml
def test_logic_segments_a_volume_node_inside_its_roi(real_mrml, recokd_on_core, tmp_path):
    recokd = recokd_on_core
    slicer, mrml = real_mrml
    from ReCoKDLib.data.io import Geometry

    scene = slicer.vtkMRMLScene()
    geometry = Geometry((1.0, 1.0, 2.0), (5.0, -3.0, 1.0))
    image = np.random.default_rng(2).normal(size=(10, 20, 18)).astype(np.float32)
    volume = mrml.volume_node_from_array(scene, image, geometry, "ct")
    models = _tiny_models(tmp_path)

    class FakeROI:  # the one method the logic calls on a vtkMRMLMarkupsROINode
        def GetRASBounds(self, bounds):
            corners = np.array([[i, j, k, 1.0] for i in (4, 11) for j in (3, 12) for k in (2, 6)]) @ geometry.ijk_to_ras().T
            bounds[:] = [v for a in range(3) for v in (corners[:, a].min(), corners[:, a].max())]

    logic = recokd.ReCoKDLogic()
    seg = logic.segment(volume, str(models["student"]), roiNode=FakeROI(), device="cpu")
    labels = mrml.labelmap_from_segmentation_node(seg, volume, ["background", "liver", "spleen"])
    assert labels.shape == image.shape
    outside = np.ones(image.shape, bool)
    outside[2:7, 3:13, 4:12] = False
    assert not labels[outside].any(), "voxels outside the ROI must stay background"
    assert seg.GetAttribute("ReCoKD.Model") == str(models["student"]) and float(seg.GetAttribute("ReCoKD.Seconds")) >= 0
    assert seg.GetNodeReferenceID(seg.GetReferenceImageGeometryReferenceRole()) == volume.GetID()


@pytest.mark.mrml
def test_logic_computes_inspection_maps_on_the_volume_grid(real_mrml, recokd_on_core, tmp_path):
    recokd = recokd_on_core
    slicer, mrml = real_mrml
    from ReCoKDLib.data.io import Geometry

    scene = slicer.vtkMRMLScene()
    image = np.random.default_rng(3).normal(size=(9, 13, 11)).astype(np.float32)  # not a multiple of the divisor
    # On the model's own spacing ((D, H, W) = 2 x 1 x 1 mm in the tiny cards), so that the maps,
    # computed on the model's grid as for segmentation, come back voxel for voxel.
    volume = mrml.volume_node_from_array(scene, image, Geometry(spacing=(1.0, 1.0, 2.0)), "ct")
    labels = np.zeros(image.shape, np.int64)
    labels[2:6, 3:9, 2:8] = 1
    labels[6:8, 1:4, 6:10] = 2
    models = _tiny_models(tmp_path)
    logic = recokd.ReCoKDLogic()
    maps = logic.computeMaps(volume, str(models["teacher"]), str(models["student"]), labels=labels)
    assert maps and all(v.shape == image.shape for v in maps.values())
    key = recokd.selectMapKey(maps, 0, "region mask", "1")
    assert key == "0/class_mask/1"
    # ReCo-KD's class masks are weighted by the inverse region size: the class's voxels only
    region = maps[key]
    assert (region[labels == 1] > 0).all() and not region[labels != 1].any()
    assert np.allclose(region[labels == 1], region[labels == 1][0])
    for choice in ("teacher attention", "student attention", "teacher affinity", "student affinity", "difference"):
        assert np.isfinite(maps[recokd.selectMapKey(maps, 0, choice)]).all()


# --------------------------------------------------------------------------------------------
# teacher choice: a model file, an nnU-Net model folder or a preset (issues 8.5, 9.5)


def test_distill_options_accept_a_folder_or_a_preset_as_teacher(recokd, tmp_path):
    for teacher in (str(tmp_path), "preset:hd-bet"):
        problems = recokd.DistillOptions(teacher, str(tmp_path), str(tmp_path / "out")).validate()
        assert problems == [], (teacher, problems)
    args, _ = recokd.distillArguments(recokd.DistillOptions("preset:hd-bet", "data", "out"))
    assert args[3] == "preset:hd-bet"


@pytest.mark.mrml
def test_teacher_sources_of_the_panel(recokd_on_core, tmp_path):
    recokd = recokd_on_core
    logic = recokd.ReCoKDLogic
    models = _tiny_models(tmp_path)
    assert logic.teacherSource(models["teacher"], "") == str(models["teacher"])
    assert logic.teacherSource(models["teacher"], "hd-bet") == "preset:hd-bet"  # a chosen preset wins
    assert logic.teacherSource("", "preset:hd-bet") == "preset:hd-bet"
    assert logic.isModelSource(models["teacher"]) and logic.isModelSource("preset:hd-bet")
    assert not logic.isModelSource(tmp_path / "missing.pt") and not logic.isModelSource("")
    assert not logic.isModelSource(tmp_path), "an empty folder is not an nnU-Net model folder"
    assert "2 classes (liver, spleen)" in logic.describeModel(models["teacher"])
    assert recokd.ReCoKDLogic().modelClasses(models["student"]) == ["background", "liver", "spleen"]
    if importlib.util.find_spec("ReCoKDLib.nnunet") is not None:
        from test_scene_logic import fake_nnunet_folder

        folder = fake_nnunet_folder(tmp_path / "nn")
        assert logic.isModelSource(folder) and "2 classes (liver, spleen)" in logic.describeModel(folder)
    if "hd-bet" in logic.teacherPresets():
        assert "HD-BET" in logic.describeModel("preset:hd-bet")
