#!/usr/bin/env python3
"""Render the ReCoKD panel (ReCoKD.ui) offscreen with PySide6, and draw the module icon.

Slicer's CTK/MRML widgets do not exist outside Slicer; small PySide6 stand-ins with the same
class names (registered with ``QUiLoader.registerCustomWidget``) draw them the way Slicer does:
collapsible section headers, node selectors showing their node type, a slider with its value,
an empty plot frame. Everything else (layout, texts, tooltips, dynamic properties such as
``SlicerParameterName``) comes from the .ui file itself.

Usage::

    QT_QPA_PLATFORM=offscreen python scripts/render_panel.py [--out Resources/Screenshots/ReCoKD-panel.png]
    python scripts/render_panel.py --icon ReCoKD/Resources/Icons/ReCoKD.png

The JSON printed on standard output (sections, buttons, parameter bindings) is what the test
``Testing/test_slicer_panel_render.py`` checks; it runs this script in a subprocess so that Qt
never shares a process with vtk or torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UI_PATH = ROOT / "ReCoKD" / "Resources" / "UI" / "ReCoKD.ui"
SCREENSHOT = ROOT / "Resources" / "Screenshots" / "ReCoKD-panel.png"
ICON = ROOT / "ReCoKD" / "Resources" / "Icons" / "ReCoKD.png"


def render_icon(path: Path = ICON, size: int = 128) -> Path:
    """A 128x128 PNG: a wide teacher block distilled (arrow) into a narrow student block, over
    a CT-like disc. Drawn with Pillow; a few kB."""
    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    s = size / 128
    draw.ellipse([4 * s, 4 * s, 124 * s, 124 * s], fill=(38, 44, 56, 255), outline=(150, 160, 175, 255), width=int(3 * s))
    # teacher: four wide layers
    for n, width in enumerate((56, 48, 40, 32)):
        y = 30 + n * 17
        draw.rounded_rectangle([18 * s, y * s, (18 + width) * s, (y + 12) * s], radius=3 * s, fill=(66, 135, 245, 255))
    # arrow
    draw.polygon([(76 * s, 58 * s), (88 * s, 64 * s), (76 * s, 70 * s)], fill=(235, 235, 235, 255))
    draw.rectangle([66 * s, 62 * s, 77 * s, 66 * s], fill=(235, 235, 235, 255))
    # student: four narrow layers
    for n, width in enumerate((18, 15, 12, 10)):
        y = 38 + n * 13
        draw.rounded_rectangle([92 * s, y * s, (92 + width) * s, (y + 9) * s], radius=2 * s, fill=(245, 158, 66, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    return path


def _stand_ins():
    """PySide6 classes named like Slicer's widgets (imported here: only this process uses Qt)."""
    from PySide6.QtCore import Property, QRectF, Qt, Signal
    from PySide6.QtGui import QColor, QFont, QPainter, QPen
    from PySide6.QtWidgets import QComboBox, QGroupBox, QHBoxLayout, QLineEdit, QPushButton, QSlider, QToolButton, QWidget
    from PySide6.QtWidgets import QDoubleSpinBox

    class qMRMLWidget(QWidget):
        mrmlSceneChanged = Signal(object)

    class ctkCollapsibleButton(QGroupBox):
        """Slicer draws a full-width header button with an arrow; a bold group box title here."""

        def __init__(self, parent=None):
            super().__init__(parent)
            self._collapsed = False
            self.setStyleSheet(
                "ctkCollapsibleButton { border: 1px solid #9aa4b1; border-radius: 3px; margin-top: 14px; "
                "padding-top: 6px; font-weight: bold; background: #f4f6f8; }"
                "ctkCollapsibleButton::title { subcontrol-origin: margin; left: 8px; padding: 0 4px; }")

        def getText(self):
            return self.title().lstrip("▾▸ ")

        def setText(self, text):
            self.setTitle(("▸ " if self._collapsed else "▾ ") + text)

        def getCollapsed(self):
            return self._collapsed

        def setCollapsed(self, value):
            text = self.getText()
            self._collapsed = bool(value)
            self.setText(text)
            for child in self.findChildren(QWidget):
                child.setVisible(not self._collapsed)
            self.setMaximumHeight(28 if self._collapsed else 16777215)

        text = Property(str, getText, setText)
        collapsed = Property(bool, getCollapsed, setCollapsed)

    class qMRMLNodeComboBox(QComboBox):
        def __init__(self, parent=None):
            super().__init__(parent)
            self._types, self._none = [], False
            self.setMinimumWidth(180)

        def _refresh(self):
            self.clear()
            name = (self._types[0] if self._types else "vtkMRMLNode").replace("vtkMRML", "").replace("Node", "")
            self.addItem("None" if self._none else f"<{name}>")

        def getNodeTypes(self):
            return self._types

        def setNodeTypes(self, types):
            self._types = list(types)
            self._refresh()

        def getNoneEnabled(self):
            return self._none

        def setNoneEnabled(self, value):
            self._none = bool(value)
            self._refresh()

        nodeTypes = Property("QStringList", getNodeTypes, setNodeTypes)
        noneEnabled = Property(bool, getNoneEnabled, setNoneEnabled)
        showChildNodeTypes = Property(bool, lambda self: False, lambda self, v: None)
        addEnabled = Property(bool, lambda self: False, lambda self, v: None)
        removeEnabled = Property(bool, lambda self: False, lambda self, v: None)
        renameEnabled = Property(bool, lambda self: False, lambda self, v: None)

    class ctkPathLineEdit(QWidget):
        def __init__(self, parent=None):
            super().__init__(parent)
            layout = QHBoxLayout(self)
            layout.setContentsMargins(0, 0, 0, 0)
            self.edit = QLineEdit(self)
            self.edit.setPlaceholderText("Select a path…")
            button = QToolButton(self)
            button.setText("…")
            layout.addWidget(self.edit)
            layout.addWidget(button)

        filters = Property(int, lambda self: 0, lambda self, v: None)
        nameFilters = Property("QStringList", lambda self: [], lambda self, v: None)

    class ctkSliderWidget(QWidget):
        def __init__(self, parent=None):
            super().__init__(parent)
            layout = QHBoxLayout(self)
            layout.setContentsMargins(0, 0, 0, 0)
            self.slider = QSlider(Qt.Horizontal, self)
            self.spin = QDoubleSpinBox(self)
            self.spin.setDecimals(2)
            layout.addWidget(self.slider)
            layout.addWidget(self.spin)
            self.slider.setRange(0, 100)

        def _get(self):
            return self.spin.value()

        def _set(self, value):
            self.spin.setValue(value)
            span = (self.spin.maximum() - self.spin.minimum()) or 1.0
            self.slider.setValue(int(100 * (value - self.spin.minimum()) / span))

        value = Property(float, _get, _set)
        minimum = Property(float, lambda self: self.spin.minimum(), lambda self, v: self.spin.setMinimum(v))
        maximum = Property(float, lambda self: self.spin.maximum(), lambda self, v: self.spin.setMaximum(v))
        singleStep = Property(float, lambda self: self.spin.singleStep(), lambda self, v: self.spin.setSingleStep(v))
        pageStep = Property(float, lambda self: 0.1, lambda self, v: None)

    class ctkMenuButton(QPushButton):
        pass

    class qMRMLSegmentationShow3DButton(ctkMenuButton):
        pass

    class qMRMLPlotWidget(qMRMLWidget):
        """An empty chart frame with the two series the panel plots."""

        def paintEvent(self, event):
            painter = QPainter(self)
            painter.setRenderHint(QPainter.Antialiasing)
            rect = QRectF(self.rect()).adjusted(1, 1, -2, -2)
            painter.fillRect(rect, QColor("white"))
            painter.setPen(QPen(QColor("#9aa4b1")))
            painter.drawRect(rect)
            plot = rect.adjusted(34, 10, -10, -22)
            painter.setPen(QPen(QColor("#444"), 1))
            painter.drawLine(plot.bottomLeft(), plot.bottomRight())
            painter.drawLine(plot.bottomLeft(), plot.topLeft())
            painter.setFont(QFont(painter.font().family(), 8))
            painter.drawText(QRectF(plot.left(), plot.bottom() + 4, plot.width(), 14), Qt.AlignCenter, "step")
            legend = [("loss", QColor(217, 77, 51)), ("validation mean Dice", QColor(51, 128, 217))]
            for n, (label, color) in enumerate(legend):
                y = plot.top() + 6 + 14 * n
                painter.setPen(QPen(color, 2))
                painter.drawLine(int(plot.right() - 150), int(y), int(plot.right() - 130), int(y))
                painter.setPen(QPen(QColor("#333")))
                painter.drawText(int(plot.right() - 125), int(y + 4), label)
            painter.end()

    return [qMRMLWidget, ctkCollapsibleButton, qMRMLNodeComboBox, ctkPathLineEdit, ctkSliderWidget,
            ctkMenuButton, qMRMLSegmentationShow3DButton, qMRMLPlotWidget]


