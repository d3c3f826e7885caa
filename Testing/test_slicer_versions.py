"""Supported Slicer and Python versions: 3D Slicer 5.10 and later (Python 3.12).

Slicer 5.8 shipped Python 3.9; 5.10 and 5.12 ship Python 3.12 (Slicer's ``SuperBuild/External_python.cmake``
at tags v5.8.0 / v5.10.0). What must hold, and is checked here:

* on an old Slicer the module loads far enough to *say* it is too old: ``ReCoKD/ReCoKD.py`` and
  ``ReCoKDModule/versions.py`` (imported before the check) run on Python 3.9, and
  ``python -m ReCoKDLib`` (the child process) prints why on 3.9 instead of a traceback;
* the version is read from ``slicer.app.majorVersion`` / ``minorVersion`` (Q_PROPERTYs of
  ``Base/QTCore/qSlicerCoreApplication.h``, v5.10.0);
* every ``ReCoKDLib`` and module file compiles on Python 3.12 with warnings as errors (3.12 made
  invalid escape sequences a SyntaxWarning), and ``ReCoKDLib`` imports on 3.12 where it needs no
  third-party package. Run-time type aliases such as ``X = tuple[A, B | None] | None`` are fine
  from Python 3.10 on: they are a 3.9 problem only, which the version check covers.

The real interpreters come from pyenv on this machine (``/root/.pyenv/versions``); the syntax
checks run on the test interpreter in every case (``ast.parse(feature_version=...)``).
"""

from __future__ import annotations

import ast
import glob
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import slicer_stubs

ROOT = Path(__file__).resolve().parents[1]
SHELL_FILES = [ROOT / "ReCoKD" / "ReCoKD.py", ROOT / "ReCoKD" / "ReCoKDModule" / "__init__.py",
               ROOT / "ReCoKD" / "ReCoKDModule" / "versions.py", ROOT / "ReCoKDLib" / "__init__.py",
               ROOT / "ReCoKDLib" / "__main__.py"]


def _python(version: str) -> str | None:
    found = sorted(glob.glob(f"/root/.pyenv/versions/{version}.*/bin/python{version}"))
    return found[-1] if found else None


PYTHON39, PYTHON312 = _python("3.9"), _python("3.12")


# ``stubs``: conftest.py


def test_the_message_names_the_supported_versions(stubs):
    versions = slicer_stubs.import_module_code("versions")
    assert versions.unsupportedMessage(5, 10, (3, 12, 10)) is None
    assert versions.unsupportedMessage(5, 12, (3, 12)) is None and versions.unsupportedMessage(6, 0, (3, 13)) is None
    message = versions.unsupportedMessage(5, 8, (3, 9, 10))
    assert "5.10 or later" in message and "3D Slicer 5.8" in message and "Python is 3.9" in message


def test_an_old_slicer_shows_the_message_instead_of_the_panel(monkeypatch):
    keep = slicer_stubs.loaded_modules()
    modules = slicer_stubs.stub_modules(slicer_version=(5, 8))
    slicer_stubs.install(monkeypatch, modules)
    try:
        shell = slicer_stubs.import_shell()
        assert not any(n.startswith("ReCoKDModule.") and n != "ReCoKDModule.versions" for n in sys.modules), (
            "nothing but the version check may be imported on an unsupported Slicer")
        module = shell.ReCoKD.__new__(shell.ReCoKD)
        module.parent = type("Parent", (), {})()
        shell.ReCoKD.__init__(module, module.parent)
        assert "needs 3D Slicer 5.10 or later" in module.parent.helpText
        widget = shell.ReCoKDWidget.__new__(shell.ReCoKDWidget)
        shell.ReCoKDWidget.__init__(widget)
        added = []
        widget.layout = type("Layout", (), {"addWidget": lambda self, w: added.append(w),
                                            "addStretch": lambda self, n: None})()
        widget.setup()
        assert widget.panel is None and "needs 3D Slicer 5.10" in added[0].text
        with pytest.raises(RuntimeError, match="5.10 or later"):
            shell.ReCoKDLogic()
    finally:
        slicer_stubs.forget_module_code(keep)


def test_files_read_before_the_check_are_python_39_syntax():
    for path in SHELL_FILES:
        ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=(3, 9))
        # nothing after the check may be imported from them at module level with 3.10+ types
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*match .*:$", text, re.M), path


