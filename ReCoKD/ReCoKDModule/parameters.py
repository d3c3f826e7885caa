"""The panel's state, saved with the scene (``@parameterNodeWrapper``).

Which fields are bound to a widget by ``connectGui`` (the widget's ``SlicerParameterName`` in
``Resources/UI/ReCoKD.ui``) follows what Slicer's ``parameterNodeWrapper/guiConnectors.py`` can
connect; ``Testing/test_slicer_ui_contract.py`` checks every pair against those rules:

* a ``QComboBox`` only binds ``int/float/str/bool`` fields with a ``Choice`` annotation (and
  replaces its items by ``str(choice)``) or an ``Enum``;
* ``ctkSliderWidget`` and ``QSlider`` need a bounded number (``WithinRange``);
* ``ctkPathLineEdit`` binds ``pathlib.Path`` (an empty edit reads back as ``Path(".")``: see
  :func:`ReCoKDModule.commandLines.chosenPath`).

Fields whose choices are only known at run time (the models, devices, presets and classes) or
whose menu shows a title rather than the stored id (KD methods) are **not** bound: the panel
fills and syncs those combo boxes itself (:data:`SYNCED_BY_THE_PANEL`).
"""

import pathlib
from typing import Annotated

from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

from ReCoKDLib.choices import KD_METHODS
from ReCoKDModule.commandLines import STUDENT_NORMS, STUDENT_STEMS, TEACHER_OUTPUTS

STUDENT_REDUCTIONS = (2, 4, 8)
MAP_CHOICES = ("teacher attention", "student attention", "teacher affinity", "student affinity",
               "difference", "region mask")

#: field -> the combo box the panel fills and syncs (never given a SlicerParameterName)
SYNCED_BY_THE_PANEL = {
    "segmentModel": "modelComboBox",
    "device": "deviceComboBox",
    "teacherPreset": "teacherPresetComboBox",
    "method": "methodComboBox",
    "inspectClass": "classComboBox",
}


@parameterNodeWrapper
class ReCoKDParameterNode:
    # Segment (the clinician's section)
    inputVolume: vtkMRMLScalarVolumeNode
    segmentModel: str = ""  # a model file, an nnU-Net model folder or "preset:<name>"
    device: str = "auto"  # "auto", "cpu" or "cuda:<n>"
    roiNode: vtkMRMLMarkupsROINode
    outputSegmentation: vtkMRMLSegmentationNode
    # Teacher: a model file or an nnU-Net v2 model folder, or a preset (which then wins)
    teacherPath: pathlib.Path
    teacherPreset: str = ""
    # Data
    dataFolder: pathlib.Path
    trainingVolume: vtkMRMLScalarVolumeNode
    trainingSegmentation: vtkMRMLSegmentationNode
    # Distill
    method: Annotated[str, Choice([m.name for m in KD_METHODS])] = "recokd"
    studentReduction: Annotated[int, Choice(list(STUDENT_REDUCTIONS))] = 4
    studentNorm: Annotated[str, Choice(list(STUDENT_NORMS))] = "teacher"  # --student-norm unless "teacher"
    studentStem: Annotated[str, Choice(list(STUDENT_STEMS))] = "full"  # --student-stem
    steps: Annotated[int, WithinRange(1, 1000000)] = 1000
    teacherOutputs: Annotated[str, Choice(list(TEACHER_OUTPUTS))] = "auto"  # --teacher-outputs
    withoutLabels: bool = False  # --no-labels (or --images): learn from the teacher's predictions only
    outputFolder: pathlib.Path
    resume: bool = False
    # Inspect
    studentPath: pathlib.Path
    inspectLevel: Annotated[int, WithinRange(0, 8)] = 0
    inspectClass: str = ""
    inspectMap: Annotated[str, Choice(list(MAP_CHOICES))] = "teacher attention"
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
