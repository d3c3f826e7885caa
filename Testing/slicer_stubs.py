"""``sys.modules`` stand-ins for 3D Slicer's Python (``slicer``, ``qt``, ``ctk``, ``vtk``) so that
the module's code (``ReCoKD/ReCoKD.py``, ``ReCoKD/ReCoKDModule``) imports outside Slicer.

They only let the code import and record what it calls; behaviour Slicer really has is mirrored
where a test needs it, each with the Slicer/CTK/PythonQt source it follows:

* ``Choice``, ``WithinRange``: value holders with the attributes of
  ``Base/Python/slicer/parameterNodeWrapper/validators.py`` (``choices``, ``minimum``, ``maximum``);
* ``parameterNodeWrapper`` keeps the class (its ``__annotations__`` are what the real decorator reads);
* distinct empty base classes (not ``object``) keep the widget's multiple-inheritance MRO;
* ``slicer.util.pip_install`` and ``slicer.packaging.pip_ensure`` are tripwires (nothing may
  install at import).

``loaded_module_code(monkeypatch, ...)`` imports the package under these stubs and forgets it
afterwards, so every test gets fresh modules bound to its own stubs.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "ReCoKD"


class Tripwire(AssertionError):
    pass


def _trip(*args, **kwargs):
    raise Tripwire(f"installing at import time: {args} {kwargs}")


class Choice:
    def __init__(self, choices):
        self.choices = list(choices)


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


class Minimum:
    def __init__(self, minimum):
        self.minimum = minimum


class Maximum:
    def __init__(self, maximum):
        self.maximum = maximum


class RangeBounds(WithinRange):
    pass


def stub_modules(slicer_version=(5, 10)) -> dict[str, types.ModuleType]:
    slicer = types.ModuleType("slicer")
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(slm, name, type(name, (), {"__init__": lambda self, *a, **k: None, "setup": lambda self: None}))
    slm.ScriptedLoadableModuleLogic.getParameterNode = lambda self: None
    util = types.ModuleType("slicer.util")
    util.VTKObservationMixin = type("VTKObservationMixin", (), {"__init__": lambda self: None})
    util.pip_install = _trip
    util.confirmOkCancelDisplay = lambda *a, **k: True
    util.confirmYesNoDisplay = lambda *a, **k: False  # asked to trust code: No unless a test says Yes
    util.errorDisplay = lambda *a, **k: None
    util.layer_calls = []
    util.setSliceViewerLayers = lambda **kw: util.layer_calls.append(kw)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice, pnw.WithinRange, pnw.Minimum, pnw.Maximum, pnw.RangeBounds = (
        Choice, WithinRange, Minimum, Maximum, RangeBounds)
    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = _trip
    slicer.vtkMRMLNode = type("vtkMRMLNode", (), {})
    for name in ("vtkMRMLMarkupsROINode", "vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode"):
        setattr(slicer, name, type(name, (slicer.vtkMRMLNode,), {}))
    slicer.app = types.SimpleNamespace(majorVersion=slicer_version[0], minorVersion=slicer_version[1])
    slicer.ScriptedLoadableModule, slicer.util, slicer.i18n = slm, util, i18n
    slicer.parameterNodeWrapper, slicer.packaging = pnw, packaging
    qt = types.ModuleType("qt")
    qt.QLabel = type("QLabel", (), {"__init__": lambda self, text="": setattr(self, "text", text)})
    return {"slicer": slicer, "slicer.ScriptedLoadableModule": slm, "slicer.util": util, "slicer.i18n": i18n,
            "slicer.parameterNodeWrapper": pnw, "slicer.packaging": packaging,
            "qt": qt, "ctk": types.ModuleType("ctk"), "vtk": types.ModuleType("vtk")}


def forget_module_code(keep: set[str] | None = None) -> None:
    """Forget the module's code, and the ``ReCoKDLib`` modules imported since ``keep`` was taken
    (they may hold the stub ``slicer``): both are imported anew by the next test."""
    for name in [n for n in sys.modules if n.split(".")[0] in ("ReCoKDModule", "ReCoKD_shell")
                 or (keep is not None and n not in keep and n.startswith("ReCoKDLib."))]:
        module = sys.modules.pop(name)
        parent, _, child = name.rpartition(".")
        if parent in sys.modules and getattr(sys.modules[parent], child, None) is module:
            delattr(sys.modules[parent], child)  # else `from parent import child` finds the old one


def loaded_modules() -> set[str]:
    return set(sys.modules)


def install(monkeypatch, stubs: dict[str, types.ModuleType], keep_real: tuple[str, ...] = ()) -> None:
    """Put ``stubs`` into ``sys.modules`` (except ``keep_real``) and the module folder on the path."""
    for name, module in stubs.items():
        if name in keep_real:
            continue
        monkeypatch.setitem(sys.modules, name, module)
        if name.startswith("slicer.") and "slicer" in keep_real:
            monkeypatch.setattr(sys.modules["slicer"], name.split(".", 1)[1], module, raising=False)
    monkeypatch.syspath_prepend(str(MODULE_DIR))
    forget_module_code()


def import_module_code(name: str):
    """``ReCoKDModule.<name>`` freshly imported (call after :func:`install`)."""
    return importlib.import_module(f"ReCoKDModule.{name}")


def import_shell():
    """``ReCoKD/ReCoKD.py`` itself, freshly executed (call after :func:`install`)."""
    spec = importlib.util.spec_from_file_location("ReCoKD_shell", MODULE_DIR / "ReCoKD.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ReCoKD_shell"] = module
    spec.loader.exec_module(module)
    return module
