"""Students of nnU-Net teachers: the teacher's plans network with every width divided by ``2**t``.

ReCo-KD's student is "no custom design": the teacher's architecture with ``features_per_stage``
divided by ``reduction = 2**t`` and floored at ``min_channels`` (:func:`student_features`). For an
nnU-Net teacher that is the same ``PlainConvUNet``/``ResidualEncoderUNet`` with the same stages,
kernels, strides, norm and nonlinearity, built by ``nnunet.network`` from an architecture record
(``{"kind": "nnunet", ...}``, the model card's ``architecture``), so ``teachers.build_network`` and
``nnunet.export`` rebuild it. Training uses deep supervision (a list of logits, full resolution
first: one head per decoder stage, ``n_stages - 1``); inference the full-resolution head only. The
state dict is the same either way (DNA always holds every stage's ``seg_layers``).

What export needs besides the weights lives in the student card's ``provenance["nnunet"]``
(:func:`nnunet_context`): the teacher's ``plans`` and ``dataset_json``, its configuration name,
trainer and plans names and the dataset folder name.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from ReCoKDLib.nnunet import NNUNetError

__all__ = [
    "NNUNetStudentConfig",
    "student_features",
    "student_architecture",
    "nnunet_context",
    "is_nnunet_architecture",
]

NNUNET_KIND = "nnunet"


def is_nnunet_architecture(architecture: Mapping[str, Any] | None) -> bool:
    """Whether a model card's ``architecture`` is an nnU-Net (DNA) record."""
    return isinstance(architecture, Mapping) and architecture.get("kind") == NNUNET_KIND