def show_clinician_state(panel) -> None:
    """The panel as a clinician meets it while Segment runs: what Slicer and the panel put into
    the widgets (``ReCoKDModule.panel``: model and device lists; Slicer's ``connectGui``: the
    ``Choice`` combo boxes), with the research sections collapsed as the .ui declares."""
    from PySide6.QtWidgets import QComboBox, QLabel, QPushButton, QWidget

    from ReCoKDLib.choices import KD_METHODS

    def combo(name):
        return panel.findChild(QComboBox, name)

    for name, items in (("reductionComboBox", ["2", "4", "8"]),  # QComboBoxToStringableConnector: str(choice)
                        ("mapComboBox", ["teacher attention", "student attention", "teacher affinity",
                                         "student affinity", "difference", "region mask"])):
        combo(name).addItems(items)
    combo("reductionComboBox").setCurrentIndex(1)
    for method in KD_METHODS:
        combo("methodComboBox").addItem(method.title, method.name)
    combo("deviceComboBox").addItems(["Automatic", "CPU"])
    combo("modelComboBox").addItems(["model_best.pt (ct_div4)", "teacher.pt (ct_teacher)", "hd-bet (preset)"])
    combo("teacherPresetComboBox").addItem("(none: use the file or folder above)")
    combo("classComboBox").addItem("(all classes)")
    volume = panel.findChild(QWidget, "inputVolumeSelector")
    volume.clear()
    volume.addItem("CT abdomen")
    panel.findChild(QLabel, "modelInfoLabel").setText(
        "student: 11 classes (liver, spleen, stomach, pancreas, aorta, inferior_vena_cava, "
        "portal_vein_and_splenic_vein, autochthon_left, autochthon_right, vertebrae_T11, vertebrae_T12); "
        "spacing 3 x 3 x 3 mm; patch 16 x 128 x 128")
    segment = panel.findChild(QPushButton, "segmentButton")
    segment.setText("Cancel")
    segment.setEnabled(True)
    panel.findChild(QWidget, "segmentProgressBar").setValue(625)
    panel.findChild(QLabel, "segmentStatusLabel").setText("segment: 5/8, 3 s left")
    for section in panel.findChildren(QWidget):
        if type(section).__name__ == "ctkCollapsibleButton":  # children exist only now: collapse them
            section.setCollapsed(section.getCollapsed())


