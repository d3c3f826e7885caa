"""The panel (``ReCoKDModule/panel.py``) driven through a stand-in of the real ``ReCoKD.ui``.

Every widget of the ``.ui`` becomes a small fake with the signals the panel and Slicer's wrapper
use; the parameter node is a fake ``@parameterNodeWrapper`` whose ``connectGui`` follows
Slicer's ``wrapper.py`` (v5.10.0) ``_connectParametersToGui``: build a connector for every
``SlicerParameterName`` first (with the rules of ``test_slicer_ui_contract.slicer_connector``, so
a pair Slicer refuses raises here too), then write each value and connect each widget. Qt calls
a signal's slots in connection order, and so do the fakes.

The connectors read and write what Slicer's do (``Base/Python/slicer/parameterNodeWrapper/
guiConnectors.py``, v5.10.0): ``QCheckBoxToBoolConnector`` the box's ``checked`` on
``stateChanged``; ``QComboBoxToStringableConnector`` replaces the combo box's items by
``str(choice)`` when it is created, writes ``currentIndex`` (a value not among the choices raises
``ValueError``) and reads ``choices[currentIndex]`` on ``currentIndexChanged``.
"""

from __future__ import annotations

import json
import pathlib
import sys
import types
import typing
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import slicer_stubs
from test_slicer_module_logic import FakeRunner, IniSettings, _entry_point_model
from test_slicer_ui_contract import UI_PATH, slicer_connector

ToolTipRole = 3


class Signal:
    def __init__(self):
        self.slots = []


class FakeWidget:
    def __init__(self, cls, name, properties):
        self.className, self.name, self._properties = cls, name, properties
        self._signals, self._blocked = {}, False
        self.text, self.toolTip, self.enabled, self.value, self.maximum = "", "", True, 0, 1000
        self.currentPath, self.checked, self.node = "", False, None

    def property(self, name):
        return self._properties.get(name)

    def connect(self, signal, slot):
        self._signals.setdefault(signal.split("(")[0], Signal()).slots.append(slot)

    def emit(self, signal, *args):
        """Calls the slots in connection order, each with as many arguments as it takes
        (PythonQt ``src/PythonQtSignalReceiver.cpp`` ``PythonQtSignalTarget::call``: the count is cut
        to the callable's ``co_argcount``, less ``self`` for a bound method)."""
        if self._blocked:
            return
        for slot in list(self._signals.get(signal, Signal()).slots):
            code = getattr(slot, "__code__", None) or getattr(getattr(slot, "__func__", None), "__code__", None)
            if code is not None and not code.co_flags & 0x04:  # no *args
                takes = code.co_argcount - (1 if hasattr(slot, "__self__") else 0)
                slot(*args[:takes])
            else:
                slot(*args)

    def disconnectAll(self, signal):
        self._signals.pop(signal, None)

    def disconnect(self, signal, slot):
        self._signals.get(signal.split("(")[0], Signal()).slots.remove(slot)

    def blockSignals(self, value):
        self._blocked = bool(value)

    # the odd methods the panel calls
    def setMRMLScene(self, scene): pass
    def setMenu(self, menu): self.menu = menu
    def setPopupMode(self, mode): pass
    def setSegmentationNode(self, node): self.node = node
    def setMRMLPlotViewNode(self, node): self.node = node
    def clear(self): self.lines = []
    def appendPlainText(self, line): self.lines = getattr(self, "lines", []) + [line]


class FakeCombo(FakeWidget):
    def __init__(self, *args):
        super().__init__(*args)
        self.items, self._current = [], -1

    def addItem(self, text, data=None):
        self.items.append({"text": text, "data": data, "tip": None})
        if self._current < 0:
            self.setCurrentIndex(0)

    def clear(self):
        self.items, self._current = [], -1

    def setItemData(self, index, value, role):
        assert role == ToolTipRole
        self.items[index]["tip"] = value

    def findData(self, value):
        return next((i for i, item in enumerate(self.items) if item["data"] == value), -1)

    def setCurrentIndex(self, index):
        if index != self._current:
            self._current = index
            self.emit("currentIndexChanged", index)

    @property
    def currentIndex(self):
        return self._current

    @currentIndex.setter
    def currentIndex(self, index):
        self.setCurrentIndex(index)

    @property
    def currentData(self):
        return self.items[self._current]["data"] if 0 <= self._current < len(self.items) else None

    def userPicks(self, data):
        self.setCurrentIndex(self.findData(data))


def fake_ui():
    root = ET.parse(UI_PATH).getroot()
    widgets = {}
    for element in root.iter("widget"):
        props = {p.get("name"): p.findtext("string") for p in element.findall("property")}
        cls = element.get("class")
        widgets[element.get("name")] = (FakeCombo if cls == "QComboBox" else FakeWidget)(cls, element.get("name"), props)
    return widgets


