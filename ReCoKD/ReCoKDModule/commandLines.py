"""The ``python -m ReCoKDLib ...`` command lines the panel starts, and the devices it offers.

Pure Python (no Qt, no MRML): each function returns ``(arguments, environment)`` for a child
process; ``Testing/test_slicer_module_logic.py`` and ``Testing/test_slicer_distill_options.py`` parse them with
the CLI's own parsers.

Devices are stored as ``"auto"``, ``"cpu"`` or ``"cuda:<n>"`` (what ``ReCoKDLib.infer.resolve_device``
takes). A child job pinned to GPU ``n`` gets ``CUDA_VISIBLE_DEVICES=<n>`` and ``--device cuda``, so
every library in it sees one GPU; an in-process job gets ``cuda:<n>`` (:func:`torchDevice`).

Distillation data (:func:`dataArguments`) take the CLI's forms: ``--data FOLDER`` (an nnU-Net raw
folder) with labels; without labels, ``--data FOLDER --no-labels`` for such a folder (its
``label_free_split`` chooses the training cases) or ``--images PATH`` for a folder of images or
one image file (a volume exported from the scene).

Code a model file names (an entry point, :mod:`ReCoKDLib.trust`) runs in a child only when the
user trusted it in this session: :func:`trustArguments` gives one ``--trust-entry-point`` per
trusted name, to the commands whose parser takes it (``ReCoKDLib.cli.MODEL_COMMANDS``: distill and
segment here; ``train-teacher`` loads no model and refuses the option).
"""

import pathlib
import re
from dataclasses import dataclass

from slicer.i18n import tr as _


#: ``recokd distill --teacher-outputs`` (``TrainConfig.teacher_outputs``), the default first
TEACHER_OUTPUTS = ("auto", "cache", "live")
#: the student's normalisation: ``"teacher"`` (the default: no option, the teacher's own) or
#: ``recokd distill --student-norm`` ``instance`` | ``batch`` (``TrainConfig.student_norm``)
STUDENT_NORMS = ("teacher", "instance", "batch")
#: ``recokd distill --student-stem`` (``TrainConfig.student_stem``), the default first: ``"strided"``
#: drops the teacher's full-resolution stage from the derived student
STUDENT_STEMS = ("full", "strided")


class ReCoKDInputError(ValueError):
    """A panel or console input is missing or invalid; the message says what to provide."""


_GPU = re.compile(r"^(?:gpu|cuda)\s*:?\s*(\d+)$")


def torchDevice(device: str) -> str:
    """A device as the panel stores or a user types it -> ``auto``, ``cpu``, ``cuda`` or ``cuda:<n>``.

    Accepts ``GPU 1`` and ``cuda1`` (older scenes and hand-typed text) as ``cuda:1``.

    Raises:
        ReCoKDInputError: not a device.
    """
    text = (device or "auto").strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return text
    match = _GPU.match(text)
    if match:
        return f"cuda:{int(match.group(1))}"
    raise ReCoKDInputError(_("Unknown device {device!r}; choose Automatic, CPU or a GPU.").format(device=device))


def deviceArguments(device: str) -> tuple:
    """``(--device value, extra environment)`` of a child job for a panel device."""
    device = torchDevice(device)
    if device.startswith("cuda:"):
        return "cuda", {"CUDA_VISIBLE_DEVICES": device.split(":", 1)[1]}
    return device, {}


def deviceChoices(gpuNames) -> list:
    """``[(device, menu text, tooltip)]``: automatic, CPU, then one entry per GPU."""
    choices = [("auto", _("Automatic"), _("The GPU when there is one, else the CPU")),
               ("cpu", _("CPU"), _("Run on the processor (slower; always available)"))]
    for index, name in enumerate(gpuNames):
        choices.append((f"cuda:{index}", _("GPU {index}: {name}").format(index=index, name=name),
                        _("Only this GPU (CUDA device {index})").format(index=index)))
    return choices


@dataclass
class DistillOptions:
    """What ``recokd distill`` needs (the panel's Distill section).

    ``dataset`` is an nnU-Net raw folder; with ``withoutLabels`` (``--no-labels``: the student learns
    from the teacher's predictions only) also a folder of images or one image file
    (:func:`dataArguments`). ``teacherOutputs`` is one of :data:`TEACHER_OUTPUTS`
    (``--teacher-outputs``), ``studentNorm`` one of :data:`STUDENT_NORMS` (``--student-norm``
    unless ``"teacher"``), ``studentStem`` one of :data:`STUDENT_STEMS` (``--student-stem``).
    """

    teacher: str
    dataset: str
    outputFolder: str
    method: str = "recokd"
    reduction: int = 4
    steps: int = 1000
    device: str = "auto"
    resume: bool = False
    teacherOutputs: str = "auto"
    withoutLabels: bool = False
    studentNorm: str = "teacher"
    studentStem: str = "full"

    def validate(self) -> list:
        """Human-readable problems; empty when the options can run."""
        problems = []
        teacher = str(self.teacher or "")
        if not teacher or not (teacher.startswith("preset:") or pathlib.Path(teacher).exists()):
            problems.append(_("Select a teacher: a weights file, an nnU-Net model folder or a preset "
                              "(or train a teacher first)."))
        dataset = chosenPath(self.dataset)
        if not self.withoutLabels:
            if dataset is None or not dataset.is_dir():
                problems.append(_("Select labelled data: an nnU-Net folder or a volume + segmentation pair."))
        elif dataset is None or not dataset.exists():
            problems.append(_("Select training images: an nnU-Net folder (its labels are not used), a folder of "
                              "images or a volume."))
        elif not isDatasetFolder(dataset):
            problems += imageProblems(dataset)
        if str(self.teacherOutputs) not in TEACHER_OUTPUTS:
            problems.append(_("Teacher outputs must be one of {choices}, not {value!r}.").format(
                choices=", ".join(TEACHER_OUTPUTS), value=self.teacherOutputs))
        if str(self.studentNorm) not in STUDENT_NORMS:
            problems.append(_("Student norm must be one of {choices}, not {value!r}.").format(
                choices=", ".join(STUDENT_NORMS), value=self.studentNorm))
        elif str(self.studentNorm) != "teacher" and teacher and pathlib.Path(teacher).is_dir():
            problems.append(_("Student norm {value!r} applies to a student of a built-in U-Net teacher; the student "
                              "of an nnU-Net model folder keeps the teacher's normalisation (choose 'teacher').").format(
                value=self.studentNorm))
        if str(self.studentStem) not in STUDENT_STEMS:
            problems.append(_("Student stem must be one of {choices}, not {value!r}.").format(
                choices=", ".join(STUDENT_STEMS), value=self.studentStem))
        elif str(self.studentStem) != "full" and teacher and pathlib.Path(teacher).is_dir():
            problems.append(_("A strided student stem applies to a student of a built-in U-Net teacher; the student "
                              "of an nnU-Net model folder keeps the teacher's stages (choose 'full')."))
        if not chosenPath(self.outputFolder):
            problems.append(_("Select an output folder for the student and its checkpoints."))
        if int(self.reduction) not in (2, 4, 8):
            problems.append(_("Student width must be divided by 2, 4 or 8."))
        if int(self.steps) < 1:
            problems.append(_("Training needs at least 1 step."))
        return problems


