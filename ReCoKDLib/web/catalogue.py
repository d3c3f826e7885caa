"""The models ``recokd serve`` offers: files and folders from the command line, and teacher presets.

Pure Python (no trame, no MRML): a :class:`ModelChoice` per model, found by :func:`find_models`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ReCoKDLib.mrml.logic import PRESET_PREFIX, SceneLogicError, available_presets, model_source_kind

__all__ = ["CatalogueError", "ModelChoice", "find_models", "MODEL_SUFFIXES"]

#: files that may be models: ReCoKD model files and TorchScript archives
MODEL_SUFFIXES = (".pt", ".pth", ".ts")


class CatalogueError(ValueError):
    """A model path given on the command line is neither a model, a model folder nor a folder of models."""


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model picker: ``source`` is what :class:`~ReCoKDLib.mrml.logic.ModelCache`
    loads (a path or ``preset:<name>``), ``title`` what the page shows, ``kind`` one of ``file``,
    ``nnunet``, ``preset``."""

    source: str
    title: str
    kind: str

    def as_item(self) -> dict:
        return {"title": self.title, "value": self.source}


def _is_model_file(path: Path) -> bool:
    if path.suffix.lower() not in MODEL_SUFFIXES or path.name.startswith("."):
        return False
    if path.name in ("checkpoint.pt", "checkpoint_last.pt"):  # resumable training state, not a model
        return False
    return path.with_suffix(".json").is_file() or path.suffix.lower() == ".ts"


def _folder_models(folder: Path) -> list[ModelChoice]:
    """Models in ``folder``: itself when it is an nnU-Net model folder, else model files and
    nnU-Net model folders up to two levels down."""
    try:
        if model_source_kind(folder) == "nnunet":
            return [ModelChoice(str(folder), f"{folder.name} (nnU-Net)", "nnunet")]
    except SceneLogicError:
        pass
    found = []
    for path in sorted(folder.glob("*")) + sorted(folder.glob("*/*")):
        if path.is_file() and _is_model_file(path):
            found.append(ModelChoice(str(path), str(path.relative_to(folder)), "file"))
        elif path.is_dir() and (path / "plans.json").is_file():
            try:
                if model_source_kind(path) == "nnunet":
                    found.append(ModelChoice(str(path), f"{path.relative_to(folder)} (nnU-Net)", "nnunet"))
            except SceneLogicError:
                continue
    return found


def find_models(paths: Iterable[str | os.PathLike] = (), presets: bool = True) -> list[ModelChoice]:
    """The picker's entries: each path is a model file, an nnU-Net model folder, a folder holding
    models, or ``preset:<name>``; teacher presets follow when ``presets`` is true.

    Raises:
        CatalogueError: a path that does not exist or holds no model (the message names it).
    """
    choices: list[ModelChoice] = []
    for entry in paths:
        text = str(entry)
        if text.startswith(PRESET_PREFIX):
            choices.append(ModelChoice(text, f"{text[len(PRESET_PREFIX):]} (preset)", "preset"))
            continue
        path = Path(text).expanduser()
        if path.is_file():
            choices.append(ModelChoice(str(path), path.name, "file"))
        elif path.is_dir():
            found = _folder_models(path)
            if not found:
                raise CatalogueError(f"{path} holds no model: expected ReCoKD model files (*.pt with their .json "
                                     "card), TorchScript files (*.ts) or nnU-Net v2 model folders")
            choices.extend(found)
        else:
            raise CatalogueError(f"model {path} does not exist")
    if presets:
        choices.extend(ModelChoice(PRESET_PREFIX + name, f"{name} (preset)", "preset") for name in available_presets())
    unique: dict[str, ModelChoice] = {}
    for choice in choices:
        unique.setdefault(choice.source, choice)
    return list(unique.values())