class FakeParameterNode:
    """Fields and defaults of ``ReCoKDParameterNode``; setting a field fires ``ModifiedEvent``."""

    def __init__(self, parameters_module, stubs):
        cls = parameters_module.ReCoKDParameterNode
        object.__setattr__(self, "_fields", typing.get_type_hints(cls, include_extras=True))
        object.__setattr__(self, "_stubs", stubs)
        object.__setattr__(self, "observers", [])
        object.__setattr__(self, "guis", {})
        for name, annotation in self._fields.items():
            base = typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation
            default = getattr(cls, name, None)
            if default is None:
                default = pathlib.Path() if base is pathlib.Path else None  # PathSerializer.default
            object.__setattr__(self, name, default)

    def __setattr__(self, name, value):
        assert name in self._fields, name
        if getattr(self, name) != value:
            object.__setattr__(self, name, value)
            for observer in list(self.observers):
                observer(self, "ModifiedEvent")

    def connectGui(self, ui):
        bound = {w.property("SlicerParameterName"): w for w in vars(ui).values() if w.property("SlicerParameterName")}
        connectors = {name: slicer_connector(w.className, self._fields[name], self._stubs) for name, w in bound.items()}
        for name, widget in bound.items():  # QComboBoxToStringableConnector.__init__: the items become the choices
            if connectors[name] == "QComboBoxToStringableConnector":
                widget.clear()
                for choice in self._choices(name):
                    widget.addItem(str(choice))
        tag = len(self.guis) + 1
        self.guis[tag] = []
        for name, widget in bound.items():
            self._write(widget, connectors[name], getattr(self, name), name)
            signal = {"ctkPathLineEditToPathConnector": "currentPathChanged",
                      "qMRMLNodeComboBoxToNodeConnector": "currentNodeChanged",
                      "QCheckBoxToBoolConnector": "stateChanged",
                      "QComboBoxToStringableConnector": "currentIndexChanged"}.get(connectors[name], "valueChanged")
            slot = (lambda *args, name=name, widget=widget, connector=connectors[name]:
                    setattr(self, name, self._read(widget, connector, name)))
            widget.connect(signal, slot)
            self.guis[tag].append((widget, signal, slot))
        return tag

    def disconnectGui(self, tag):
        for widget, signal, slot in self.guis.pop(tag, []):  # each connector's onChanged(None): _disconnect
            widget.disconnect(signal, slot)

    def _choices(self, name):
        annotation = self._fields[name]
        choice = self._stubs["slicer.parameterNodeWrapper"].Choice
        return next(a for a in annotation.__metadata__ if isinstance(a, choice)).choices

    def _write(self, widget, connector, value, name):
        if connector == "ctkPathLineEditToPathConnector":
            widget.currentPath = str(value)
        elif connector == "qMRMLNodeComboBoxToNodeConnector":
            widget.node = value
        elif connector == "QComboBoxToStringableConnector":
            widget.currentIndex = self._choices(name).index(value)  # ValueError for a value not among them
        elif connector == "QCheckBoxToBoolConnector":
            widget.checked = value
        else:
            widget.value = value

    def _read(self, widget, connector, name):
        if connector == "ctkPathLineEditToPathConnector":
            return pathlib.Path(widget.currentPath)  # ctkPathLineEditToPathConnector.read
        if connector == "qMRMLNodeComboBoxToNodeConnector":
            return widget.node
        if connector == "QComboBoxToStringableConnector":
            return self._choices(name)[widget.currentIndex]
        if connector == "QCheckBoxToBoolConnector":
            return widget.checked
        return widget.value


class FakeNode:
    def __init__(self, name):
        self.name = name

    def GetName(self):
        return self.name


