"""ReCoKD: distill, segment and inspect 3D segmentation networks in 3D Slicer.

A thin panel (:class:`ReCoKDWidget`) over a logic (:class:`ReCoKDLogic`) that works from the
Python console without the GUI. Long jobs (distillation, teacher training, inference on large
volumes) run in a child process, ``PythonSlicer -m ReCoKDLib <subcommand> ... --progress json``,
whose JSON-lines progress is read without blocking the GUI (:class:`JobProgress`). The numeric
work lives in ``ReCoKDLib``; ``ReCoKDLib.mrml`` converts between arrays and MRML nodes, and the
scene-level work (segment a volume node, region-mask and overlay nodes, ``.seg.nrrd`` export) is
``ReCoKDLib.mrml.logic.SceneLogic``, which ``recokd serve`` (the browser front end) uses too.
The teacher is a model file, an nnU-Net v2 model folder or a preset (``preset:hd-bet``).

Python console examples::

    logic = slicer.util.getModuleLogic("ReCoKD")
    seg = logic.segment(getNode("CTChest"), "/models/student.pt")              # blocking, in-process
    job = logic.distill("/models/teacher.pt", "/data/Dataset001_CT", "/runs/ct",
                        callback=lambda progress, record: print(progress.etaText()))
    logic.showAffinity(getNode("CTChest"), "/models/teacher.pt", "/models/student.pt",
                       level=0, mapName="difference")
"""

import importlib
import importlib.util
import json
import logging
import math
import os
import pathlib
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Annotated, Callable, Optional, Protocol

import ctk  # noqa: F401  (Slicer's CTK widgets are used through the .ui)
import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _addLibraryToPath() -> None:
    """From a source checkout (module path ``<repo>/ReCoKD``) ``ReCoKDLib`` is the sibling folder;
    in an installed extension it sits beside this file in ``qt-scripted-modules``."""
    for root in (pathlib.Path(__file__).resolve().parent, pathlib.Path(__file__).resolve().parent.parent):
        if (root / "ReCoKDLib" / "__init__.py").is_file():
            if str(root) not in sys.path:
                sys.path.append(str(root))
            return


_addLibraryToPath()

#: packages pip installs on first use (Resources/requirements.txt); Slicer's own copies of
#: these are never replaced.
SLICER_OWNED_PACKAGES = ("SimpleITK", "numpy", "requests", "vtk")
#: choices shown in the panel (the method list mirrors ReCoKDLib.losses.registry.KD_LOSSES)
STUDENT_REDUCTIONS = ("2", "4", "8")
MAP_CHOICES = ("teacher attention", "student attention", "teacher affinity", "student affinity",
               "difference", "region mask")
SEGMENT_MODELS = ("distilled student", "teacher")
#: voxels up to which Segment runs in the Slicer process (faster than starting a child process)
IN_PROCESS_MAX_VOXELS = 160 * 256 * 256
#: how long Cancel waits for the child to write its checkpoint before killing the process tree
CANCEL_GRACE_MS = 20000


#
# ReCoKD
#


