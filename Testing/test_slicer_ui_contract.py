"""The ReCoKD.ui <-> parameter node <-> panel contract, checked against Slicer's real binding rules.

``connectGui`` binds every widget whose ``.ui`` entry has a ``SlicerParameterName`` to the field of
that name, through the first registered connector whose ``canRepresent`` accepts the
(widget, annotation) pair; ``create`` may still refuse (e.g. a combo box without ``Choice``). It
builds *every* connector before connecting any (``wrapper.py`` ``_connectParametersToGui``: a dict
comprehension over ``createGuiConnector``), so one refused pair leaves the whole panel unbound and
``setup()``/``enter()`` raise.

:func:`slicer_connector` mirrors the rules of Slicer's source, read at tag ``v5.10.0`` (unchanged
on ``main`` at commit ``583e9b37d5``): ``Base/Python/slicer/parameterNodeWrapper/guiConnectors.py``,
the ``canRepresent``/``create``/``__init__`` of each connector in registration order. It refuses
what Slicer refuses; ``test_the_rules_refuse_what_slicer_refuses`` pins those refusals.
"""

from __future__ import annotations

import ast
import enum
import pathlib
import typing
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import slicer_stubs

ROOT = Path(__file__).resolve().parents[1]
UI_PATH = ROOT / "ReCoKD" / "Resources" / "UI" / "ReCoKD.ui"
PANEL_PATH = ROOT / "ReCoKD" / "ReCoKDModule" / "panel.py"

#: Qt classes QUiLoader/uic create without a declaration
QT_CLASSES = {"QWidget", "QLabel", "QPushButton", "QComboBox", "QSpinBox", "QDoubleSpinBox", "QCheckBox",
              "QProgressBar", "QPlainTextEdit", "QTextEdit", "QLineEdit", "QGroupBox", "QFrame", "QSlider",
              "QToolButton", "QRadioButton", "QTabWidget", "QListWidget"}
PATH_TYPES = (pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePath, pathlib.PurePosixPath,
              pathlib.PureWindowsPath)


class SlicerRefuses(RuntimeError):
    """What ``createGuiConnector`` or a connector's ``create``/``__init__`` raises in Slicer."""


# --------------------------------------------------------------------------------------------
# Slicer's rules (guiConnectors.py, v5.10.0)


def _split(annotation):
    """``splitAnnotations`` / ``unannotatedType`` (parameterNodeWrapper/util.py)."""
    if typing.get_origin(annotation) is typing.Annotated:
        return annotation.__origin__, list(annotation.__metadata__)
    return annotation, []


def _first(annotations, cls):
    return next((a for a in annotations if isinstance(a, cls)), None)


def _bounded(annotations, stubs) -> bool:
    pnw = stubs["slicer.parameterNodeWrapper"]
    return _first(annotations, pnw.WithinRange) is not None or (
        _first(annotations, pnw.Minimum) is not None and _first(annotations, pnw.Maximum) is not None)


def _is_node(base, stubs) -> bool:
    """``isNodeOrUnionOfNodes`` (util.py): a vtkMRMLNode subclass, or a Union of them (None allowed)."""
    node = stubs["slicer"].vtkMRMLNode
    if typing.get_origin(base) is typing.Union:
        args = [a for a in typing.get_args(base) if a is not type(None)]
        return bool(args) and all(isinstance(a, type) and issubclass(a, node) for a in args)
    return isinstance(base, type) and issubclass(base, node)