@pytest.fixture()
def harness(monkeypatch, tmp_path):
    keep = slicer_stubs.loaded_modules()
    stubs = slicer_stubs.stub_modules()
    ui = fake_ui()
    qt, util, vtk = stubs["qt"], stubs["slicer.util"], stubs["vtk"]
    qt.Qt = types.SimpleNamespace(ToolTipRole=ToolTipRole)
    qt.QToolButton = types.SimpleNamespace(InstantPopup=2)
    qt.QMenu = lambda parent=None: types.SimpleNamespace(addAction=lambda text: FakeWidget("QAction", text, {}))
    qt.QFileDialog = types.SimpleNamespace(getOpenFileName=lambda *a: "", getExistingDirectory=lambda *a: "")
    qt.QTimer = types.SimpleNamespace(singleShot=lambda ms, fn: None)
    vtk.vtkCommand = types.SimpleNamespace(ModifiedEvent="ModifiedEvent")
    scene = types.SimpleNamespace(StartCloseEvent="StartClose", EndCloseEvent="EndClose", observers=[],
                                  GetFirstNodeByClass=lambda cls: None)
    stubs["slicer"].mrmlScene = scene
    root = FakeWidget("qMRMLWidget", "ReCoKD", {})
    util.loadUI = lambda path: root
    util.childWidgetVariables = lambda widget: types.SimpleNamespace(**ui)
    errors = []
    util.errorDisplay = lambda text, **kw: errors.append((text, kw))

    class TryWithErrorDisplay:
        def __init__(self, message, waitCursor=False):
            self.message = message

        def __enter__(self):
            return self

        def __exit__(self, kind, exc, tb):
            if exc is not None:
                errors.append((self.message, str(exc)))
            return True

    util.tryWithErrorDisplay = TryWithErrorDisplay

    def addObserver(self, obj, event, callback):
        obj.observers.append(callback)

    def removeObserver(self, obj, event, callback):
        if callback in obj.observers:
            obj.observers.remove(callback)

    util.VTKObservationMixin = type("VTKObservationMixin", (), {
        "__init__": lambda self: None, "addObserver": addObserver, "removeObserver": removeObserver,
        "removeObservers": lambda self: None})
    slicer_stubs.install(monkeypatch, stubs)
    parameters = slicer_stubs.import_module_code("parameters")
    logic_module = slicer_stubs.import_module_code("logic")
    panel_module = slicer_stubs.import_module_code("panel")
    runners = []

    def make_logic():
        logic = logic_module.ReCoKDLogic(runnerFactory=lambda: runners.append(FakeRunner()) or runners[-1],
                                         schedule=lambda ms, fn: None, python="python")
        node = FakeParameterNode(parameters, stubs)
        logic.getParameterNode = lambda: node
        logic.gpuNames = lambda: ["Test GPU"]
        logic.setupPythonRequirements = lambda confirm=True: True
        return logic

    settings = IniSettings()

    def make_panel(logic=None):
        for widget in ui.values():  # a fresh .ui: no slots left from an earlier panel
            widget._signals = {}
        return panel_module.ReCoKDPanel(types.SimpleNamespace(addWidget=lambda w: None), UI_PATH,
                                        logic or make_logic(), panel_module.RecentModels(settings))

    yield types.SimpleNamespace(ui=ui, make_panel=make_panel, runners=runners, errors=errors, settings=settings,
                                stubs=stubs, logic_module=logic_module, tmp=tmp_path)
    slicer_stubs.forget_module_code(keep)


def _model(path, classes):
    """A model file whose card the panel reads without torch (the sidecar .json of save_model)."""
    torch = pytest.importorskip("torch")
    from ReCoKDLib import checkpoint, networks

    config = networks.preset("tiny", num_classes=len(classes))
    card = checkpoint.ModelCard(architecture={"kind": "dynunet", "config": config.to_dict()}, classes=list(classes),
                                spacing=[2.0, 1.0, 1.0], normalization={"scheme": "zscore"}, patch_size=[8, 16, 16])
    torch.manual_seed(0)
    return checkpoint.save_model(path, networks.build_unet(config).state_dict(), card)


def test_the_panel_connects_and_fills_its_lists(harness):
    panel = harness.make_panel()
    ui = harness.ui
    assert panel._parameterNodeGuiTag is not None, "connectGui must succeed with Slicer's connector rules"
    methods = ui["methodComboBox"].items
    assert methods[0]["data"] == "recokd" and methods[0]["text"] == "ReCo-KD (regions + context)"
    assert all(item["tip"] for item in methods) and len(methods) == 12
    assert [i["data"] for i in ui["deviceComboBox"].items] == ["auto", "cpu", "cuda:0"]
    assert "hd-bet" in [i["data"] for i in ui["teacherPresetComboBox"].items]
    # nothing chosen yet: every action says what is missing
    assert not ui["segmentButton"].enabled and "Select a volume" in ui["segmentButton"].toolTip
    assert not ui["startButton"].enabled and "labelled data" in ui["startButton"].toolTip
    assert not ui["trainTeacherButton"].enabled and "output folder" in ui["trainTeacherButton"].toolTip