def render_panel(out: Path = SCREENSHOT, width: int = 430) -> dict:
    """Load ReCoKD.ui with the stand-ins, save a PNG of it, and describe what was built."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QFile
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication, QComboBox, QLabel, QPushButton, QWidget

    app = QApplication.instance() or QApplication([])
    app.setStyle("Fusion")
    loader = QUiLoader()
    for cls in _stand_ins():
        loader.registerCustomWidget(cls)
    ui_file = QFile(str(UI_PATH))
    if not ui_file.open(QFile.ReadOnly):
        raise FileNotFoundError(f"cannot open {UI_PATH}")
    panel = loader.load(ui_file)
    ui_file.close()
    if panel is None:
        raise RuntimeError(f"QUiLoader could not build {UI_PATH}: {loader.errorString()}")

    show_clinician_state(panel)
    panel.resize(width, 10)
    panel.resize(width, panel.sizeHint().height())
    panel.show()
    app.processEvents()
    out.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(out)):
        raise RuntimeError(f"could not write {out}")

    sections = [w.property("text") for w in panel.findChildren(QWidget) if type(w).__name__ == "ctkCollapsibleButton"]
    collapsed = {w.property("text"): bool(w.property("collapsed")) for w in panel.findChildren(QWidget)
                 if type(w).__name__ == "ctkCollapsibleButton"}
    buttons = {w.objectName(): w.text() for w in panel.findChildren(QPushButton)}
    bindings = {w.objectName(): w.property("SlicerParameterName") for w in panel.findChildren(QWidget)
                if w.property("SlicerParameterName")}
    return {"png": str(out), "size": [panel.width(), panel.height()], "root": type(panel).__name__,
            "sections": sections, "collapsed": collapsed, "buttons": buttons, "bindings": bindings,
            "widgets": sorted({type(w).__name__ for w in panel.findChildren(QWidget)})}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=SCREENSHOT, help="PNG of the panel (default: %(default)s)")
    parser.add_argument("--icon", type=Path, help="draw the module icon to this PNG instead")
    args = parser.parse_args(argv)
    if args.icon:
        print(render_icon(args.icon))
        return 0
    print(json.dumps(render_panel(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