def student_features(features: Sequence[int], reduction: int = 4, min_channels: int = 8) -> list[int]:
    """``max(C_i // reduction, min(min_channels, C_i))`` per stage (ReCo-KD's ``2**t`` reduction).

    Example:
        >>> student_features([32, 64, 128, 256, 320], 4)
        [8, 16, 32, 64, 80]
    """
    if reduction < 1 or reduction & (reduction - 1):
        raise NNUNetError(f"reduction must be a power of two (1, 2, 4, 8, ...), got {reduction}")
    if min_channels < 1:
        raise NNUNetError(f"min_channels must be >= 1, got {min_channels}")
    return [max(int(c) // reduction, min(min_channels, int(c))) for c in features]


def student_architecture(teacher: Mapping[str, Any], reduction: int = 4, min_channels: int = 8) -> dict[str, Any]:
    """The student's architecture record: the teacher's with ``features_per_stage`` reduced.

    Args:
        teacher: the teacher's ``{"kind": "nnunet", ...}`` record (``nnunet.network.architecture_record``).
        reduction, min_channels: see :func:`student_features`.
    """
    if not is_nnunet_architecture(teacher):
        raise NNUNetError(f"expected an nnU-Net architecture record ({{'kind': 'nnunet', ...}}); got kind "
                          f"{teacher.get('kind') if isinstance(teacher, Mapping) else type(teacher).__name__!r}")
    record = copy.deepcopy(dict(teacher))
    kwargs = record.get("arch_kwargs")
    if not isinstance(kwargs, Mapping) or "features_per_stage" not in kwargs:
        raise NNUNetError("the nnU-Net architecture record has no arch_kwargs.features_per_stage")
    features = kwargs["features_per_stage"]
    if isinstance(features, int):
        features = [features * 2**i for i in range(int(kwargs["n_stages"]))]
    record["arch_kwargs"]["features_per_stage"] = student_features(features, reduction, min_channels)
    return record


class NNUNetStudentConfig:
    """The engine's view of an nnU-Net-shaped network (what ``UNetConfig`` is for the built-in U-Net).

    Attributes:
        record: the architecture record.
        deep_supervision: train on every decoder head (always true here).
        deep_supr_num: auxiliary heads, ``n_stages - 2`` (heads in all: ``n_stages - 1``).
        divisor: per axis ``(D, H, W)``, the product of the strides (patch sizes must be multiples).
    """

    deep_supervision = True

    def __init__(self, record: Mapping[str, Any]) -> None:
        if not is_nnunet_architecture(record):
            raise NNUNetError("NNUNetStudentConfig needs an nnU-Net architecture record ({'kind': 'nnunet', ...})")
        self.record = copy.deepcopy(dict(record))
        kwargs = self.record["arch_kwargs"]
        self.num_stages = int(kwargs["n_stages"])
        self.deep_supr_num = self.num_stages - 2
        strides = kwargs["strides"]
        per_stage = [[int(s)] * 3 if isinstance(s, int) else [int(v) for v in s] for s in
                     (strides if isinstance(strides, (list, tuple)) else [strides] * self.num_stages)]
        self.divisor = tuple(math.prod(s[a] for s in per_stage) for a in range(len(per_stage[0])))

    @property
    def filters(self) -> list[int]:
        return list(self.record["arch_kwargs"]["features_per_stage"])

    def build(self, deep_supervision: bool = True) -> nn.Module:
        """A fresh, untrained network (deep supervision on for training)."""
        from ReCoKDLib.nnunet.network import build_from_record

        return build_from_record(self.record, deep_supervision=deep_supervision)

    def tap_names(self) -> list[str]:
        """The encoder stages without the bottleneck (ReCo-KD's default KD levels)."""
        from ReCoKDLib.nnunet.network import encoder_tap_names

        return encoder_tap_names(self.record)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.record)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise NNUNetError(f"cannot read {path}: {exc}") from None


def nnunet_context(card: Any, source: str | os.PathLike | None = None) -> dict[str, Any]:
    """What an nnU-Net export needs from a teacher: ``{"plans", "dataset_json", "configuration_name",
    "trainer_name", "plans_name", "dataset_name"}``.

    Taken from ``card.provenance["nnunet"]`` when it holds plans and dataset.json (a student card,
    or a teacher card that recorded them), else from the teacher's model folder ``source``
    (``plans.json``, ``dataset.json``, the folder names).

    Raises:
        NNUNetError: neither gives the plans and dataset.json.
    """
    stored = dict((getattr(card, "provenance", None) or {}).get("nnunet") or {})
    arch = getattr(card, "architecture", None) or {}
    context: dict[str, Any] = {
        "configuration_name": stored.get("configuration_name") or arch.get("configuration_name"),
        "trainer_name": stored.get("trainer_name") or arch.get("trainer_name") or "nnUNetTrainer",
        "plans_name": stored.get("plans_name"),
        "dataset_name": stored.get("dataset_name"),
        "plans": stored.get("plans"),
        "dataset_json": stored.get("dataset_json"),
        "mirror_axes": stored.get("mirror_axes"),
    }
    if not context["dataset_name"] and stored.get("folder"):
        context["dataset_name"] = Path(stored["folder"]).parent.name
    folder = Path(source) if source else None
    if folder is not None and folder.is_dir() and (context["plans"] is None or context["dataset_json"] is None):
        from ReCoKDLib.nnunet.folder import split_folder_name

        trainer, plans_name, configuration = split_folder_name(folder)
        context["plans"] = context["plans"] or _read_json(folder / "plans.json")
        context["dataset_json"] = context["dataset_json"] or _read_json(folder / "dataset.json")
        context["configuration_name"] = context["configuration_name"] or configuration
        context["trainer_name"] = trainer
        context["plans_name"] = context["plans_name"] or plans_name
        context["dataset_name"] = context["dataset_name"] or folder.parent.name
    if context["plans"] is None or context["dataset_json"] is None or not context["configuration_name"]:
        raise NNUNetError(
            "the nnU-Net plans and dataset.json of the teacher are unknown: load the teacher from its nnU-Net model "
            "folder (DatasetNNN_Name/Trainer__Plans__Configuration) so they can be recorded")
    plans = context["plans"]
    context["plans_name"] = context["plans_name"] or plans.get("plans_name") or "nnUNetPlans"
    context["dataset_name"] = context["dataset_name"] or plans.get("dataset_name")
    if not context["dataset_name"]:
        raise NNUNetError("the teacher's nnU-Net dataset name (DatasetNNN_Name) is unknown: its plans have no "
                          "dataset_name and no model folder was given")
    return context