def test_the_teacher_description_follows_the_chosen_file_at_once(harness, tmp_path):
    """Issue 16 defect 6: a ``currentPathChanged`` slot connected before the wrapper's own read the
    previous path (Qt calls slots in connection order). The description is now computed from the
    parameter node's ModifiedEvent."""
    first = _model(tmp_path / "a" / "teacher.pt", ["background", "liver"])
    second = _model(tmp_path / "b" / "teacher.pt", ["background", "liver", "spleen", "kidney"])
    panel = harness.make_panel()
    edit = harness.ui["teacherPathLineEdit"]
    for model, expected in ((first, "1 classes (liver)"), (second, "3 classes (liver, spleen, kidney)")):
        edit.currentPath = str(model)
        edit.emit("currentPathChanged", str(model))
        assert expected in harness.ui["teacherInfoLabel"].text
    assert [i["data"] for i in harness.ui["classComboBox"].items] == ["", "liver", "spleen", "kidney"]
    harness.ui["classComboBox"].userPicks("spleen")
    assert panel._parameterNode.inspectClass == "spleen"


def test_an_emptied_path_edit_disables_what_needs_the_folder(harness, tmp_path):
    """Issue 16 defect 4 at the panel: an empty edit reads back as Path(".") (an existing folder)."""
    panel = harness.make_panel()
    ui = harness.ui
    data = tmp_path / "data"
    data.mkdir()
    for name, value in (("dataFolderLineEdit", str(data)), ("outputFolderLineEdit", str(tmp_path / "out"))):
        ui[name].currentPath = value
        ui[name].emit("currentPathChanged", value)
    assert ui["trainTeacherButton"].enabled
    ui["dataFolderLineEdit"].currentPath = ""
    ui["dataFolderLineEdit"].emit("currentPathChanged", "")
    assert panel._parameterNode.dataFolder == pathlib.Path(".")
    assert not ui["trainTeacherButton"].enabled and "labelled data" in ui["trainTeacherButton"].toolTip


def test_segment_runs_in_the_background_with_cancel_and_remembers_the_model(harness, tmp_path, monkeypatch):
    model = _model(tmp_path / "student.pt", ["background", "liver"])
    panel = harness.make_panel()
    ui, p = harness.ui, panel._parameterNode
    started = []

    def segmentInBackground(volume, source, roi, device, callback, finished):
        job = panel.logic._startJob("segment", ["-m", "ReCoKDLib", "segment"], {}, None, callback,
                                    lambda job: finished(job, None if job.cancelled else FakeSegmentation()))
        started.append((volume, source, device))
        return job

    class FakeSegmentation:
        def GetAttribute(self, name):
            return "2.5"

        def GetSegmentation(self):
            return types.SimpleNamespace(GetNumberOfSegments=lambda: 1)

    monkeypatch.setattr(panel.logic, "segmentInBackground", segmentInBackground)
    p.inputVolume = FakeNode("CT")
    assert not ui["segmentButton"].enabled and "Choose a model" in ui["segmentButton"].toolTip
    p.segmentModel = str(model)
    assert ui["segmentButton"].enabled and "1 classes (liver)" in ui["modelInfoLabel"].text
    ui["deviceComboBox"].userPicks("cuda:0")
    ui["segmentButton"].emit("clicked", True)
    assert started == [(p.inputVolume, str(model), "cuda:0")]
    assert ui["segmentButton"].text == "Cancel" and ui["segmentButton"].enabled
    runner = harness.runners[-1]
    runner.onLine(json.dumps({"event": "progress", "stage": "segment", "step": 1, "total": 4, "eta_s": 3}))
    assert ui["segmentProgressBar"].value == 250 and "1/4" in ui["segmentStatusLabel"].text
    runner.finish([json.dumps({"event": "done", "stage": "segment", "path": "x"})])
    assert ui["segmentButton"].text == "Segment" and "1 segments in 2 s" in ui["segmentStatusLabel"].text
    assert harness.errors == []
    # cancel while running
    ui["segmentButton"].emit("clicked", True)
    ui["segmentButton"].emit("clicked", True)
    assert harness.runners[-1].calls[-1] == ("terminate",)
    assert ui["segmentStatusLabel"].text == "Cancelled"
    # a new session (new panel, same settings) starts with the last used model
    again = harness.make_panel()
    assert again._parameterNode.segmentModel == str(model)
    assert harness.ui["modelComboBox"].currentData == str(model)


def _distill_panel(harness, tmp_path, monkeypatch, teacher):
    """A panel with ``teacher``, an empty data folder and an output folder chosen (no plot)."""
    panel = harness.make_panel()
    ui, p = harness.ui, panel._parameterNode
    monkeypatch.setattr(panel, "_showPlot", lambda: None)
    monkeypatch.setattr(panel.logic, "updatePlot", lambda progress: None)
    data = tmp_path / "data"
    data.mkdir()
    p.teacherPath, p.dataFolder, p.outputFolder = teacher, data, tmp_path / "out"
    return panel, ui, p