class ReCoKD(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ReCoKD")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["ReCoKD contributors"]
        self.parent.helpText = _(
            "Distill a large 3D segmentation network (teacher) into a small, fast student with "
            "region- and context-aware knowledge distillation, segment volumes with either, and "
            "inspect the class-aware region masks and context-affinity maps the distillation "
            "optimised. Long jobs run in a background process and can be cancelled."
        )
        self.parent.acknowledgementText = _(
            "ReCo-KD: Lan et al., region- and context-aware knowledge distillation for efficient 3D "
            "medical image segmentation. Built on MONAI, PyTorch and the SlicerPyTorch extension."
        )


#
# Parameters
#


@parameterNodeWrapper
class ReCoKDParameterNode:
    """The panel's state, saved with the scene (every field is bound in ReCoKD.ui through its
    ``SlicerParameterName`` property)."""

    # Teacher: a model file or an nnU-Net v2 model folder, or a preset (which then wins)
    teacherPath: pathlib.Path
    teacherPreset: str = ""
    # Data
    dataFolder: pathlib.Path
    trainingVolume: vtkMRMLScalarVolumeNode
    trainingSegmentation: vtkMRMLSegmentationNode
    # Distill
    method: str = "recokd"
    studentReduction: Annotated[str, Choice(list(STUDENT_REDUCTIONS))] = "4"
    steps: Annotated[int, WithinRange(1, 1000000)] = 1000
    device: str = "auto"
    outputFolder: pathlib.Path
    resume: bool = False
    # Segment
    inputVolume: vtkMRMLScalarVolumeNode
    roiNode: vtkMRMLMarkupsROINode
    segmentModel: Annotated[str, Choice(list(SEGMENT_MODELS))] = "distilled student"
    studentPath: pathlib.Path
    outputSegmentation: vtkMRMLSegmentationNode
    # Inspect
    inspectLevel: Annotated[int, WithinRange(0, 8)] = 0
    inspectClass: str = ""
    inspectMap: Annotated[str, Choice(list(MAP_CHOICES))] = "teacher attention"
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


#
# Child-process progress (pure Python: no Qt, testable anywhere)
#


def formatDuration(seconds: Optional[float]) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``; empty for unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {(seconds % 3600) // 60:02d} min"


@dataclass
class JobProgress:
    """State of a child job, built from its ``--progress json`` lines (schema: ``ReCoKDLib.progress``).

    ``feed(line)`` takes one line of the child's standard output or error: JSON events update the
    state; any other text (a Python warning, a traceback on stderr) is kept as a log line, so
    nothing the child says is lost.
    """

    stage: str = ""
    step: int = 0
    total: Optional[int] = None
    etaSeconds: Optional[float] = None
    losses: list = field(default_factory=list)  # [(step, total loss)]
    dice: list = field(default_factory=list)  # [(step, mean validation Dice)]
    log: list = field(default_factory=list)
    checkpoints: list = field(default_factory=list)
    error: Optional[str] = None
    resultPath: Optional[str] = None
    done: bool = False

    def fraction(self) -> Optional[float]:
        """Progress in [0, 1] of the current stage; None while unknown."""
        if self.done:
            return 1.0
        if not self.total:
            return None
        return min(max(self.step / self.total, 0.0), 1.0)

    def etaText(self) -> str:
        if self.done:
            return _("Done")
        eta = formatDuration(self.etaSeconds)
        stage = f"{self.stage}: " if self.stage else ""
        count = f"{self.step}/{self.total}" if self.total else ""
        return f"{stage}{count}" + (f", {eta} left" if eta else "")

    def feed(self, line: str) -> Optional[dict]:
        """Update from one output line; returns the parsed event (None for plain text)."""
        text = line.rstrip("\r\n")
        if not text.strip():
            return None
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or "event" not in record:
            self.log.append(text)
            return None
        self._apply(record)
        return record

    def _apply(self, record: dict) -> None:
        event, stage = record.get("event"), record.get("stage", "")
        if stage and event in ("start", "progress"):
            if stage != self.stage:
                self.step, self.total, self.etaSeconds = 0, None, None
            self.stage = stage
        if event == "start":
            self.total = record.get("total") or self.total
            self.log.append(f"[{stage}] " + (record.get("message") or _("started")))
        elif event == "progress":
            self.step = int(record.get("step") or 0)
            self.total = record.get("total") or self.total
            self.etaSeconds = record.get("eta_s")
            loss = _totalLoss(record.get("losses"))
            if loss is not None and stage != "validate":
                self.losses.append((self.step, loss))
        elif event == "metrics":
            metrics = record.get("metrics") or {}
            meanDice = metrics.get("mean_dice")
            if isinstance(meanDice, (int, float)):
                self.dice.append((int(record.get("step", self.step) or self.step), float(meanDice)))
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            self.log.append(f"[{stage}] {shown}" if shown else f"[{stage}] metrics")
        elif event == "checkpoint":
            self.checkpoints.append(record.get("path"))
            self.log.append(f"[{stage}] " + _("checkpoint written: {path}").format(path=record.get("path")))
        elif event in ("log", "warning"):
            prefix = _("warning: ") if event == "warning" else ""
            self.log.append(f"[{stage}] {prefix}{record.get('message', '')}")
        elif event == "error":
            self.error = record.get("message") or _("the job failed without a message")
            self.log.append(f"[{stage}] " + _("error: ") + self.error)
        elif event == "done":
            self.done = True
            # training jobs name the best model (validation Dice) beside the last one
            self.resultPath = record.get("best_path") or record.get("path") or self.resultPath
            self.etaSeconds = 0.0
            self.log.append(f"[{stage}] " + (record.get("message") or _("done")))


def _totalLoss(losses) -> Optional[float]:
    if not isinstance(losses, dict):
        return None
    value = losses.get("total", next((v for v in losses.values() if isinstance(v, (int, float))), None))
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


#
# Command lines (pure)
#


class ReCoKDInputError(ValueError):
    """A panel or console input is missing or invalid; the message says what to provide."""


def pythonSlicerExecutable() -> str:
    """The Python that runs child jobs: Slicer's ``PythonSlicer`` launcher (sets up Slicer's
    environment), else this interpreter (outside Slicer)."""
    return shutil.which("PythonSlicer") or sys.executable


def deviceArguments(device: str) -> tuple:
    """Panel device text -> (``--device`` value, extra environment).

    ``auto`` and ``cpu`` pass through; ``GPU n``/``cuda:n`` pins the child to GPU ``n`` with
    ``CUDA_VISIBLE_DEVICES`` (so every library in the child sees one GPU) and asks for ``cuda``.
    """
    text = (device or "auto").strip().lower()
    if text in ("auto", "cpu"):
        return text, {}
    for prefix in ("gpu", "cuda:", "cuda"):
        if text.startswith(prefix) and text[len(prefix):].strip().isdigit():
            return "cuda", {"CUDA_VISIBLE_DEVICES": text[len(prefix):].strip()}
    if text == "cuda":
        return "cuda", {}
    raise ReCoKDInputError(f"unknown device {device!r}; choose auto, CPU or 'GPU <index>'")


@dataclass
class DistillOptions:
    """What ``recokd distill`` needs (the panel's Distill section)."""

    teacher: str
    dataset: str
    outputFolder: str
    method: str = "recokd"
    reduction: int = 4
    steps: int = 1000
    device: str = "auto"
    resume: bool = False

    def validate(self) -> list:
        """Human-readable problems; empty when the options can run."""
        problems = []
        teacher = str(self.teacher or "")
        if not teacher or not (teacher.startswith("preset:") or pathlib.Path(teacher).exists()):
            problems.append(_("Select a teacher: a weights file, an nnU-Net model folder or a preset "
                              "(or train a teacher first)."))
        if not self.dataset or not pathlib.Path(self.dataset).is_dir():
            problems.append(_("Select labelled data: an nnU-Net folder or a volume + segmentation pair."))
        if not self.outputFolder:
            problems.append(_("Select an output folder for the student and its checkpoints."))
        if int(self.reduction) not in (2, 4, 8):
            problems.append(_("Student width must be divided by 2, 4 or 8."))
        if int(self.steps) < 1:
            problems.append(_("Training needs at least 1 step."))
        return problems


def distillArguments(options: DistillOptions) -> tuple:
    """``(arguments, environment)`` of ``python -m ReCoKDLib distill ...`` for ``options``."""
    deviceValue, env = deviceArguments(options.device)
    args = ["-m", "ReCoKDLib", "distill", str(options.teacher),
            "--data", str(options.dataset),
            "--out", str(options.outputFolder),
            "--kd", str(options.method),
            "--reduction", str(int(options.reduction)),
            "--steps", str(int(options.steps)),
            "--device", deviceValue,
            "--progress", "json"]
    if options.resume:
        args.append("--resume")
    return args, env


def trainTeacherArguments(dataset: str, outputFolder: str, steps: int, device: str = "auto") -> tuple:
    """``(arguments, environment)`` of ``python -m ReCoKDLib train-teacher ...``."""
    deviceValue, env = deviceArguments(device)
    return (["-m", "ReCoKDLib", "train-teacher", "--data", str(dataset), "--out", str(outputFolder),
             "--steps", str(int(steps)), "--device", deviceValue, "--progress", "json"], env)


def segmentArguments(model: str, image: str, output: str, device: str = "auto") -> tuple:
    """``(arguments, environment)`` of ``python -m ReCoKDLib segment MODEL IMAGE OUT ...``."""
    deviceValue, env = deviceArguments(device)
    return (["-m", "ReCoKDLib", "segment", str(model), str(image), str(output),
             "--device", deviceValue, "--progress", "json"], env)


def roiVoxelBox(rasBounds, ijkToRas, shape) -> tuple:
    """Array slices ``(k, j, i)`` of the voxels inside a world box.

    Args:
        rasBounds: ``(xmin, xmax, ymin, ymax, zmin, zmax)`` in RAS mm (``roiNode.GetRASBounds``).
        ijkToRas: the volume's 4x4 IJK-to-RAS matrix.
        shape: array shape ``(D, H, W)``.

    Raises:
        ReCoKDInputError: the box does not overlap the volume.
    """
    import numpy as np

    x0, x1, y0, y1, z0, z1 = (float(b) for b in rasBounds)
    corners = np.array([[x, y, z, 1.0] for x in (x0, x1) for y in (y0, y1) for z in (z0, z1)])
    ijk = (np.linalg.inv(np.asarray(ijkToRas, dtype=float)) @ corners.T)[:3].T
    low = np.maximum(np.floor(ijk.min(axis=0) + 0.5), 0).astype(int)  # voxel centres inside
    high = np.minimum(np.ceil(ijk.max(axis=0) - 0.5) + 1, np.asarray(shape)[::-1]).astype(int)
    if np.any(high <= low):
        raise ReCoKDInputError(_("The ROI does not overlap the input volume; move or resize it."))
    return tuple(slice(int(low[a]), int(high[a])) for a in (2, 1, 0))


def cropGeometry(geometry, box):
    """Geometry of ``array[box]`` (``box`` = slices ``(k, j, i)``): same spacing and direction,
    origin at the first kept voxel."""
    from ReCoKDLib.data.io import Geometry

    start = [box[2].start or 0, box[1].start or 0, box[0].start or 0]
    origin = geometry.index_to_physical([start])[0]
    return Geometry(geometry.spacing, tuple(origin), geometry.direction)


def selectMapKey(keys, level: int, mapChoice: str, className: str = "") -> str:
    """Pick the map for the panel's choices among ``ReCoKDLib.inspection.compute_maps`` keys
    (``"<level>/<name>[/<class>]"``, e.g. ``"0/teacher_spatial_attention"``, ``"1/class_mask/2"``).
    ``className`` is the class part of the key (the class id for ReCo-KD's class masks). The rule
    is the library's (``ReCoKDLib.inspection.select_map_key``), shared with ``recokd serve``.

    Raises:
        ReCoKDInputError: nothing matches; the message lists what is available at that level.
    """
    from ReCoKDLib.inspection import InspectionError, select_map_key

    try:
        return select_map_key(keys, level, mapChoice, className)
    except InspectionError as exc:
        raise ReCoKDInputError(str(exc)) from None


#
# Child processes
#


class ProcessRunner(Protocol):
    """Runs one child process without blocking; injectable (tests use a mock)."""

    def start(self, program: str, arguments: list, environment: dict, onLine: Callable, onFinished: Callable) -> None:
        """Start; ``onLine(text)`` for every line of stdout/stderr, ``onFinished(exitCode)`` once."""

    def isRunning(self) -> bool: ...

    def terminate(self) -> None:
        """Ask politely (SIGTERM to the process tree on POSIX)."""

    def kill(self) -> None:
        """Kill the whole process tree now."""


def descendantPids(pid: int) -> list:
    """Process ids of all descendants of ``pid`` (children first). ``PythonSlicer`` is a launcher
    whose child ``python-real`` does the work, so killing only ``pid`` would leave it running."""
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        pass
    except Exception:  # the process is already gone
        return []
    parents = {}
    for entry in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = entry.read_text()
            parents.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    found, queue = [], [pid]
    while queue:
        for child in parents.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def signalProcessTree(pid: int, sig) -> None:
    """Send ``sig`` to ``pid`` and all its descendants (POSIX; Windows uses ``taskkill /T``)."""
    if os.name == "nt":
        if sig == signal.SIGTERM:
            return  # no polite signal on Windows: the stop file is the request
        import subprocess

        subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True, check=False)
        return
    # the tree is listed before anything is signalled, and the parent goes first, so a launcher
    # cannot start a replacement child or exit cleanly while its children are being stopped
    for target in [pid, *descendantPids(pid)]:
        try:
            os.kill(target, sig)
        except (ProcessLookupError, PermissionError):
            pass


class QProcessRunner:
    """:class:`ProcessRunner` on ``qt.QProcess``: output is read from Qt signals, never blocking."""

    def __init__(self):
        self.process = None
        self._buffers = {"out": "", "err": ""}

    def start(self, program, arguments, environment, onLine, onFinished):
        process = qt.QProcess()
        env = qt.QProcessEnvironment.systemEnvironment()
        for key, value in environment.items():
            env.insert(key, value)
        process.setProcessEnvironment(env)
        process.readyReadStandardOutput.connect(lambda: self._read("out", process.readAllStandardOutput(), onLine))
        process.readyReadStandardError.connect(lambda: self._read("err", process.readAllStandardError(), onLine))

        def finished(exitCode, exitStatus=None):
            for stream in ("out", "err"):
                if self._buffers[stream]:
                    onLine(self._buffers[stream])
                    self._buffers[stream] = ""
            onFinished(int(exitCode))

        process.connect("finished(int,QProcess::ExitStatus)", finished)
        process.connect("errorOccurred(QProcess::ProcessError)",
                        lambda error: onLine(_("could not start {program}: {error}").format(program=program, error=process.errorString())))
        self.process = process
        process.start(program, arguments)

    def _read(self, stream, data, onLine):
        text = self._buffers[stream] + bytes(data).decode("utf-8", errors="replace")
        *lines, self._buffers[stream] = text.split("\n")
        for line in lines:
            onLine(line)

    def isRunning(self):
        return self.process is not None and self.process.state() != qt.QProcess.NotRunning

    def terminate(self):
        if self.isRunning():
            signalProcessTree(int(self.process.processId()), signal.SIGTERM)

    def kill(self):
        if self.isRunning():
            signalProcessTree(int(self.process.processId()), getattr(signal, "SIGKILL", signal.SIGTERM))
            self.process.kill()


def _requirementName(requirement: str) -> str:
    """``"monai>=1.3,<1.7"`` -> ``"monai"``."""
    return re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)