def chosenPath(path):
    """``path`` as a ``pathlib.Path``, or ``None`` when nothing was chosen.

    An empty ``ctkPathLineEdit`` reads back as ``""`` (CTK ``ctkPathLineEdit::currentPath`` returns
    the line edit's text) and Slicer's parameter node turns that into ``pathlib.Path("")``, which
    *is* ``Path(".")``: the working directory. Both mean "not chosen" here.
    """
    if path is None:
        return None
    text = str(path).strip()
    if text in ("", "."):
        return None
    return pathlib.Path(text)


def isDatasetFolder(path) -> bool:
    """True for a folder with a ``dataset.json`` (what ``recokd distill --data`` opens)."""
    return (pathlib.Path(str(path)) / "dataset.json").is_file()


def imageProblems(path) -> list:
    """Why ``recokd distill --images PATH`` would find no training image (the CLI's own reading,
    ``ReCoKDLib.commands.distill.image_cases``); empty when it finds some."""
    from ReCoKDLib.commands.distill import image_cases

    try:
        image_cases([str(path)])
    except ValueError as exc:
        return [_("No training images: {error}").format(error=exc)]
    return []


def dataArguments(dataset, withoutLabels: bool = False) -> list:
    """The data arguments of ``recokd distill``: ``--data FOLDER``; without labels, ``--data FOLDER
    --no-labels`` when FOLDER has a ``dataset.json`` (its ``label_free_split`` is honoured), else
    ``--images PATH`` (a folder of images or one image file: the CLI's other label-free form)."""
    if not withoutLabels:
        return ["--data", str(dataset)]
    if isDatasetFolder(dataset):
        return ["--data", str(dataset), "--no-labels"]
    return ["--images", str(dataset)]


def trustArguments(trustedEntryPoints=()) -> list:
    """``--trust-entry-point NAME`` for each trusted entry point, in a stable (sorted) order."""
    args = []
    for entryPoint in sorted(set(trustedEntryPoints or ())):
        args += ["--trust-entry-point", str(entryPoint)]
    return args


def distillArguments(options: DistillOptions, trustedEntryPoints=()) -> tuple:
    """``(arguments, environment)`` of ``python -m ReCoKDLib distill ...`` for ``options``; the
    teacher may run the code of ``trustedEntryPoints`` (:func:`trustArguments`)."""
    deviceValue, env = deviceArguments(options.device)
    args = ["-m", "ReCoKDLib", "distill", str(options.teacher),
            *dataArguments(options.dataset, options.withoutLabels),
            "--out", str(options.outputFolder),
            "--kd", str(options.method),
            "--reduction", str(int(options.reduction)),
            "--steps", str(int(options.steps)),
            "--teacher-outputs", str(options.teacherOutputs),
            "--device", deviceValue,
            "--progress", "json"]
    if str(options.studentNorm) != "teacher":
        args += ["--student-norm", str(options.studentNorm)]
    if str(options.studentStem) != "full":
        args += ["--student-stem", str(options.studentStem)]
    if options.resume:
        args.append("--resume")
    return args + trustArguments(trustedEntryPoints), env


def trainTeacherArguments(dataset: str, outputFolder: str, steps: int, device: str = "auto") -> tuple:
    """``(arguments, environment)`` of ``python -m ReCoKDLib train-teacher ...`` (it builds the
    built-in U-Net and loads no model file: no ``--trust-entry-point``, which its parser refuses)."""
    deviceValue, env = deviceArguments(device)
    return (["-m", "ReCoKDLib", "train-teacher", "--data", str(dataset), "--out", str(outputFolder),
             "--steps", str(int(steps)), "--device", deviceValue, "--progress", "json"], env)


def segmentArguments(model: str, image: str, output: str, device: str = "auto", trustedEntryPoints=()) -> tuple:
    """``(arguments, environment)`` of ``python -m ReCoKDLib segment MODEL IMAGE OUT ...``; the model
    may run the code of ``trustedEntryPoints`` (:func:`trustArguments`)."""
    deviceValue, env = deviceArguments(device)
    return (["-m", "ReCoKDLib", "segment", str(model), str(image), str(output),
             "--device", deviceValue, "--progress", "json", *trustArguments(trustedEntryPoints)], env)