def test_distillation_log_and_result(harness, tmp_path, monkeypatch):
    teacher = _model(tmp_path / "teacher.pt", ["background", "liver"])
    panel, ui, p = _distill_panel(harness, tmp_path, monkeypatch, teacher)
    ui["methodComboBox"].userPicks("cirkd")
    assert p.method == "cirkd" and ui["startButton"].enabled
    ui["startButton"].emit("clicked", True)
    runner = harness.runners[-1]
    arguments = runner.calls[0][2]
    assert arguments[arguments.index("--kd") + 1] == "cirkd"
    for step in (1, 2, 3):
        runner.onLine(json.dumps({"event": "progress", "stage": "distill", "step": step, "total": 3,
                                  "losses": {"total": 1.0}}))
    runner.onLine(json.dumps({"event": "log", "stage": "distill", "message": "hello"}))
    student = tmp_path / "out" / "model_best.pt"
    runner.finish([json.dumps({"event": "done", "stage": "distill", "best_path": str(student)})])
    assert ui["logTextEdit"].lines == ["[distill] hello", "[distill] done"]
    assert p.studentPath == student and p.segmentModel == str(student)


def test_scene_data_route_is_reachable_with_empty_folder_edits(harness, tmp_path, monkeypatch):
    """Issue 16 defect 4: with the data folder edit empty (Path(".")), a volume + segmentation from
    the scene are the training data (they were never used: "." is a folder)."""
    teacher = _model(tmp_path / "teacher.pt", ["background", "liver"])
    panel = harness.make_panel()
    ui, p = harness.ui, panel._parameterNode
    exported = []

    def exportSceneCase(volume, segmentation, folder):  # writes the one-case dataset (tested in test_scene_logic)
        folder.mkdir(parents=True)
        exported.append(folder)
        return folder

    monkeypatch.setattr(panel.logic, "exportSceneCase", exportSceneCase)
    monkeypatch.setattr(panel, "_showPlot", lambda: None)
    p.teacherPath, p.outputFolder = teacher, tmp_path / "out"
    assert p.dataFolder == pathlib.Path(".") and not ui["startButton"].enabled
    p.trainingVolume, p.trainingSegmentation = FakeNode("CT"), FakeNode("CT labels")
    assert ui["startButton"].enabled
    ui["startButton"].emit("clicked", True)
    assert exported == [tmp_path / "out" / "scene_dataset"] and harness.errors == []
    arguments = harness.runners[-1].calls[0][2]
    assert arguments[arguments.index("--data") + 1] == str(tmp_path / "out" / "scene_dataset")


def _parsed(arguments):
    """A child's distill command line read by the CLI's own parser."""
    from ReCoKDLib import cli

    return cli.build_parser("distill").parse_args(arguments[2:])


def test_teacher_outputs_and_labels_are_bound_and_reach_the_command_line(harness, tmp_path, monkeypatch):
    teacher = _model(tmp_path / "teacher.pt", ["background", "liver"])
    panel = harness.make_panel()
    ui, p = harness.ui, panel._parameterNode
    monkeypatch.setattr(panel, "_showPlot", lambda: None)
    combo, box = ui["teacherOutputsComboBox"], ui["withoutLabelsCheckBox"]
    assert [i["text"] for i in combo.items] == ["auto", "cache", "live"] and combo.currentIndex == 0
    assert (p.teacherOutputs, p.withoutLabels, box.checked) == ("auto", False, False)
    data = tmp_path / "data"
    data.mkdir()
    p.teacherPath, p.dataFolder, p.outputFolder = teacher, data, tmp_path / "out"
    combo.setCurrentIndex(1)  # the user picks "cache"
    assert p.teacherOutputs == "cache"
    ui["startButton"].emit("clicked", True)
    parsed = _parsed(harness.runners[-1].calls[0][2])
    assert (parsed.teacher_outputs, parsed.data, parsed.no_labels, parsed.images) == ("cache", str(data), False, None)
    harness.runners[-1].finish([])
    box.checked = True  # the user ticks "Without labels"
    box.emit("stateChanged", 2)
    assert p.withoutLabels and "no labels" in ui["startButton"].toolTip
    ui["startButton"].emit("clicked", True)  # a folder without dataset.json must hold images
    assert len(harness.runners) == 1 and "No training images" in harness.errors.pop()[1]
    for name in ("head1_0000.nii.gz", "head2.nrrd"):
        (data / name).write_bytes(b"image")
    ui["startButton"].emit("clicked", True)
    parsed = _parsed(harness.runners[-1].calls[0][2])
    assert (parsed.images, parsed.data) == ([str(data)], None), "a folder without dataset.json is a folder of images"
    assert harness.errors == []
    p.dataFolder = tmp_path  # the summary is computed for a new folder only
    p.dataFolder = data
    assert ui["dataSummaryLabel"].text.startswith("2 images without labels")


