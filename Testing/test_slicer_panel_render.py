"""The panel rendered offscreen with PySide6's QUiLoader and stand-ins for the CTK/MRML widgets.

``scripts/render_panel.py`` runs in a subprocess (Qt never shares a process with vtk or torch)
and reports what QUiLoader built; the committed screenshot is made by the same script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("PySide6.QtUiTools", reason="rendering the panel needs PySide6-Essentials")

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "Resources" / "Screenshots" / "ReCoKD-panel.png"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("panel") / "panel.png"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "QT_LOGGING_RULES": "*.debug=false"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_panel.py"), "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["stderr"] = result.stderr
    return report, out


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_segment_first_research_sections_collapsed(rendered):
    report, _ = rendered
    assert report["root"] == "qMRMLWidget"
    assert report["sections"] == ["Segment", "Teacher", "Data", "Distill", "Inspect"]
    assert report["collapsed"] == {"Segment": False, "Teacher": True, "Data": True, "Distill": True, "Inspect": True}
    buttons = report["buttons"]
    # the state shown: Segment running (its button cancels), the research buttons in their sections
    for name, text in {"segmentButton": "Cancel", "show3DButton": "Show 3D", "startButton": "Start",
                       "showMapButton": "Show map", "showRegionMaskButton": "Show region mask"}.items():
        assert buttons.get(name) == text
    assert "trainTeacherButton" in buttons


def test_every_custom_widget_was_built_by_its_stand_in(rendered):
    report, _ = rendered
    # a class QUiLoader could not create would fall back to its base and be missing here
    for cls in ("ctkCollapsibleButton", "ctkPathLineEdit", "ctkSliderWidget", "qMRMLNodeComboBox",
                "qMRMLPlotWidget", "qMRMLSegmentationShow3DButton"):
        assert cls in report["widgets"], cls
    assert "unable to create a custom widget" not in report["stderr"]


def test_parameter_bindings_survive_loading(rendered):
    report, _ = rendered
    bindings = report["bindings"]
    assert bindings["teacherPathLineEdit"] == "teacherPath"
    assert bindings["inputVolumeSelector"] == "inputVolume"
    assert bindings["opacitySlider"] == "overlayOpacity"
    assert bindings["teacherOutputsComboBox"] == "teacherOutputs"
    assert bindings["withoutLabelsCheckBox"] == "withoutLabels"
    assert "modelComboBox" not in bindings and "methodComboBox" not in bindings  # synced by the panel
    assert bindings["studentNormComboBox"] == "studentNorm"
    assert bindings["studentStemComboBox"] == "studentStem"
    assert len(bindings) == 19


def test_screenshot_is_written_and_the_committed_one_is_current(rendered):
    """The README's screenshot is this render of the real .ui (re-run scripts/render_panel.py)."""
    report, out = rendered
    width, height = _png_size(out)
    assert (width, height) == tuple(report["size"]) and width >= 400 and 400 <= height <= 800, (width, height)
    assert SCREENSHOT.is_file(), "run scripts/render_panel.py to make the extension screenshot"
    assert _png_size(SCREENSHOT) == (width, height), "the committed screenshot is stale; re-run scripts/render_panel.py"