def slicer_connector(widget_class: str, annotation, stubs) -> str:
    """The connector class Slicer would create for a widget of ``widget_class`` (exact type: the
    ``canRepresent`` methods compare ``type(widget)``, never ``isinstance``) bound to a field of
    ``annotation``; raises :class:`SlicerRefuses` where Slicer raises."""
    base, annotations = _split(annotation)
    pnw = stubs["slicer.parameterNodeWrapper"]
    if base is bool and widget_class in ("QCheckBox", "ctkCheckBox"):
        return "QCheckBoxToBoolConnector"
    if base is bool and widget_class == "QPushButton":
        return "QCheckablePushButtonToBoolConnector"
    if base is bool and widget_class == "ctkCheckablePushButton":
        return "ctkCheckablePushButtonToBoolConnector"
    if base is int and widget_class in ("QSlider", "QSpinBox"):
        if widget_class == "QSlider" and not _bounded(annotations, stubs):
            raise SlicerRefuses("Cannot have a connection to QSlider where the int type is unbounded.")
        return "QSliderOrSpinBoxToIntConnector"
    if base in (float, int) and widget_class in ("QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget",
                                                 "ctkDoubleSlider", "ctkDoubleSpinBox", "qMRMLSpinBox"):
        if widget_class in ("ctkSliderWidget", "qMRMLSliderWidget") and not _bounded(annotations, stubs):
            raise SlicerRefuses("Cannot have a connection to ctkSliderWidget where the float types is unbounded.")
        return "QDoubleSpinBoxCtkSliderWidgetToFloatIntConnector"
    if widget_class in ("QComboBox", "ctkComboBox") and base in (int, float, str, bool):
        if _first(annotations, pnw.Choice) is None:
            raise SlicerRefuses("ComboBoxToStringableConnector requires the Choice annotation to be used.")
        return "QComboBoxToStringableConnector"
    if widget_class in ("QComboBox", "ctkComboBox") and isinstance(base, type) and issubclass(base, enum.Enum):
        return "QComboBoxToEnumConnector"
    if widget_class == "QLineEdit" and base is str:
        return "QLineEditToStrConnector"
    if widget_class == "QLabel" and base is str:
        return "QLabelToStrConnector"
    if widget_class == "QTextEdit" and base is str:
        return "QTextEditPlainTextToStrConnector"
    if widget_class == "ctkPathLineEdit" and base in PATH_TYPES:
        return "ctkPathLineEditToPathConnector"
    if widget_class == "ctkDirectoryButton" and base in PATH_TYPES:
        return "ctkDirectoryButtonToPathConnector"
    if widget_class == "qMRMLNodeComboBox" and _is_node(base, stubs):
        return "qMRMLNodeComboBoxToNodeConnector"
    raise SlicerRefuses(f"Unable to create GUI connector from datatype '{annotation}' to widget type '{widget_class}'.")


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture()
def parameters(stubs):
    return slicer_stubs.import_module_code("parameters")


@pytest.fixture()
def fields(parameters) -> dict:
    return typing.get_type_hints(parameters.ReCoKDParameterNode, include_extras=True)


@pytest.fixture(scope="module")
def ui() -> ET.Element:
    return ET.parse(UI_PATH).getroot()


def widgets_by_name(ui: ET.Element) -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ui.iter("widget")}


def slicer_parameter_names(ui: ET.Element) -> dict[str, ET.Element]:
    """SlicerParameterName -> widget element."""
    out = {}
    for widget in ui.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                name = prop.findtext("string")
                assert name not in out, f"two widgets bind {name}"
                out[name] = widget
    return out


# --------------------------------------------------------------------------------------------
# the binding rules


def test_every_bound_widget_gets_the_connector_slicer_creates(ui, fields, stubs):
    bound = slicer_parameter_names(ui)
    assert len(bound) >= 14
    made = {}
    for parameter, widget in bound.items():
        assert parameter in fields, f"SlicerParameterName {parameter!r} is not a field of ReCoKDParameterNode"
        made[parameter] = slicer_connector(widget.get("class"), fields[parameter], stubs)
    assert made["inputVolume"] == "qMRMLNodeComboBoxToNodeConnector"
    assert made["studentReduction"] == "QComboBoxToStringableConnector"
    assert made["overlayOpacity"] == "QDoubleSpinBoxCtkSliderWidgetToFloatIntConnector"
    assert made["teacherPath"] == "ctkPathLineEditToPathConnector"
    assert made["teacherOutputs"] == made["studentNorm"] == made["studentStem"] == "QComboBoxToStringableConnector"
    assert made["withoutLabels"] == made["resume"] == "QCheckBoxToBoolConnector"


def test_the_rules_refuse_what_slicer_refuses(stubs):
    pnw = stubs["slicer.parameterNodeWrapper"]
    # issue 16 defect 1: plain str fields on QComboBox (teacherPreset, method, device, inspectClass)
    with pytest.raises(SlicerRefuses, match="requires the Choice annotation"):
        slicer_connector("QComboBox", str, stubs)
    assert slicer_connector("QComboBox", typing.Annotated[str, pnw.Choice(["a"])], stubs)
    with pytest.raises(SlicerRefuses, match="unbounded"):
        slicer_connector("ctkSliderWidget", float, stubs)
    with pytest.raises(SlicerRefuses, match="unbounded"):
        slicer_connector("QSlider", int, stubs)
    assert slicer_connector("QSpinBox", int, stubs)  # a spin box takes an unbounded int
    for widget, annotation in (("QLineEdit", pathlib.Path), ("ctkPathLineEdit", str),
                               ("ctkPathLineEdit", typing.Optional[pathlib.Path]),  # Union: no connector
                               ("qMRMLSubjectHierarchyComboBox", stubs["slicer"].vtkMRMLScalarVolumeNode),
                               ("QCheckBox", int), ("QPlainTextEdit", str)):
        with pytest.raises(SlicerRefuses, match="Unable to create GUI connector"):
            slicer_connector(widget, annotation, stubs)