def test_student_norm_and_stem_are_bound_and_reach_the_command_line(harness, tmp_path, monkeypatch):
    """The combo boxes hold the connector's choices (``addItem(str(c))``, guiConnectors.py, Slicer
    583e9b37d5); what the user picks reaches ``recokd distill``; the defaults add no option."""
    teacher = _model(tmp_path / "teacher.pt", ["background", "liver"])
    panel = harness.make_panel()
    ui, p = harness.ui, panel._parameterNode
    monkeypatch.setattr(panel, "_showPlot", lambda: None)
    norm, stem = ui["studentNormComboBox"], ui["studentStemComboBox"]
    assert [i["text"] for i in stem.items] == ["full", "strided"] and stem.currentIndex == 0
    assert [i["text"] for i in norm.items] == ["teacher", "instance", "batch"]
    data = tmp_path / "data"
    data.mkdir()
    p.teacherPath, p.dataFolder, p.outputFolder = teacher, data, tmp_path / "out"
    ui["startButton"].emit("clicked", True)
    arguments = harness.runners[-1].calls[0][2]
    assert "--student-stem" not in arguments and "--student-norm" not in arguments
    parsed = _parsed(arguments)
    assert (parsed.student_stem, parsed.student_norm) == ("full", None)
    harness.runners[-1].finish([])
    stem.setCurrentIndex(1)  # the user picks "strided"
    norm.setCurrentIndex(2)  # and "batch"
    assert (p.studentStem, p.studentNorm) == ("strided", "batch")
    ui["startButton"].emit("clicked", True)
    parsed = _parsed(harness.runners[-1].calls[0][2])
    assert (parsed.student_stem, parsed.student_norm) == ("strided", "batch")
    assert harness.errors == []


def test_without_labels_a_scene_volume_alone_is_the_training_data(harness, tmp_path, monkeypatch):
    """No segmentation: the volume is written as one image and passed with ``--images``; the
    labelled routes (Distill with labels, Train a teacher) still ask for a segmentation."""
    teacher = _model(tmp_path / "teacher.pt", ["background", "liver"])
    panel = harness.make_panel()
    ui, p = harness.ui, panel._parameterNode
    exported = []

    def exportSceneImage(volume, folder):  # writes the volume (tested in test_slicer_module_logic)
        folder.mkdir(parents=True)
        exported.append((volume, folder))
        (folder / "scene_000.nii.gz").write_bytes(b"image")
        return folder / "scene_000.nii.gz"

    monkeypatch.setattr(panel.logic, "exportSceneImage", exportSceneImage)
    monkeypatch.setattr(panel.logic, "exportSceneCase", lambda *a: pytest.fail("no labelled dataset without labels"))
    monkeypatch.setattr(panel, "_showPlot", lambda: None)
    p.teacherPath, p.outputFolder, p.trainingVolume = teacher, tmp_path / "out", FakeNode("T1")
    assert not ui["startButton"].enabled and "labelled data" in ui["startButton"].toolTip
    p.withoutLabels = True
    assert ui["startButton"].enabled
    assert not ui["trainTeacherButton"].enabled and "labelled data" in ui["trainTeacherButton"].toolTip
    ui["teacherOutputsComboBox"].setCurrentIndex(2)  # "live"
    ui["startButton"].emit("clicked", True)
    assert exported == [(p.trainingVolume, tmp_path / "out" / "scene_images")] and harness.errors == []
    parsed = _parsed(harness.runners[-1].calls[0][2])
    assert parsed.images == [str(tmp_path / "out" / "scene_images" / "scene_000.nii.gz")] and parsed.data is None
    assert parsed.teacher_outputs == "live"
    harness.runners[-1].finish([])
    p.trainingVolume = None
    assert not ui["startButton"].enabled and "training images" in ui["startButton"].toolTip


