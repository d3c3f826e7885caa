"""``ReCoKDTest``'s data, built without the network (the extensions build server has none):
the synthetic dataset is a valid nnU-Net raw dataset the library reads, and the small teacher is a
model file the library loads and distils from."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import slicer_stubs

ROOT = Path(__file__).resolve().parents[1]
SELF_TEST = ROOT / "ReCoKD" / "ReCoKDModule" / "selfTest.py"


@pytest.fixture()
def self_test(monkeypatch):
    keep = slicer_stubs.loaded_modules()
    slicer_stubs.install(monkeypatch, slicer_stubs.stub_modules())
    yield slicer_stubs.import_module_code("selfTest")
    slicer_stubs.forget_module_code(keep)


def test_the_self_test_downloads_nothing():
    tree = ast.parse(SELF_TEST.read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not {"downloadSample", "urlopen", "requests", "fetch"} & names
    assert not [s for s in strings if "http" in s or s == "fetch"]
    shell = (ROOT / "ReCoKD" / "ReCoKD.py").read_text()
    assert "runSelfTest(self)" in shell


def test_synthetic_dataset_is_a_dataset_the_library_reads(self_test, tmp_path):
    from ReCoKDLib.data.layout import RawDataset

    folder = self_test.writeSyntheticDataset(tmp_path / "Dataset900_Synthetic")
    dataset = RawDataset.open(folder)
    assert dataset.class_names == self_test.CLASSES and len(dataset.training_cases()) == 3
    image, labels = self_test.syntheticCase(0)
    assert image.shape == labels.shape == self_test.SHAPE
    assert set(np.unique(labels)) == {0, 1, 2}
    assert image[labels == 2].mean() > image[labels == 0].mean() + 100  # organs stand out


def test_small_teacher_loads_with_the_datasets_classes(self_test, tmp_path):
    pytest.importorskip("torch")
    from ReCoKDLib.checkpoint import read_model_card
    from ReCoKDLib.teachers import load_model

    path = self_test.writeTinyTeacher(tmp_path / "teacher.pt")
    card = read_model_card(path)
    assert card.classes == self_test.CLASSES and card.tap_names
    assert load_model(str(path), "cpu").card.classes == self_test.CLASSES


class PopenRunner:
    """The ``ProcessRunner`` of the self test outside Slicer: a real child process whose lines are
    delivered on the calling thread when ``slicer.app.processEvents()`` runs (as QProcess signals
    are delivered by Qt's event loop)."""

    def __init__(self, events):
        self.events, self.process = events, None

    def start(self, program, arguments, environment, onLine, onFinished):
        import os
        import subprocess
        import threading

        self.process = subprocess.Popen([program, *arguments], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env={**os.environ, **environment, "OMP_NUM_THREADS": "1"})
        self.done = False

        def read():
            for line in self.process.stdout:
                self.events.append(lambda line=line: onLine(line))
            code = self.process.wait()
            self.events.append(lambda: (setattr(self, "done", True), onFinished(code)))

        threading.Thread(target=read, daemon=True).start()

    def isRunning(self):
        return self.process is not None and not self.done

    def terminate(self):
        self.process.terminate()

    def kill(self):
        self.process.kill()


@pytest.mark.mrml
@pytest.mark.slow
def test_the_whole_self_test_runs_on_slicer_core(monkeypatch):
    """``runSelfTest`` itself on a real MRML scene (slicer-core), its child processes real:
    distillation on the synthetic data, background and in-process Segment, Inspect."""
    import unittest

    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' is not slicer-core")
    pytest.importorskip("torch")
    import ReCoKDLib.mrml  # noqa: F401  (bound to the real slicer before the stubs)

    keep = slicer_stubs.loaded_modules()
    slicer_stubs.install(monkeypatch, slicer_stubs.stub_modules(), keep_real=("slicer", "slicer.util", "vtk"))
    events = []

    def processEvents():
        while events:
            events.pop(0)()

    monkeypatch.setattr(slicer, "mrmlScene", slicer.vtkMRMLScene(), raising=False)
    monkeypatch.setattr(slicer, "app", type("App", (), {"processEvents": staticmethod(processEvents)})(),
                        raising=False)
    try:
        self_test = slicer_stubs.import_module_code("selfTest")
        logic_module = slicer_stubs.import_module_code("logic")
        monkeypatch.setattr(logic_module, "QProcessRunner", lambda: PopenRunner(events))

        class Case(unittest.TestCase):
            def delayDisplay(self, message):
                print(message)

            def runTest(self):
                self_test.runSelfTest(self)

        result = unittest.TextTestRunner(verbosity=0).run(Case())
        assert result.wasSuccessful(), (result.failures + result.errors)[0][1]
    finally:
        slicer_stubs.forget_module_code(keep)
