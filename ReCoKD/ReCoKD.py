"""ReCoKD: segment with small, fast students distilled from large 3D segmentation networks.

This file is what Slicer loads: the module's metadata, the widget and logic Slicer looks up by
name, and the self test. The code lives in the ``ReCoKDModule`` package beside it (one job per
file) and in ``ReCoKDLib`` (the library, also the ``recokd`` command).

Supported: 3D Slicer 5.10 and later (Python 3.12). The version is checked first, before anything
that needs a newer Python is imported, so an older Slicer shows a clear message instead of failing
inside an import or a child process; this file and ``ReCoKDModule/versions.py`` therefore use no
syntax newer than Python 3.6.
"""

import logging
import os
import sys

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

#: the packages this module's code lives in (``onReload`` re-imports them all)
OWN_PACKAGES = ("ReCoKDModule", "ReCoKDLib")


def _addLibraryToPath():
    """``ReCoKDModule`` sits beside this file; ``ReCoKDLib`` too in an installed extension
    (``qt-scripted-modules``), or one folder up in a source checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(root, "ReCoKDLib", "__init__.py")) and root not in sys.path:
            sys.path.append(root)
    if here not in sys.path:
        sys.path.append(here)


_addLibraryToPath()

from ReCoKDModule.versions import unsupportedMessage  # noqa: E402  (needs the path above)


def versionProblem():
    """Why this Slicer cannot run ReCoKD (a sentence for the user), or ``None``."""
    app = getattr(slicer, "app", None)
    return unsupportedMessage(getattr(app, "majorVersion", 0), getattr(app, "minorVersion", 0), sys.version_info)


def _translate(text):
    try:
        from slicer.i18n import tr
    except ImportError:  # Slicer < 5.4 (then the version message is shown anyway)
        return text
    return tr(text)


#
# ReCoKD
#


class ReCoKD(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _translate("ReCoKD")
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["ReCoKD contributors"]
        self.parent.helpText = _translate(
            "Segment volumes with small, fast students distilled from large 3D segmentation networks: "
            "pick a volume and a model, click Segment. Researchers distill their own students from a "
            "teacher (a model file, an nnU-Net model folder or a preset) with region- and context-aware "
            "knowledge distillation, and inspect the region masks and affinity maps it optimised. "
            "Long jobs run in a background process and can be cancelled. Needs 3D Slicer 5.10 or later.")
        problem = versionProblem()
        if problem:
            self.parent.helpText += "\n\n" + problem
        self.parent.acknowledgementText = _translate(
            "ReCo-KD: Lan et al., region- and context-aware knowledge distillation for efficient 3D "
            "medical image segmentation. Built on MONAI, PyTorch and the SlicerPyTorch extension.")


#
# ReCoKDWidget
#


class ReCoKDWidget(ScriptedLoadableModuleWidget):
    """Embeds ``ReCoKDModule.panel.ReCoKDPanel``, or the version message on an older Slicer."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.panel = None
        self.logic = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        problem = versionProblem()
        if problem:
            label = qt.QLabel(problem)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            logging.error(problem)
            return
        from ReCoKDModule.panel import ReCoKDPanel

        self.panel = ReCoKDPanel(self.layout, self.resourcePath("UI/ReCoKD.ui"))
        self.logic = self.panel.logic

    def enter(self):
        if self.panel is not None:
            self.panel.enter()

    def exit(self):
        if self.panel is not None:
            self.panel.exit()

    def cleanup(self):
        if self.panel is not None:
            self.panel.cleanup()

    def onReload(self):
        """Re-import this module *and* its packages. ``slicer.util.reloadScriptedModule`` re-imports
        only this file; reloading the packages' modules one by one (``importlib.reload``) leaves
        stale ``from X import Y`` bindings whenever a module is reloaded before one it imports from.
        Forgetting them all instead makes the fresh import load each one once, in import order."""
        if self.panel is not None:
            self.panel.cleanup()
        forgetModules(OWN_PACKAGES)
        ScriptedLoadableModuleWidget.onReload(self)


def forgetModules(packages):
    """Remove ``packages`` and their submodules from ``sys.modules`` (the next import loads them anew)."""
    for name in [n for n in sys.modules if n.split(".")[0] in packages]:
        del sys.modules[name]


#
# ReCoKDLogic
#


if versionProblem() is None:
    from ReCoKDModule.logic import ReCoKDLogic  # noqa: E402,F401  (Slicer and scripts look it up here)
else:
    class ReCoKDLogic(ScriptedLoadableModuleLogic):
        """Stands in on an unsupported Slicer: every use says why."""

        def __init__(self, *args, **kwargs):
            raise RuntimeError(versionProblem())


#
# ReCoKDTest
#


class ReCoKDTest(ScriptedLoadableModuleTest):
    """The whole flow inside Slicer on data it builds itself (no network): distill a student for
    a few steps, segment in the background and in-process, inspect (``ReCoKDModule.selfTest``)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ReCoKDFlow()

    def test_ReCoKDFlow(self):
        problem = versionProblem()
        self.assertIsNone(problem, problem)
        from ReCoKDModule.selfTest import runSelfTest

        runSelfTest(self)