def test_without_labels_an_nnunet_folder_keeps_its_split(harness, tmp_path, monkeypatch):
    """``--data FOLDER --no-labels``: the CLI honours the folder's ``label_free_split`` (T1 heads)."""
    teacher = _model(tmp_path / "teacher.pt", ["background", "brain"])
    panel = harness.make_panel()
    ui, p = harness.ui, panel._parameterNode
    monkeypatch.setattr(panel, "_showPlot", lambda: None)
    data = tmp_path / "Dataset904_T1Heads"
    (data / "imagesTr").mkdir(parents=True)
    (data / "imagesTs").mkdir()
    from ReCoKDLib.data.io import Geometry, write_image

    for case in ("a", "b", "c"):  # real images: the data summary reads their headers
        write_image(np.zeros((4, 5, 6), np.float32), Geometry(), data / "imagesTs" / f"{case}_0000.nii.gz")
    (data / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "brain": 1}, "numTraining": 0,
        "file_ending": ".nii.gz", "label_free_split": {"train": ["a", "b"], "test": ["c"]}}))
    p.teacherPath, p.dataFolder, p.outputFolder, p.withoutLabels = teacher, data, tmp_path / "out", True
    assert "0 training / 3 test cases" in ui["dataSummaryLabel"].text
    ui["startButton"].emit("clicked", True)
    parsed = _parsed(harness.runners[-1].calls[0][2])
    assert (parsed.data, parsed.no_labels, parsed.images, parsed.teacher_outputs) == (str(data), True, None, "auto")
    from ReCoKDLib.commands.distill import _training_cases

    cases = _training_cases(parsed, ["background", "brain"])
    assert [c.case_id for c in cases] == ["a", "b"] and all(c.label_path is None for c in cases)


# --------------------------------------------------------------------------------------------
# code named by model files: asked about by name, trusted for the session on Yes only


class YesNo:
    """``slicer.util.confirmYesNoDisplay(text, windowTitle=None, parent=None, **kwargs)`` with the
    signature Slicer gives it (``Base/Python/slicer/util.py``: a modal ``ctkMessageBox`` with Yes and
    No buttons; it returns True only when Yes was clicked): records each question and gives the
    scripted answers, then No (closing the dialog)."""

    def __init__(self, *answers):
        self.answers, self.asked = list(answers), []

    def __call__(self, text, windowTitle=None, parent=None, **kwargs):
        self.asked.append((text, windowTitle))
        return self.answers.pop(0) if self.answers else False


def _segmentThroughTheCommandLine(panel, monkeypatch):
    """``segmentInBackground`` without a scene: the real ``segmentArguments`` with the logic's trust
    (the logic's own route is tested in ``test_slicer_module_logic``)."""
    lines = sys.modules["ReCoKDModule.commandLines"]

    def segmentInBackground(volume, source, roi, device, callback, finished):
        arguments, env = lines.segmentArguments(source, "in.nrrd", "out.nrrd", device, panel.logic.trustedEntryPoints)
        return panel.logic._startJob("segment", arguments, env, None, callback, lambda job: finished(job, None))

    monkeypatch.setattr(panel.logic, "segmentInBackground", segmentInBackground)


def _refused(model):
    """The child's ``error`` event for a card naming ``torch.nn:Conv3d`` (``ReCoKDLib.trust.error_fields``)."""
    return json.dumps({"event": "error", "stage": "segment", "entry_point": "torch.nn:Conv3d",
                       "entry_point_source": f"the model card of {model}",
                       "message": f"the model card of {model} names the entry point 'torch.nn:Conv3d': ... pass "
                                  "--trust-entry-point torch.nn:Conv3d to recokd"})


def test_a_model_naming_code_is_asked_about_once_and_no_trusts_nothing(harness, tmp_path, monkeypatch):
    model = _entry_point_model(tmp_path)
    other = _model(tmp_path / "other.pt", ["background", "liver"])
    ask = YesNo(False)
    harness.stubs["slicer.util"].confirmYesNoDisplay = ask
    panel = harness.make_panel()
    ui, p = harness.ui, panel._parameterNode
    p.segmentModel = str(other)
    assert ask.asked == [], "a ReCoKD network runs no foreign code: nothing to ask"
    p.segmentModel = str(model)
    assert len(ask.asked) == 1
    text, title = ask.asked[0]
    assert "torch.nn:Conv3d" in text and f"model card of {model}" in text and "'torch'" in text
    assert "runs that code" in text and "until Slicer closes" in text and title
    assert panel.logic.trustedEntryPoints == set()
    assert "not trusted" in ui["modelInfoLabel"].text and "torch.nn:Conv3d" in ui["modelInfoLabel"].text
    p.segmentModel = str(other)
    p.segmentModel = str(model)
    p.teacherPath = model
    assert len(ask.asked) == 1, "a declined name is not asked about again while describing"
    assert "not trusted" in ui["teacherInfoLabel"].text
    # the user segments anyway: the child refuses, the panel asks again (the user asked to run it)
    _segmentThroughTheCommandLine(panel, monkeypatch)
    p.inputVolume = FakeNode("CT")
    ui["segmentButton"].emit("clicked", True)
    assert "--trust-entry-point" not in harness.runners[-1].calls[0][2]
    harness.runners[-1].finish([_refused(model)], 2)
    assert len(ask.asked) == 2 and panel.logic.trustedEntryPoints == set()
    assert ui["segmentStatusLabel"].text.startswith("Not run") and "torch.nn:Conv3d" in ui["segmentStatusLabel"].text
    assert harness.errors == [], "asked instead of an error advising --trust-entry-point, which the panel has not"
    assert len(harness.runners) == 1