def _qtSchedule(delayMs: int, function: Callable) -> None:
    qt.QTimer.singleShot(delayMs, function)


class ChildJob:
    """One child process with its :class:`JobProgress`, and the cancel sequence.

    Cancel writes ``<outputFolder>/STOP`` and sends SIGTERM (the child then writes a checkpoint
    and exits); if it still runs ``graceMs`` later, the whole process tree is killed.
    """

    def __init__(self, runner, outputFolder=None, callback=None, finished=None,
                 schedule=_qtSchedule, graceMs=CANCEL_GRACE_MS):
        self.runner = runner
        self.outputFolder = pathlib.Path(outputFolder) if outputFolder else None
        self.progress = JobProgress()
        self.callback = callback
        self.finishedCallback = finished
        self.schedule = schedule
        self.graceMs = graceMs
        self.exitCode = None
        self.cancelled = False
        self.killed = False

    def start(self, program, arguments, environment):
        if self.outputFolder is not None:
            self.stopFile.unlink(missing_ok=True)  # an old request must not stop the new run
        self.runner.start(program, arguments, environment, self.onLine, self.onFinished)

    @property
    def stopFile(self):
        return self.outputFolder / "STOP" if self.outputFolder is not None else None

    def onLine(self, line):
        record = self.progress.feed(line)
        if self.callback is not None:
            self.callback(self.progress, record)

    def onFinished(self, exitCode):
        self.exitCode = exitCode
        if exitCode != 0 and not self.cancelled and self.progress.error is None:
            tail = "\n".join(self.progress.log[-20:])
            self.progress.error = _("The background process stopped with exit code {code}.").format(code=exitCode) + (
                "\n" + tail if tail else "")
        if self.finishedCallback is not None:
            self.finishedCallback(self)

    def isRunning(self):
        return self.runner.isRunning()

    def cancel(self):
        """Ask the child to checkpoint and stop; kill the process tree if it does not in time."""
        if not self.runner.isRunning():
            return
        self.cancelled = True
        if self.stopFile is not None:
            self.stopFile.parent.mkdir(parents=True, exist_ok=True)
            self.stopFile.write_text("stop requested by the ReCoKD panel\n")
        self.runner.terminate()
        self.schedule(self.graceMs, self._killIfRunning)

    def _killIfRunning(self):
        if self.runner.isRunning():
            self.killed = True
            self.progress.log.append(_("The process did not stop in time; it was killed."))
            self.runner.kill()


