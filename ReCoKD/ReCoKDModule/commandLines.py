"""The ``python -m ReCoKDLib ...`` command lines the panel starts, and the devices it offers.

Pure Python (no Qt, no MRML): each function returns ``(arguments, environment)`` for a child
process; ``Testing/test_slicer_module_logic.py`` parses them with the CLI's own parsers.

Devices are stored as ``"auto"``, ``"cpu"`` or ``"cuda:<n>"`` (what ``ReCoKDLib.infer.resolve_device``
takes). A child job pinned to GPU ``n`` gets ``CUDA_VISIBLE_DEVICES=<n>`` and ``--device cuda``, so
every library in it sees one GPU; an in-process job gets ``cuda:<n>`` (:func:`torchDevice`).
"""

import pathlib
import re
from dataclasses import dataclass

from slicer.i18n import tr as _


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
    """What ``recokd distill`` needs (the panel's Distill section)."""

    teacher: str
    dataset: str
    outputFolder: str
    method: str = "recokd"
    reduction: int = 4
    steps: int = 1000
    device: str = "auto"
    resume: bool = False

    def validate(self) -> list:
        """Human-readable problems; empty when the options can run."""
        problems = []
        teacher = str(self.teacher or "")
        if not teacher or not (teacher.startswith("preset:") or pathlib.Path(teacher).exists()):
            problems.append(_("Select a teacher: a weights file, an nnU-Net model folder or a preset "
                              "(or train a teacher first)."))
        if not chosenPath(self.dataset) or not pathlib.Path(self.dataset).is_dir():
            problems.append(_("Select labelled data: an nnU-Net folder or a volume + segmentation pair."))
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


def distillArguments(options: DistillOptions) -> tuple:
    """``(arguments, environment)`` of ``python -m ReCoKDLib distill ...`` for ``options``."""
    deviceValue, env = deviceArguments(options.device)
    args = ["-m", "ReCoKDLib", "distill", str(options.teacher),
            "--data", str(options.dataset),
            "--out", str(options.outputFolder),
            "--kd", str(options.method),
            "--reduction", str(int(options.reduction)),
            "--steps", str(int(options.steps)),
            "--device", deviceValue,
            "--progress", "json"]
    if options.resume:
        args.append("--resume")
    return args, env


def trainTeacherArguments(dataset: str, outputFolder: str, steps: int, device: str = "auto") -> tuple:
    """``(arguments, environment)`` of ``python -m ReCoKDLib train-teacher ...``."""
    deviceValue, env = deviceArguments(device)
    return (["-m", "ReCoKDLib", "train-teacher", "--data", str(dataset), "--out", str(outputFolder),
             "--steps", str(int(steps)), "--device", deviceValue, "--progress", "json"], env)


def segmentArguments(model: str, image: str, output: str, device: str = "auto") -> tuple:
    """``(arguments, environment)`` of ``python -m ReCoKDLib segment MODEL IMAGE OUT ...``."""
    deviceValue, env = deviceArguments(device)
    return (["-m", "ReCoKDLib", "segment", str(model), str(image), str(output),
             "--device", deviceValue, "--progress", "json"], env)