def test_yes_trusts_the_name_for_the_session_and_reaches_the_next_job(harness, tmp_path, monkeypatch):
    model = _entry_point_model(tmp_path)
    ask = YesNo(True)
    harness.stubs["slicer.util"].confirmYesNoDisplay = ask
    panel = harness.make_panel()
    ui, p = harness.ui, panel._parameterNode
    p.segmentModel = str(model)
    assert len(ask.asked) == 1 and panel.logic.trustedEntryPoints == {"torch.nn:Conv3d"}
    assert "not trusted" not in ui["modelInfoLabel"].text
    p.teacherPath = model
    assert len(ask.asked) == 1, "trusted: not asked again"
    _segmentThroughTheCommandLine(panel, monkeypatch)
    p.inputVolume = FakeNode("CT")
    ui["segmentButton"].emit("clicked", True)
    parsed = _parsed_segment(harness.runners[-1].calls[0][2])
    assert parsed.trust_entry_point == ["torch.nn:Conv3d"] and parsed.model == str(model)


def _parsed_segment(arguments):
    from ReCoKDLib import cli

    return cli.build_parser("segment").parse_args(arguments[2:])


def test_a_refused_distillation_asks_and_the_user_starts_it_again(harness, tmp_path, monkeypatch):
    """The teacher's card names code; the user said No while choosing it, then pressed Start: the
    child refuses, the panel asks (Yes), says to press Start again and does not restart by itself."""
    teacher = _entry_point_model(tmp_path)
    ask = YesNo(False, True)
    harness.stubs["slicer.util"].confirmYesNoDisplay = ask
    panel, ui, p = _distill_panel(harness, tmp_path, monkeypatch, teacher)
    assert len(ask.asked) == 1 and panel.logic.trustedEntryPoints == set()
    ui["startButton"].emit("clicked", True)
    assert _parsed(harness.runners[-1].calls[0][2]).trust_entry_point == []
    harness.runners[-1].finish([_refused(teacher).replace('"segment"', '"distill"')], 2)
    assert len(ask.asked) == 2 and "torch.nn:Conv3d" in ask.asked[1][0]
    assert panel.logic.trustedEntryPoints == {"torch.nn:Conv3d"} and harness.errors == []
    assert len(harness.runners) == 1, "a job is never restarted on its own"
    assert "press Start again" in ui["etaLabel"].text and ui["logTextEdit"].lines[-1] == ui["etaLabel"].text
    assert "not trusted" not in ui["teacherInfoLabel"].text, "the teacher's description is updated"
    assert ui["startButton"].enabled and ui["startButton"].text == "Start"
    ui["startButton"].emit("clicked", True)
    assert _parsed(harness.runners[-1].calls[0][2]).trust_entry_point == ["torch.nn:Conv3d"]


@pytest.mark.parametrize("answer", [True, False])
def test_inspection_in_this_process_asks_before_running_code_a_model_names(harness, answer):
    """Inspection loads the models in Slicer's process: a refusal there asks too; Yes runs the
    inspection again on the same click (nothing had run), No shows why nothing ran."""
    from ReCoKDLib.trust import UntrustedCodeError

    ask = YesNo(answer)
    harness.stubs["slicer.util"].confirmYesNoDisplay = ask
    panel = harness.make_panel()
    calls = []

    def showAffinity(*args):
        calls.append(args)
        if "torch.nn:Conv3d" not in panel.logic.trustedEntryPoints:
            raise UntrustedCodeError("refused", "torch.nn:Conv3d", "the model card of /m/teacher.pt")
        return "overlay"

    panel.logic.showAffinity = showAffinity
    harness.ui["showMapButton"].emit("clicked", True)
    assert len(ask.asked) == 1 and "/m/teacher.pt" in ask.asked[0][0] and "torch.nn:Conv3d" in ask.asked[0][0]
    if answer:
        assert len(calls) == 2 and harness.errors == [] and panel.logic.trustedEntryPoints == {"torch.nn:Conv3d"}
    else:
        assert len(calls) == 1 and panel.logic.trustedEntryPoints == set()
        assert harness.errors == [("Failed to compute the map.",
                                   "Not run: the model card of /m/teacher.pt names code you did not trust "
                                   "(torch.nn:Conv3d).")]