def test_choice_defaults_are_among_their_choices(fields, parameters, stubs):
    """``QComboBoxToStringableConnector.write`` raises ValueError for a value not in its choices."""
    pnw = stubs["slicer.parameterNodeWrapper"]
    checked = 0
    for name, annotation in fields.items():
        choice = _first(_split(annotation)[1], pnw.Choice)
        if choice is not None:
            default = getattr(parameters.ReCoKDParameterNode, name)
            assert default in choice.choices, (name, default, choice.choices)
            checked += 1
    assert checked >= 3


def test_every_field_is_bound_or_synced_by_the_panel_never_both(ui, fields, parameters):
    bound = set(slicer_parameter_names(ui))
    synced = parameters.SYNCED_BY_THE_PANEL
    assert not bound & set(synced), f"{sorted(bound & set(synced))} are bound by Slicer and synced by the panel"
    assert set(fields) == bound | set(synced), sorted(set(fields) ^ (bound | set(synced)))
    widgets = widgets_by_name(ui)
    for field, combo in synced.items():
        assert widgets[combo].get("class") == "QComboBox", combo
        assert not widgets[combo].findall("item"), f"{combo} is filled by the panel, not by the .ui"


def test_node_selectors_list_the_type_of_their_field(ui, fields):
    for parameter, widget in slicer_parameter_names(ui).items():
        if widget.get("class") == "qMRMLNodeComboBox":
            types = [s.text for s in widget.find("property[@name='nodeTypes']/stringlist")]
            assert types == [fields[parameter].__name__], (parameter, types)


def test_kd_methods_shown_are_the_registry_with_titles_and_descriptions():
    registry = pytest.importorskip("ReCoKDLib.losses.registry")
    from ReCoKDLib.choices import KD_METHODS

    assert [m.name for m in KD_METHODS] == registry.available_kd_losses()
    assert KD_METHODS[0].name == "recokd"
    titles = [m.title for m in KD_METHODS]
    assert len(set(titles)) == len(titles) and all(t and t != m.name for t, m in zip(titles, KD_METHODS))
    assert all(m.description for m in KD_METHODS)


def test_model_file_filters_offer_only_what_loads(ui):
    """A model file is a ReCoKD model (.pt + card) or TorchScript (.ts); ONNX files and bare
    .pth state dicts cannot be loaded from the panel (nnU-Net folders are chosen as folders)."""
    for widget in ui.iter("widget"):
        filters = widget.find("property[@name='nameFilters']/stringlist")
        if filters is not None:
            text = " ".join(s.text for s in filters)
            assert "*.pt" in text and "*.ts" in text and "onnx" not in text and "*.pth" not in text, text
    panel = PANEL_PATH.read_text()
    assert 'MODEL_FILE_FILTER = "ReCoKD and TorchScript models (*.pt *.ts)"' in panel


# --------------------------------------------------------------------------------------------
# the .ui itself


