"""The models ``recokd serve`` offers: files and folders from the command line, and teacher presets.

Pure Python (no trame, no MRML): a :class:`ModelChoice` per model, found by :func:`find_models`.
Every model file is checked when the server starts (a file that is not a model is refused there,
with the reason) and titled from its model card, so two ``model_last.pt`` of different runs can
be told apart::

    student (ReCo-KD + Output probabilities) · 11 classes · 0.30 M parameters · distilled from
    teacher/model_last.pt — distilled/model_last.pt
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

from ReCoKDLib.mrml.logic import PRESET_PREFIX, SceneLogicError, available_presets, model_source_kind

__all__ = ["CatalogueError", "ModelChoice", "find_models", "check_pair", "MODEL_SUFFIXES"]

#: files that may be models: ReCoKD model files and TorchScript archives
MODEL_SUFFIXES = (".pt", ".pth", ".ts")


class CatalogueError(ValueError):
    """A model path given on the command line does not exist, is not a model, or holds none."""


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model pickers.

    Attributes:
        source: what :class:`~ReCoKDLib.mrml.logic.ModelCache` loads (a path or ``preset:<name>``).
        title: what the page shows (from the model card, see the module docstring).
        kind: ``file``, ``nnunet`` or ``preset``.
        role: ``teacher`` or ``student`` (the card's role; nnU-Net folders and presets are teachers).
        classes: the classes it segments (background first), when known without loading weights.
        sha256: of a model file (what a student's card records as its teacher).
        teacher_sha256: for a distilled student, the SHA-256 of its teacher's file.
    """

    source: str
    title: str
    kind: str
    role: str = "teacher"
    classes: tuple = ()
    sha256: str = ""
    teacher_sha256: str = ""
    label: str = field(default="", compare=False)

    def as_item(self) -> dict:
        return {"title": self.title, "value": self.source}


def _is_model_file(path: Path) -> bool:
    if path.suffix.lower() not in MODEL_SUFFIXES or path.name.startswith("."):
        return False
    if path.name in ("checkpoint.pt", "checkpoint_last.pt"):  # resumable training state, not a model
        return False
    return path.with_suffix(".json").is_file() or path.suffix.lower() == ".ts"


def _parameters(state_dict) -> int:
    """Parameters in a state dict, each tensor counted once: a network that registers a module
    under two names (MONAI's DynUNet: ``skip_layers`` and ``downsamples``) saves it twice, sharing
    storage."""
    seen, total = set(), 0
    for key, value in state_dict.items():
        if not hasattr(value, "numel") or key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if identity not in seen:
            seen.add(identity)
            total += int(value.numel())
    return total


def _methods(card) -> str:
    from ReCoKDLib.choices import kd_method

    names = []
    for name in (card.kd or {}).get("methods") or {}:
        try:
            names.append(kd_method(name).title.split(" (")[0])
        except KeyError:
            names.append(str(name))
    return " + ".join(names)


def _file_choice(path: Path, label: str) -> ModelChoice:
    """A model file checked and described from its card (weights read safely, never run).

    Raises:
        CatalogueError: not a model file, unsafe, or no readable card (the reason is in the message).
    """
    from ReCoKDLib import checkpoint

    try:
        reason = checkpoint.not_a_torch_file_reason(path)
        if reason:
            raise checkpoint.NotAModelFileError(f"{path} is not a model file: {reason}")
        if path.suffix.lower() == ".ts":
            if not checkpoint.card_path_for(path).is_file():
                raise checkpoint.CheckpointError(f"TorchScript file {path} needs its model card "
                                                 f"{checkpoint.card_path_for(path).name} beside it")
            card, parameters = checkpoint.read_model_card(path), None
        else:
            card, state = checkpoint.load_model_file(path)
            parameters = _parameters(state)
        sha = checkpoint.sha256_file(path)
    except (ValueError, OSError, KeyError) as exc:
        raise CatalogueError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
    return ModelChoice(str(path), _card_title(card, parameters), "file", role=str(card.role or "teacher"),
                       classes=tuple(card.classes), sha256=sha, label=label,
                       teacher_sha256=str((card.provenance or {}).get("teacher_sha256") or ""))


def _card_title(card, parameters: int | None) -> str:
    """The card part of a title: role, methods, classes, size (the file and teacher come later)."""
    methods = _methods(card) if card.role == "student" else ""
    head = f"{card.role}{f' ({methods})' if methods else ''}"
    classes = card.classes[1:]
    what = ", ".join(classes) if len(classes) <= 3 else f"{len(classes)} classes"
    size = f" · {parameters / 1e6:.2f} M parameters" if parameters is not None else ""
    channels = f" · {card.in_channels} input channels" if int(card.in_channels or 1) != 1 else ""
    return f"{head} · {what}{channels}{size}"


