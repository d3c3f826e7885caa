"""The ReCoKD.ui <-> ReCoKD.py contract, checked without Qt or Slicer (xml.etree + ast).

Each check guards a bug that only shows inside Slicer: an AttributeError on ``self.ui.NAME``, a
widget state that is not saved with the scene, a custom widget that cannot be created, a node
selector that stays empty because it never received the scene.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UI_PATH = ROOT / "ReCoKD" / "Resources" / "UI" / "ReCoKD.ui"
MODULE_PATH = ROOT / "ReCoKD" / "ReCoKD.py"

#: Qt classes QUiLoader/uic create without a declaration
QT_CLASSES = {"QWidget", "QLabel", "QPushButton", "QComboBox", "QSpinBox", "QDoubleSpinBox", "QCheckBox",
              "QProgressBar", "QPlainTextEdit", "QTextEdit", "QLineEdit", "QGroupBox", "QFrame", "QSlider",
              "QToolButton", "QRadioButton", "QTabWidget", "QListWidget"}


@pytest.fixture(scope="module")
def ui() -> ET.Element:
    return ET.parse(UI_PATH).getroot()


@pytest.fixture(scope="module")
def module_ast() -> ast.Module:
    return ast.parse(MODULE_PATH.read_text(encoding="utf-8"))


def widget_names(ui: ET.Element) -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in ui.iter("widget")}


def ui_attribute_uses(tree: ast.Module) -> set[str]:
    """Every NAME in ``self.ui.NAME`` in the module."""
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def parameter_fields(tree: ast.Module) -> dict[str, str]:
    """Field name -> annotation source of the ``@parameterNodeWrapper`` class."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list):
            return {s.target.id: ast.unparse(s.annotation) for s in node.body
                    if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    raise AssertionError("ReCoKD.py has no @parameterNodeWrapper class")


def slicer_parameter_names(ui: ET.Element) -> dict[str, str]:
    """SlicerParameterName -> widget name."""
    out = {}
    for widget in ui.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                out[prop.findtext("string")] = widget.get("name")
    return out


def test_every_self_ui_name_exists_in_the_ui(ui, module_ast):
    used = ui_attribute_uses(module_ast)
    assert len(used) > 10, "the widget should reach the .ui through self.ui"
    missing = sorted(used - set(widget_names(ui)))
    assert not missing, f"ReCoKD.py uses self.ui.{missing} but ReCoKD.ui has no such widget"


def test_every_parameter_name_matches_a_field_and_every_field_is_bound(ui, module_ast):
    fields = parameter_fields(module_ast)
    bound = slicer_parameter_names(ui)
    unknown = sorted(set(bound) - set(fields))
    assert not unknown, f"SlicerParameterName(s) {unknown} are not fields of ReCoKDParameterNode"
    unbound = sorted(set(fields) - set(bound))
    assert not unbound, f"parameter fields {unbound} have no widget: their state would not show in the panel"


def test_node_fields_bind_to_node_selectors_of_the_same_type(ui, module_ast):
    fields = parameter_fields(module_ast)
    widgets = {w.get("name"): w for w in ui.iter("widget")}
    for parameter, widget_name in slicer_parameter_names(ui).items():
        annotation = fields[parameter]
        widget = widgets[widget_name]
        if annotation.startswith("vtkMRML"):
            assert widget.get("class") == "qMRMLNodeComboBox", (parameter, widget.get("class"))
            types = [s.text for s in widget.find("property[@name='nodeTypes']/stringlist")]
            assert types == [annotation], f"{widget_name} lists {types} for a {annotation} field"
        elif annotation == "pathlib.Path":
            assert widget.get("class") == "ctkPathLineEdit", (parameter, widget.get("class"))


def test_choice_fields_offer_the_same_items_as_their_combo_boxes(ui, module_ast):
    namespace: dict = {}
    for node in module_ast.body:  # the module-level tuples the Choice validators use
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple) and all(
                isinstance(e, ast.Constant) for e in node.value.elts):
            namespace[node.targets[0].id] = [e.value for e in node.value.elts]
    fields = parameter_fields(module_ast)
    widgets = {w.get("name"): w for w in ui.iter("widget")}
    checked = 0
    for parameter, widget_name in slicer_parameter_names(ui).items():
        match = re.search(r"Choice\(list\((\w+)\)\)", fields[parameter])
        if match:
            items = [i.findtext("property/string") for i in widgets[widget_name].findall("item")]
            assert items == namespace[match.group(1)], f"{widget_name} items {items} != {match.group(1)}"
            checked += 1
    assert checked >= 3


def test_method_combo_lists_the_registry(ui):
    registry = pytest.importorskip("ReCoKDLib.losses.registry")
    widget = next(w for w in ui.iter("widget") if w.get("name") == "methodComboBox")
    items = [i.findtext("property/string") for i in widget.findall("item")]
    assert items == registry.available_kd_losses()
    assert items[0] == "recokd"


def test_custom_classes_are_declared_with_a_base_class(ui):
    declared = {c.findtext("class"): c.findtext("extends") for c in ui.iter("customwidget")}
    used = {w.get("class") for w in ui.iter("widget")} - QT_CLASSES
    undeclared = sorted(used - set(declared))
    assert not undeclared, f"custom widget classes {undeclared} lack a <customwidget> entry"
    for name, base in declared.items():
        assert base, f"{name} has no <extends> base class"
        # every chain ends in a Qt class (QUiLoader falls back along it outside Slicer)
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
            expected = (root.get("name"), "mrmlSceneChanged(vtkMRMLScene*)", widget.get("name"), "setMRMLScene(vtkMRMLScene*)")
            assert expected in connections, f"{widget.get('name')} is not connected to mrmlSceneChanged: it would stay empty"


def test_five_sections_in_order(ui):
    titles = [w.findtext("property[@name='text']/string") for w in ui.iter("widget") if w.get("class") == "ctkCollapsibleButton"]
    assert titles == ["Teacher", "Data", "Distill", "Segment", "Inspect"]


def test_teacher_section_offers_a_file_a_folder_or_a_preset(ui, module_ast):
    """Issues 8.5 / 9.5: the Teacher section takes a model file or an nnU-Net folder (the path edit
    accepts folders, and a button picks one) or a preset, bound to its own parameter."""
    widgets = {w.get("name"): w for w in ui.iter("widget")}
    path_edit = widgets["teacherPathLineEdit"]
    assert "ctkPathLineEdit::Dirs" in path_edit.findtext("property[@name='filters']/set")
    assert "nnU-Net" in path_edit.findtext("property[@name='toolTip']/string")
    assert widgets["teacherPresetComboBox"].get("class") == "QComboBox"
    assert slicer_parameter_names(ui)["teacherPreset"] == "teacherPresetComboBox"
    assert parameter_fields(module_ast)["teacherPreset"] == "str"
    assert widgets["teacherFolderButton"].get("class") == "QPushButton"
    section = next(w for w in ui.iter("widget") if w.get("name") == "teacherCollapsibleButton")
    inside = {w.get("name") for w in section.iter("widget")}
    assert {"teacherPathLineEdit", "teacherPresetComboBox", "teacherFolderButton", "teacherInfoLabel"} <= inside
    # the widget fills the preset list and reacts to both new widgets
    used = ui_attribute_uses(module_ast)
    assert {"teacherPresetComboBox", "teacherFolderButton"} <= used