@pytest.mark.skipif(PYTHON39 is None, reason="no Python 3.9 interpreter (pyenv) on this machine")
def test_python_39_loads_the_module_file_and_gets_the_message(tmp_path):
    """ReCoKD.py executed by a real Python 3.9 (Slicer 5.8's) under the stubs: no SyntaxError,
    no TypeError from a 3.10 annotation, the widget shows the message."""
    script = tmp_path / "run39.py"
    script.write_text(f"""
import sys, types
sys.path.insert(0, {str(ROOT / 'ReCoKD')!r})
slicer = types.ModuleType("slicer")
slm = types.ModuleType("slicer.ScriptedLoadableModule")
for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
             "ScriptedLoadableModuleTest"):
    setattr(slm, name, type(name, (), {{"__init__": lambda self, *a, **k: None, "setup": lambda self: None}}))
slicer.ScriptedLoadableModule = slm
slicer.app = types.SimpleNamespace(majorVersion=5, minorVersion=8)
qt = types.ModuleType("qt")
qt.QLabel = type("QLabel", (), {{"__init__": lambda self, text="": setattr(self, "text", text)}})
sys.modules.update({{"slicer": slicer, "slicer.ScriptedLoadableModule": slm, "qt": qt}})
import importlib.util
spec = importlib.util.spec_from_file_location("ReCoKD", {str(ROOT / 'ReCoKD' / 'ReCoKD.py')!r})
shell = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shell)
widget = shell.ReCoKDWidget()
shown = []
widget.layout = types.SimpleNamespace(addWidget=shown.append, addStretch=lambda n: None)
widget.setup()
print(shown[0].text)
""")
    result = subprocess.run([PYTHON39, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ReCoKD needs 3D Slicer 5.10 or later" in result.stdout and "Python is 3.9" in result.stdout


@pytest.mark.skipif(PYTHON39 is None, reason="no Python 3.9 interpreter (pyenv) on this machine")
def test_the_child_process_says_why_on_python_39():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([PYTHON39, "-m", "ReCoKDLib", "segment", "m.pt", "in.nrrd", "out.nrrd", "--progress",
                             "json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert '"event": "error"' in result.stdout and "needs Python 3.10 or later" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(PYTHON312 is None, reason="no Python 3.12 interpreter (pyenv) on this machine")
def test_everything_compiles_on_python_312_with_warnings_as_errors(tmp_path):
    files = sorted(str(p) for folder in ("ReCoKDLib", "ReCoKD") for p in (ROOT / folder).rglob("*.py")
                   if "__pycache__" not in p.parts)
    script = ("import sys, warnings\nwarnings.simplefilter('error')\nbad = []\n"
              "for f in sys.argv[1:]:\n"
              "    try:\n        compile(open(f, encoding='utf-8').read(), f, 'exec')\n"
              "    except (SyntaxError, SyntaxWarning) as exc:\n        bad.append(f'{f}: {exc}')\n"
              "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n")
    result = subprocess.run([PYTHON312, "-c", script, *files], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(files) > 60


@pytest.mark.skipif(PYTHON312 is None, reason="no Python 3.12 interpreter (pyenv) on this machine")
def test_the_library_imports_on_python_312():
    """Without numpy or torch on that interpreter, the parts that need none import; the CLI parses
    its table and refuses nothing because of the Python version."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = ("import ReCoKDLib, ReCoKDLib.progress, ReCoKDLib.choices, ReCoKDLib.cli\n"
              "print(len(ReCoKDLib.choices.KD_METHODS), ReCoKDLib.choices.builtin_teacher_presets())\n"
              "ReCoKDLib.cli.build_parser(None)\n")
    result = subprocess.run([PYTHON312, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("12 ['hd-bet'")


def test_the_extension_build_states_the_same_minimum(stubs):
    """``find_package(Slicer 5.10 REQUIRED)`` is refused by an older Slicer's
    ``CMake/SlicerConfigVersion.cmake`` (v5.10.0: ``PACKAGE_VERSION`` is ``Slicer_VERSION``, major.minor);
    the description says it to whoever browses the Extensions Manager."""
    text = (ROOT / "CMakeLists.txt").read_text()
    versions = slicer_stubs.import_module_code("versions")
    minimum = ".".join(str(v) for v in versions.MINIMUM_SLICER)
    assert f"set(RECOKD_MINIMUM_SLICER_VERSION {minimum})" in text
    assert "find_package(Slicer ${RECOKD_MINIMUM_SLICER_VERSION} REQUIRED)" in text
    description = re.search(r'set\(EXTENSION_DESCRIPTION "([^"]*)"\)', text).group(1)
    assert f"3D Slicer {minimum} or later" in description
    readme = (ROOT / "README.md").read_text()
    assert f"3D Slicer {minimum} or later" in readme