def ui_attribute_uses(tree: ast.Module) -> set[str]:
    """Every NAME in ``self.ui.NAME`` / ``ui.NAME``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui":
            names.add(node.attr)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ui":
            names.add(node.attr)
    return names


def test_every_ui_name_the_panel_uses_exists(ui):
    used = ui_attribute_uses(ast.parse(PANEL_PATH.read_text(encoding="utf-8")))
    assert len(used) > 20
    missing = sorted(used - set(widgets_by_name(ui)))
    assert not missing, f"panel.py uses ui.{missing} but ReCoKD.ui has no such widget"


def test_custom_classes_are_declared_with_a_base_class(ui):
    declared = {c.findtext("class"): c.findtext("extends") for c in ui.iter("customwidget")}
    used = {w.get("class") for w in ui.iter("widget")} - QT_CLASSES
    undeclared = sorted(used - set(declared))
    assert not undeclared, f"custom widget classes {undeclared} lack a <customwidget> entry"
    for name, base in declared.items():
        seen = set()
        while base not in QT_CLASSES:
            assert base in declared and base not in seen, f"{name}: base {base} is neither Qt nor declared"
            seen.add(base)
            base = declared[base]


def test_root_is_qmrmlwidget_and_node_widgets_receive_the_scene(ui):
    root = ui.find("widget")
    assert root.get("class") == "qMRMLWidget"
    connections = {(c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot"))
                   for c in ui.iter("connection")}
    for widget in ui.iter("widget"):
        if widget.get("class") in ("qMRMLNodeComboBox", "qMRMLPlotWidget"):
            expected = (root.get("name"), "mrmlSceneChanged(vtkMRMLScene*)", widget.get("name"),
                        "setMRMLScene(vtkMRMLScene*)")
            assert expected in connections, f"{widget.get('name')} is not connected to mrmlSceneChanged: it would stay empty"


def test_segment_comes_first_and_open_research_sections_collapsed(ui):
    sections = [(w.findtext("property[@name='text']/string"), w.findtext("property[@name='collapsed']/bool"))
                for w in ui.iter("widget") if w.get("class") == "ctkCollapsibleButton"]
    assert sections == [("Segment", "false"), ("Teacher", "true"), ("Data", "true"), ("Distill", "true"),
                        ("Inspect", "true")]
    segment = next(w for w in ui.iter("widget") if w.get("name") == "segmentCollapsibleButton")
    inside = {w.get("name") for w in segment.iter("widget")}
    # what a clinician needs, all in the first section: volume, model, device, go/cancel, progress, result
    assert {"inputVolumeSelector", "modelComboBox", "modelBrowseButton", "deviceComboBox", "segmentButton",
            "segmentProgressBar", "segmentStatusLabel", "outputSegmentationSelector", "show3DButton"} <= inside


def test_teacher_section_offers_a_file_a_folder_or_a_preset(ui):
    widgets = widgets_by_name(ui)
    assert "ctkPathLineEdit::Dirs" in widgets["teacherPathLineEdit"].findtext("property[@name='filters']/set")
    assert "nnU-Net" in widgets["teacherPathLineEdit"].findtext("property[@name='toolTip']/string")
    section = widgets["teacherCollapsibleButton"]
    inside = {w.get("name") for w in section.iter("widget")}
    assert {"teacherPathLineEdit", "teacherPresetComboBox", "teacherFolderButton", "teacherInfoLabel",
            "trainTeacherButton"} <= inside


def test_distill_section_offers_teacher_outputs_and_distillation_without_labels(ui):
    """``QComboBoxToStringableConnector`` shows the choices' ids as items (``str(choice)``): the
    combo box's tooltip says what each does and costs, as ``recokd distill --help`` does."""
    widgets = widgets_by_name(ui)
    inside = {w.get("name") for w in widgets["distillCollapsibleButton"].iter("widget")}
    assert {"teacherOutputsComboBox", "withoutLabelsCheckBox"} <= inside
    combo = widgets["teacherOutputsComboBox"]
    assert not combo.findall("item"), "the connector replaces the items by the choices"
    tip = combo.findtext("property[@name='toolTip']/string")
    lines = tip.splitlines()
    for choice in ("auto", "cache", "live"):
        assert any(line.startswith(f"{choice}") for line in lines), (choice, tip)
    cache = next(line for line in lines if line.startswith("cache"))
    assert "bytes per voxel" in cache and "once per training case" in cache and "teacher_cache" in cache
    assert "every training patch" in next(line for line in lines if line.startswith("live"))
    norm = widgets["studentNormComboBox"]
    assert "studentNormComboBox" in inside and not norm.findall("item")
    tip = norm.findtext("property[@name='toolTip']/string").splitlines()
    assert "--student-norm" in tip[0] and [line.split(":")[0] for line in tip[1:]] == ["teacher", "batch", "instance"]
    assert "largest window" in tip[2]
    stem = widgets["studentStemComboBox"]
    assert "studentStemComboBox" in inside and not stem.findall("item")
    tip = stem.findtext("property[@name='toolTip']/string").splitlines()
    assert "--student-stem" in tip[0] and [line.split(":")[0] for line in tip[1:]] == ["full", "strided"]
    assert "no full-resolution stage" in tip[2] and "segment_speed_stem.json" in tip[2]
    box = widgets["withoutLabelsCheckBox"]
    assert box.findtext("property[@name='text']/string").startswith("Without labels")
    assert "--no-labels" in box.findtext("property[@name='toolTip']/string")