#
# ReCoKDLogic
#


class ReCoKDLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, usable from the Python console and scripts without the GUI.

    Args:
        runnerFactory: makes a :class:`ProcessRunner` per child job (default ``QProcessRunner``).
        schedule: ``schedule(delayMs, function)`` for the cancel timeout (default a Qt timer).
        python: the interpreter for child jobs (default ``PythonSlicer``).
    """

    def __init__(self, runnerFactory=None, schedule=None, python=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.runnerFactory = runnerFactory or QProcessRunner
        self.schedule = schedule or _qtSchedule
        self.python = python
        self.job = None
        self._models = None  # ReCoKDLib.mrml.logic.ModelCache, made on first use
        self._sceneLogic = None

    def getParameterNode(self):
        return ReCoKDParameterNode(super().getParameterNode())

    # -- dependencies ---------------------------------------------------------------------------

    @staticmethod
    def requirementsFile() -> pathlib.Path:
        return pathlib.Path(__file__).resolve().parent / "Resources" / "requirements.txt"

    @classmethod
    def requirements(cls) -> list:
        """Requirement lines of ``Resources/requirements.txt`` (never Slicer's own packages)."""
        lines = [line.split("#")[0].strip() for line in cls.requirementsFile().read_text().splitlines()]
        return [line for line in lines if line]

    @classmethod
    def missingModules(cls) -> list:
        """torch and the requirement names that are not importable yet (found without importing them)."""
        names = ["torch"] + [_requirementName(r) for r in cls.requirements()]
        return [name for name in names if importlib.util.find_spec(name.lower().replace("-", "_")) is None]

    def setupPythonRequirements(self, confirm=True) -> bool:
        """Install what is missing, after one confirmation listing it; returns True when ready.

        torch comes from the PyTorch extension's ``PyTorchUtils`` (matching the GPU's CUDA
        build); the rest from ``Resources/requirements.txt`` with ``slicer.packaging.pip_ensure``
        (Slicer >= 5.12) or ``slicer.util.pip_install``. SimpleITK, numpy, requests and vtk are
        Slicer's and are never installed or replaced.
        """
        missing = self.missingModules()
        if not missing:
            return True
        others = [r for r in self.requirements() if _requirementName(r) in missing
                  and _requirementName(r).lower() not in {p.lower() for p in SLICER_OWNED_PACKAGES}]
        listing = "\n".join(["torch (" + _("through the PyTorch extension") + ")"] * ("torch" in missing) + others)
        size = _("several minutes; torch is 1-3 GB") if "torch" in missing else _("a minute or two")
        if confirm and not slicer.util.confirmOkCancelDisplay(
                _("ReCoKD needs these Python packages, which will be downloaded and installed now ({size}):").format(
                    size=size) + "\n\n" + listing):
            return False
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ImportError as exc:
                raise ReCoKDInputError(_("Install the PyTorch extension from the Extensions Manager and restart Slicer; "
                                         "it installs the torch build that matches your GPU.")) from exc
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=">=2.1") is None:
                raise ReCoKDInputError(_("PyTorch could not be installed; see the Python console for details."))
        packaging = getattr(slicer, "packaging", None)
        if others and packaging is not None and hasattr(packaging, "pip_ensure"):
            from packaging.requirements import Requirement  # the PyPA library, shipped with Slicer's pip

            packaging.pip_ensure([Requirement(r) for r in others], skip_packages=list(SLICER_OWNED_PACKAGES),
                                 prompt_install=False, requester="ReCoKD")  # already confirmed above
        elif others:
            slicer.util.pip_install(others)
        importlib.invalidate_caches()
        return not self.missingModules()

    # -- teacher and data -----------------------------------------------------------------------

    @staticmethod
    def describeModel(path) -> str:
        """One-line summary of a model source: a model file's card (read without torch), an nnU-Net
        model folder's classes and spacing, or a teacher preset (``preset:<name>``).

        Raises:
            ValueError: not a model (``ReCoKDLib.mrml.logic.SceneLogicError``).
        """
        from ReCoKDLib.mrml.logic import describe_model_source

        return describe_model_source(path)

    @staticmethod
    def describeDataset(folder) -> str:
        """Summary of an nnU-Net raw folder: cases, classes and voxel spacing."""
        from ReCoKDLib.data.layout import RawDataset

        dataset = RawDataset.open(folder)
        summary = dataset.summary()
        return _("{n} training / {m} test cases; classes: {classes}").format(
            n=len(dataset.training_cases()), m=len(dataset.test_cases()),
            classes=", ".join(dataset.class_names[1:])) + (
            "; " + _("spacing {s}").format(s=summary["spacing"]) if "spacing" in summary else "")

    def exportSceneCase(self, volumeNode, segmentationNode, folder, classNames=None) -> pathlib.Path:
        """Write a volume + segmentation pair from the scene as a one-case nnU-Net raw dataset.

        Segments map to classes by name (``classNames``, background first); without it, segment
        order defines the classes. Returns the dataset folder.
        """
        if volumeNode is None or segmentationNode is None:
            raise ReCoKDInputError(_("Select both a training volume and its segmentation."))
        return self.sceneLogic(volumeNode.GetScene()).export_scene_case(volumeNode, segmentationNode, folder,
                                                                        classNames)

    def exportSegmentation(self, segmentationNode, path) -> pathlib.Path:
        """Write a segmentation node as ``.seg.nrrd`` (atomic; names and colours kept)."""
        if segmentationNode is None:
            raise ReCoKDInputError(_("Segment a volume first."))
        return self.sceneLogic(segmentationNode.GetScene()).export_segmentation(segmentationNode, path)

    # -- child jobs -----------------------------------------------------------------------------

    def _startJob(self, arguments, environment, outputFolder, callback, finished) -> ChildJob:
        if self.job is not None and self.job.isRunning():
            raise ReCoKDInputError(_("A job is already running; cancel it or wait for it to finish."))
        libraryRoot = str(pathlib.Path(importlib.import_module("ReCoKDLib").__file__).resolve().parent.parent)
        env = {"PYTHONPATH": os.pathsep.join([libraryRoot, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               "PYTHONUNBUFFERED": "1", **environment}
        self.job = ChildJob(self.runnerFactory(), outputFolder, callback, finished, schedule=self.schedule)
        self.job.start(self.python or pythonSlicerExecutable(), arguments, env)
        return self.job

    def distill(self, teacherPath, dataset, outputFolder, method="recokd", reduction=4, steps=1000, device="auto",
                resume=False, callback=None, finished=None) -> ChildJob:
        """Start ``recokd distill`` in a child process; returns the :class:`ChildJob` at once.

        ``callback(progress: JobProgress, record: dict | None)`` is called for every output line,
        ``finished(job)`` once at the end (``job.progress.resultPath`` is the student file).
        """
        options = DistillOptions(str(teacherPath or ""), str(dataset or ""), str(outputFolder or ""),
                                 method, int(reduction), int(steps), device, bool(resume))
        problems = options.validate()
        if problems:
            raise ReCoKDInputError("\n".join(problems))
        arguments, env = distillArguments(options)
        return self._startJob(arguments, env, outputFolder, callback, finished)

    def trainTeacher(self, dataset, outputFolder, steps=1000, device="auto", callback=None, finished=None) -> ChildJob:
        """Start ``recokd train-teacher`` in a child process."""
        if not dataset or not pathlib.Path(dataset).is_dir():
            raise ReCoKDInputError(_("Select labelled data to train a teacher on."))
        arguments, env = trainTeacherArguments(dataset, outputFolder, steps, device)
        return self._startJob(arguments, env, outputFolder, callback, finished)

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    # -- segmentation ---------------------------------------------------------------------------

    def sceneLogic(self, scene):
        """The scene-level logic (``ReCoKDLib.mrml.logic.SceneLogic``) for ``scene``, shared with
        ``recokd serve``; loaded models are kept across calls (a teacher and a student)."""
        from ReCoKDLib.mrml.logic import ModelCache, SceneLogic

        if self._models is None:
            self._models = ModelCache(size=2)
        if self._sceneLogic is None or self._sceneLogic.scene is not scene:
            self._sceneLogic = SceneLogic(scene, self._models)
        return self._sceneLogic

    def _loadModel(self, path, device="auto"):
        from ReCoKDLib.mrml.logic import ModelCache

        if self._models is None:
            self._models = ModelCache(size=2)
        return self._models.get(path, device)

    @staticmethod
    def teacherSource(path="", preset="") -> str:
        """What the Teacher section names: ``preset:<name>`` when a preset is chosen, else the
        path (a model file or an nnU-Net v2 model folder)."""
        from ReCoKDLib.mrml.logic import PRESET_PREFIX

        preset = (preset or "").strip()
        if preset:
            return preset if preset.startswith(PRESET_PREFIX) else PRESET_PREFIX + preset
        return str(path or "")

    @staticmethod
    def teacherPresets() -> list:
        """Names of the teacher presets (``ReCoKDLib.teacher_presets``); empty when unavailable."""
        from ReCoKDLib.mrml.logic import available_presets

        return available_presets()

    def modelClasses(self, source) -> list:
        """Class names (background first) of a model source: a file's card is read without torch;
        folders and presets are loaded (and kept for the next segmentation)."""
        if pathlib.Path(str(source)).is_file():
            from ReCoKDLib.checkpoint import read_model_card

            return list(read_model_card(source).classes)
        return list(self._loadModel(source).card.classes)

    @staticmethod
    def isModelSource(source) -> bool:
        """True for an existing model file, an nnU-Net model folder or a ``preset:`` name."""
        from ReCoKDLib.mrml.logic import SceneLogicError, model_source_kind

        try:
            model_source_kind(source)
        except SceneLogicError:
            return False
        return True

    def segment(self, volumeNode, modelPath, roiNode=None, device="auto", name=None):
        """Segment ``volumeNode`` with a teacher or student (a model file, an nnU-Net model folder
        or ``preset:<name>``), in this process (blocking).

        Returns a new segmentation node on the volume's exact grid with named, coloured segments,
        placed beside the volume in the subject hierarchy. With ``roiNode`` (Markups ROI) only
        the voxels inside it are computed; the rest is background.
        """
        from ReCoKDLib import mrml

        if volumeNode is None:
            raise ReCoKDInputError(_("Select an input volume."))
        if not modelPath or not self.isModelSource(modelPath):
            raise ReCoKDInputError(_("Select a model file (a distilled student or a teacher)."))
        array, geometry = mrml.array_from_volume_node(volumeNode)
        logic = self.sceneLogic(volumeNode.GetScene())
        node = logic.segment(volumeNode, modelPath, self._roiBox(roiNode, geometry, array.shape), device, name)
        self.lastSegmentationSeconds = float(node.GetAttribute("ReCoKD.Seconds") or 0.0)
        return node

    @staticmethod
    def _roiBox(roiNode, geometry, shape):
        if roiNode is None:
            return (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
        bounds = [0.0] * 6
        roiNode.GetRASBounds(bounds)
        return roiVoxelBox(bounds, geometry.ijk_to_ras(), shape)

    def segmentInBackground(self, volumeNode, modelPath, roiNode=None, device="auto", callback=None, finished=None):
        """Segment in a child process (large volumes): the volume (or its ROI crop) is written to
        a temporary NRRD, ``recokd segment`` writes the labels, and ``finished(job, node)`` gets
        the new segmentation node."""
        from ReCoKDLib import mrml
        from ReCoKDLib.data.io import read_image, write_image
        from ReCoKDLib.mrml.logic import SegmentationOutput

        array, geometry = mrml.array_from_volume_node(volumeNode)
        box = self._roiBox(roiNode, geometry, array.shape)
        folder = pathlib.Path(tempfile.mkdtemp(prefix="ReCoKD-segment-"))
        image = write_image(array[box], cropGeometry(geometry, box), folder / "input.nrrd", compress=False)
        output = folder / "labels.nrrd"
        classes = self.modelClasses(modelPath)
        started = time.perf_counter()

        def done(job):
            node = None
            if job.exitCode == 0 and output.is_file():
                import numpy as np

                labels = np.zeros(array.shape, dtype=np.uint8)
                labels[box] = read_image(output)[0]
                result = SegmentationOutput(labels, geometry, list(classes), str(modelPath),
                                            time.perf_counter() - started)
                node = self.sceneLogic(volumeNode.GetScene()).add_segmentation(volumeNode, result)
            shutil.rmtree(folder, ignore_errors=True)
            if finished is not None:
                finished(job, node)

        arguments, env = segmentArguments(modelPath, image, output, device)
        return self._startJob(arguments, env, folder, callback, done)

    # -- inspection -----------------------------------------------------------------------------

    def computeMaps(self, volumeNode, teacherPath, studentPath, labels=None, method=None, device="cpu", roiNode=None):
        """Region masks, attention and affinity maps of teacher and student for ``volumeNode``,
        from the same loss code that trained the student (``ReCoKDLib.inspection.inspect_volume``).

        The volume (or its ROI) is preprocessed as for segmentation (the teacher's spacing and
        normalisation); the adapters and context blocks are the trained ones when the student's
        run folder holds its ``checkpoint.pt`` (``inspection.load_trained_kd_state``); every map
        is brought back to the volume's grid.

        Returns:
            ``{"<level>/<name>[/<class>]": (D, H, W) float32 array}`` on the volume's grid
            (zero outside the ROI).
        """
        from ReCoKDLib import mrml

        if volumeNode is None:
            raise ReCoKDInputError(_("Select an input volume."))
        array, geometry = mrml.array_from_volume_node(volumeNode)
        box = self._roiBox(roiNode, geometry, array.shape)
        return self.sceneLogic(volumeNode.GetScene()).compute_maps(volumeNode, teacherPath, studentPath, labels,
                                                                   method, device, box)

    def _classKey(self, teacherPath, className, device="cpu") -> str:
        from ReCoKDLib.mrml.logic import class_key

        return class_key(self._loadModel(teacherPath, device).card.classes, className)

    def showRegionMask(self, volumeNode, teacherPath, studentPath, level=0, className="", labels=None, roiNode=None):
        """The class-aware region mask of ``level`` (and its weight, as the segment's name) as a
        segmentation node on the volume's grid."""
        maps = self.computeMaps(volumeNode, teacherPath, studentPath, labels, roiNode=roiNode)
        logic = self.sceneLogic(volumeNode.GetScene())
        return logic.add_region_mask(volumeNode, maps, level, self._classKey(teacherPath, className), className)

    def showAffinity(self, volumeNode, teacherPath, studentPath, level=0, mapName="teacher affinity",
                     className="", opacity=0.5, labels=None, roiNode=None):
        """A teacher/student attention or affinity map, or their difference, as a scalar volume
        in the foreground of the slice views with a colour map (diverging for the difference)."""
        maps = self.computeMaps(volumeNode, teacherPath, studentPath, labels, roiNode=roiNode)
        logic = self.sceneLogic(volumeNode.GetScene())
        node = logic.add_overlay(volumeNode, maps, level, mapName, self._classKey(teacherPath, className))
        slicer.util.setSliceViewerLayers(background=volumeNode, foreground=node, foregroundOpacity=opacity)
        return node

    # -- plot -----------------------------------------------------------------------------------

    def updatePlot(self, progress: JobProgress):
        """Loss and validation Dice into table nodes and one plot chart node (saved with the scene)."""
        import numpy as np

        chart = self._plotNode("vtkMRMLPlotChartNode", "ReCoKD training")
        for series, (column, rows, color) in {
            "loss": ("loss", progress.losses, (0.85, 0.3, 0.2)),
            "Dice": ("mean Dice", progress.dice, (0.2, 0.5, 0.85)),
        }.items():
            if not rows:
                continue
            table = self._plotNode("vtkMRMLTableNode", f"ReCoKD {series}")
            slicer.util.updateTableFromArray(table, np.asarray(rows, dtype=float), ["step", column])
            plot = self._plotNode("vtkMRMLPlotSeriesNode", f"ReCoKD {series} series")
            plot.SetAndObserveTableNodeID(table.GetID())
            plot.SetXColumnName("step")
            plot.SetYColumnName(column)
            plot.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            plot.SetColor(*color)
            if not chart.HasPlotSeriesNodeID(plot.GetID()):
                chart.AddAndObservePlotSeriesNodeID(plot.GetID())
        chart.SetXAxisTitle(_("step"))
        return chart

    @staticmethod
    def _plotNode(className, name):
        node = slicer.mrmlScene.GetFirstNode(name, className)
        return node if node is not None else slicer.mrmlScene.AddNewNodeByClass(className, name)


#
# ReCoKDWidget
#


class ReCoKDWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: binds ReCoKD.ui to the parameter node and forwards actions to the logic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._plotViewNode = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ReCoKD.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ReCoKDLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.trainTeacherButton.connect("clicked(bool)", self.onTrainTeacherButton)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.showMapButton.connect("clicked(bool)", self.onShowMapButton)
        self.ui.showRegionMaskButton.connect("clicked(bool)", self.onShowRegionMaskButton)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.teacherPathLineEdit.connect("currentPathChanged(QString)", self.onTeacherChanged)
        self.ui.teacherFolderButton.connect("clicked(bool)", self.onTeacherFolderButton)
        self.ui.teacherPresetComboBox.addItems([""] + self.logic.teacherPresets())
        self.ui.teacherPresetComboBox.connect("currentTextChanged(QString)", lambda text: self.onTeacherChanged())
        self.ui.dataFolderLineEdit.connect("currentPathChanged(QString)", self.onDataChanged)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self.logic is not None and self.logic.job is not None and self.logic.job.isRunning():
            self.logic.cancel()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onReload(self) -> None:
        """Reload ReCoKDLib's submodules too (Python 3.12-safe: ``importlib``, no ``imp``)."""
        for name in sorted((n for n in sys.modules if n == "ReCoKDLib" or n.startswith("ReCoKDLib.")), reverse=True):
            try:
                importlib.reload(sys.modules[name])
            except Exception:  # a submodule that fails to reload must not block the module's reload
                logging.exception("ReCoKD: could not reload %s", name)
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    # -- enabling with reasons ------------------------------------------------------------------

    def _distillProblems(self) -> list:
        p = self._parameterNode
        problems = []
        if not self.logic.isModelSource(self._teacherSource()):
            problems.append(_("Select a teacher: a weights file, an nnU-Net model folder or a preset."))
        if not (p.dataFolder and pathlib.Path(p.dataFolder).is_dir()) and not (p.trainingVolume and p.trainingSegmentation):
            problems.append(_("Select labelled data (a folder, or a volume and its segmentation)."))
        if not p.outputFolder or str(p.outputFolder) in ("", "."):
            problems.append(_("Select an output folder."))
        return problems

    def _segmentProblems(self) -> list:
        p = self._parameterNode
        problems = [] if p.inputVolume else [_("Select an input volume.")]
        if not self._segmentModelPath():
            problems.append(_("Select a model: distill a student, or choose a teacher file."))
        return problems

    def _segmentModelPath(self):
        p = self._parameterNode
        if p.segmentModel == "teacher":
            source = self._teacherSource()
            return source if self.logic.isModelSource(source) else None
        path = p.studentPath
        return str(path) if path and pathlib.Path(path).is_file() else None

    def _checkCanApply(self, caller=None, event=None) -> None:
        if not self._parameterNode:
            return
        running = self.logic.job is not None and self.logic.job.isRunning()
        problems = self._distillProblems()
        self.ui.startButton.text = _("Cancel") if running else _("Start")
        self.ui.startButton.enabled = running or not problems
        self.ui.startButton.toolTip = _("Ask the process to save a checkpoint and stop") if running else (
            "\n".join(problems) or _("Distill a student from the teacher"))
        problems = self._segmentProblems()
        self.ui.segmentButton.enabled = not problems
        self.ui.segmentButton.toolTip = "\n".join(problems) or _("Segment the input volume")
        p = self._parameterNode
        inspectReady = bool(p.inputVolume and self.logic.isModelSource(self._teacherSource())
                            and pathlib.Path(p.studentPath).is_file())
        for button in (self.ui.showMapButton, self.ui.showRegionMaskButton):
            button.enabled = inspectReady
            button.toolTip = "" if inspectReady else _("Needs an input volume, a teacher and a distilled student.")

    # -- actions --------------------------------------------------------------------------------

    def _teacherSource(self) -> str:
        p = self._parameterNode
        return self.logic.teacherSource(p.teacherPath if p.teacherPath else "", p.teacherPreset)

    def onTeacherChanged(self, path=None) -> None:
        """Describe the teacher (file, nnU-Net folder or preset): classes and spacing."""
        if self._parameterNode is None:
            return
        source = self._teacherSource()
        text = ""
        if source and source not in ("", "."):
            try:
                text = self.logic.describeModel(source)
                if pathlib.Path(source).is_file():  # folders and presets are not loaded on the GUI thread
                    self.ui.classComboBox.clear()
                    self.ui.classComboBox.addItems(self.logic.modelClasses(source)[1:])
            except ValueError as exc:
                text = _("Not a usable teacher: {error}").format(error=exc)
        self.ui.teacherInfoLabel.text = text
        self._checkCanApply()

    def onTeacherFolderButton(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(
            self.parent, _("nnU-Net v2 model folder (Trainer__Plans__Configuration)"))
        if folder:
            self._parameterNode.teacherPreset = ""
            self._parameterNode.teacherPath = pathlib.Path(folder)
            self.onTeacherChanged()

    def onDataChanged(self, path) -> None:
        text = ""
        if path and pathlib.Path(path).is_dir():
            try:
                text = self.logic.describeDataset(path)
            except ValueError as exc:
                text = str(exc)
        self.ui.dataSummaryLabel.text = text

    def _ensureRequirements(self) -> bool:
        return self.logic.setupPythonRequirements(confirm=True)

    def _trainingData(self):
        p = self._parameterNode
        if p.dataFolder and pathlib.Path(p.dataFolder).is_dir():
            return str(p.dataFolder)
        folder = pathlib.Path(str(p.outputFolder)) / "scene_dataset"
        return str(self.logic.exportSceneCase(p.trainingVolume, p.trainingSegmentation, folder))

    def onStartButton(self) -> None:
        if self.logic.job is not None and self.logic.job.isRunning():
            self.logic.cancel()
            self.ui.startButton.enabled = False  # until the process has stopped
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start distillation."), waitCursor=True):
            if not self._ensureRequirements():
                return
            p = self._parameterNode
            self.ui.logTextEdit.clear()
            self.logic.distill(self._teacherSource(), self._trainingData(), p.outputFolder, p.method,
                               int(p.studentReduction), p.steps, p.device, p.resume,
                               callback=self._onJobOutput, finished=self._onDistillFinished)
            self._showPlot()
        self._checkCanApply()

    def onTrainTeacherButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start teacher training."), waitCursor=True):
            if not self._ensureRequirements():
                return
            p = self._parameterNode
            self.ui.logTextEdit.clear()
            self.logic.trainTeacher(self._trainingData(), p.outputFolder, p.steps, p.device,
                                    callback=self._onJobOutput, finished=self._onTeacherFinished)
        self._checkCanApply()

    def _onJobOutput(self, progress: JobProgress, record) -> None:
        if progress.log:
            self.ui.logTextEdit.appendPlainText(progress.log[-1])
            del progress.log[:-200]  # the pane keeps everything; the job keeps the tail
        fraction = progress.fraction()
        self.ui.progressBar.maximum = 0 if fraction is None else 1000  # busy indicator while unknown
        self.ui.progressBar.value = int(1000 * (fraction or 0))
        self.ui.etaLabel.text = progress.etaText()
        if record is not None and record.get("event") in ("progress", "metrics"):
            self.logic.updatePlot(progress)

    def _showJobError(self, job) -> bool:
        if job.progress.error and not job.cancelled:
            slicer.util.errorDisplay(_("The background job failed."), detailedText=job.progress.error)
            return True
        return False

    def _onDistillFinished(self, job) -> None:
        if not self._showJobError(job) and job.progress.resultPath:
            self._parameterNode.studentPath = pathlib.Path(job.progress.resultPath)
        self.ui.etaLabel.text = _("Cancelled") if job.cancelled else job.progress.etaText()
        self._checkCanApply()

    def _onTeacherFinished(self, job) -> None:
        if not self._showJobError(job) and job.progress.resultPath:
            self._parameterNode.teacherPath = pathlib.Path(job.progress.resultPath)
        self._checkCanApply()

    def _showPlot(self) -> None:
        chart = self.logic.updatePlot(JobProgress())
        if self._plotViewNode is None:
            self._plotViewNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotViewNode", "ReCoKD plot view")
            self.ui.lossPlotWidget.setMRMLPlotViewNode(self._plotViewNode)
        self._plotViewNode.SetPlotChartNodeID(chart.GetID())

    def onSegmentButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to segment."), waitCursor=True):
            if not self._ensureRequirements():
                return
            p = self._parameterNode
            volume, model = p.inputVolume, self._segmentModelPath()
            voxels = volume.GetImageData().GetNumberOfPoints() if volume.GetImageData() else 0
            if voxels <= IN_PROCESS_MAX_VOXELS:
                self._showSegmentation(self.logic.segment(volume, model, p.roiNode, p.device))
            else:
                self.ui.segmentTimeLabel.text = _("Running in the background...")
                self.logic.segmentInBackground(volume, model, p.roiNode, p.device, callback=self._onJobOutput,
                                               finished=lambda job, node: self._showJobError(job) or self._showSegmentation(node))

    def _showSegmentation(self, node) -> None:
        if node is None:
            return
        self._parameterNode.outputSegmentation = node
        self.ui.show3DButton.setSegmentationNode(node)
        self.ui.segmentTimeLabel.text = _("Segmented in {t}").format(
            t=formatDuration(float(node.GetAttribute("ReCoKD.Seconds") or 0)) or "< 1 s")

    def _inspectArguments(self):
        p = self._parameterNode
        return p.inputVolume, self._teacherSource(), str(p.studentPath), p.inspectLevel, p.inspectClass

    def onShowMapButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to compute the map."), waitCursor=True):
            volume, teacher, student, level, className = self._inspectArguments()
            self.logic.showAffinity(volume, teacher, student, level, self._parameterNode.inspectMap, className,
                                    self._parameterNode.overlayOpacity)

    def onShowRegionMaskButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to compute the region mask."), waitCursor=True):
            volume, teacher, student, level, className = self._inspectArguments()
            self.logic.showRegionMask(volume, teacher, student, level, className)

    def onOpacityChanged(self, value) -> None:
        for name in ("Red", "Yellow", "Green"):
            compositeNode = slicer.app.layoutManager().sliceWidget(name).sliceLogic().GetSliceCompositeNode()
            compositeNode.SetForegroundOpacity(value)


#
# ReCoKDTest
#


class ReCoKDTest(ScriptedLoadableModuleTest):
    """The whole flow inside Slicer: fetch real data, distill a few steps, segment, inspect.

    Needs torch and network access for ``recokd data fetch`` (run from the Slicer self-tests;
    the Qt-free parts are covered by the repository's pytest suite).
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ReCoKDFlow()

    def test_ReCoKDFlow(self):
        import subprocess

        self.delayDisplay("Fetching the sample CT dataset")
        logic = ReCoKDLogic()
        self.assertTrue(logic.setupPythonRequirements(confirm=False))
        work = pathlib.Path(tempfile.mkdtemp(prefix="ReCoKDTest-"))
        python = pythonSlicerExecutable()
        subprocess.run([python, "-m", "ReCoKDLib", "data", "fetch", "--dest", str(work / "data")], check=True)
        dataset = next(p for p in (work / "data").rglob("dataset.json")).parent
        self.assertIn("training", logic.describeDataset(dataset))

        self.delayDisplay("Training a small teacher and distilling a student for a few steps")
        teacherJob = self._runToEnd(lambda done: logic.trainTeacher(dataset, work / "teacher", steps=4, device="cpu",
                                                                    finished=done))
        teacherPath = teacherJob.progress.resultPath
        studentJob = self._runToEnd(lambda done: logic.distill(teacherPath, dataset, work / "student", steps=4,
                                                               device="cpu", finished=done))
        self.assertTrue(studentJob.progress.losses, "distillation reported no loss")
        studentPath = studentJob.progress.resultPath

        self.delayDisplay("Segmenting")
        from ReCoKDLib.data.layout import RawDataset

        case = RawDataset.open(dataset).training_cases()[0]
        volume = slicer.util.loadVolume(str(case.image_paths[0]))
        segmentation = logic.segment(volume, studentPath, device="cpu")
        self.assertGreater(segmentation.GetSegmentation().GetNumberOfSegments(), 0)

        self.delayDisplay("Inspecting")
        overlay = logic.showAffinity(volume, teacherPath, studentPath, level=0, mapName="difference")
        self.assertIsNotNone(overlay.GetDisplayNode().GetColorNode())
        mask = logic.showRegionMask(volume, teacherPath, studentPath, level=0)
        self.assertEqual(mask.GetSegmentation().GetNumberOfSegments(), 1)
        self.delayDisplay("Test passed")

    def _runToEnd(self, start):
        finished = []
        job = start(finished.append)
        while not finished:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertEqual(job.exitCode, 0, job.progress.error)
        self.assertTrue(job.progress.resultPath, "the job wrote no result")
        return job