def _folder_models(folder: Path) -> list[ModelChoice]:
    """Models in ``folder``: itself when it is an nnU-Net model folder, else model files and
    nnU-Net model folders up to two levels down."""
    try:
        if model_source_kind(folder) == "nnunet":
            return [_nnunet_choice(folder, folder.name)]
    except SceneLogicError:
        pass
    found = []
    for path in sorted(folder.glob("*")) + sorted(folder.glob("*/*")):
        if path.is_file() and _is_model_file(path):
            found.append(_file_choice(path, str(path.relative_to(folder))))
        elif path.is_dir() and (path / "plans.json").is_file():
            try:
                if model_source_kind(path) == "nnunet":
                    found.append(_nnunet_choice(path, str(path.relative_to(folder))))
            except SceneLogicError:
                continue
    return found


def _nnunet_choice(folder: Path, label: str) -> ModelChoice:
    classes: tuple = ()
    try:
        import json

        labels = json.loads((folder / "dataset.json").read_text()).get("labels", {})
        classes = tuple(sorted(labels, key=lambda name: labels[name] if isinstance(labels[name], int) else 0))
    except (OSError, ValueError, TypeError):
        pass
    what = f" · {len(classes) - 1} classes" if classes else ""
    return ModelChoice(str(folder), f"nnU-Net teacher{what}", "nnunet", classes=classes, label=label)


def _with_titles(choices: list[ModelChoice]) -> list[ModelChoice]:
    """Final titles: the card part, the teacher a student was distilled from, and a file label that
    tells equal file names apart (``run_a/model_last.pt`` and ``run_b/model_last.pt``)."""
    labels = {c.source: c.label for c in choices}
    for _ in range(4):  # lengthen clashing labels with parent folders
        counts: dict[str, int] = {}
        for label in labels.values():
            counts[label] = counts.get(label, 0) + 1
        clashing = [s for s, label in labels.items() if counts[label] > 1 and not label.startswith("/")]
        if not clashing:
            break
        for source in clashing:
            parts = Path(source).parts
            depth = len(Path(labels[source]).parts) + 1
            labels[source] = str(Path(*parts[-depth:])) if depth <= len(parts) else source
    by_sha = {c.sha256: labels[c.source] for c in choices if c.sha256}
    titled = []
    for choice in choices:
        if choice.kind == "preset":
            titled.append(choice)
            continue
        teacher = ""
        if choice.teacher_sha256:
            teacher = (f" · distilled from {by_sha[choice.teacher_sha256]}" if choice.teacher_sha256 in by_sha
                       else f" · distilled from a teacher not listed here (sha256 {choice.teacher_sha256[:8]})")
        titled.append(replace(choice, label=labels[choice.source],
                              title=f"{choice.title}{teacher} — {labels[choice.source]}"))
    return titled


def find_models(paths: Iterable[str | os.PathLike] = (), presets: bool = True) -> list[ModelChoice]:
    """The pickers' entries: each path is a model file, an nnU-Net model folder, a folder holding
    models, or ``preset:<name>``; teacher presets follow when ``presets`` is true.

    Raises:
        CatalogueError: a path that does not exist, is not a model file (random bytes, text, an
            unsafe pickle; the reason is given) or holds no model.
    """
    choices: list[ModelChoice] = []
    for entry in paths:
        text = str(entry)
        if text.startswith(PRESET_PREFIX):
            choices.append(ModelChoice(text, f"{text[len(PRESET_PREFIX):]} (preset teacher)", "preset"))
            continue
        path = Path(text).expanduser()
        if path.is_file():
            choices.append(_file_choice(path, path.name))
        elif path.is_dir():
            found = _folder_models(path)
            if not found:
                raise CatalogueError(f"{path} holds no model: expected ReCoKD model files (*.pt with their .json "
                                     "card), TorchScript files (*.ts) or nnU-Net v2 model folders")
            choices.extend(found)
        else:
            raise CatalogueError(f"model {path} does not exist")
    if presets:
        choices.extend(ModelChoice(PRESET_PREFIX + name, f"{name} (preset teacher)", "preset")
                       for name in available_presets())
    unique: dict[str, ModelChoice] = {}
    for choice in choices:
        unique.setdefault(choice.source, choice)
    return _with_titles(list(unique.values()))


def check_pair(teacher: ModelChoice | None, student: ModelChoice | None) -> str:
    """Why ``teacher`` and ``student`` cannot be inspected together, or ``""`` when they can (or
    when the classes of one are not known before loading it).

    A pair belongs together when both segment the same classes; a student whose card names a
    different teacher is still allowed (it may be compared with any teacher of its classes).
    """
    if teacher is None or student is None:
        return "choose a teacher and a student to compare"
    if teacher.source == student.source:
        return "the teacher and the student are the same model; choose the student distilled from this teacher"
    if student.role != "student":
        return f"{student.label or student.source} is a {student.role}, not a student"
    if teacher.classes and student.classes and list(teacher.classes) != list(student.classes):
        return (f"teacher and student segment different classes: teacher {list(teacher.classes)}, student "
                f"{list(student.classes)}; choose the student distilled from this teacher")
    return ""
