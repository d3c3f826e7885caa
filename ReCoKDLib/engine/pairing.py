"""What a teacher and a dataset decide before distillation: label semantics, the student's
architecture, the tapped modules of both networks, the teacher's identity hash."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from ReCoKDLib import checkpoint as ckpt
from ReCoKDLib.data.sampling import CaseSet
from ReCoKDLib.engine.config import TrainConfig, TrainingError
from ReCoKDLib.engine.state import state_sha256
from ReCoKDLib.networks import (NetworkConfigError, UNetConfig, build_unet, cumulative_strides, derive_student_config,
                                encoder_tap_names)


def _dataset_spec(dataset: CaseSet) -> Any:
    """The dataset's ``nnunet.labels.LabelSpec`` when it has regions or an ignore label, else ``None``."""
    spec = getattr(dataset, "label_spec", None)
    return spec if spec is not None and (spec.has_regions or spec.ignore_label is not None) else None


def _output_channels(dataset: CaseSet) -> int:
    """Network outputs for ``dataset``: one sigmoid head per nnU-Net region, else one per class."""
    from ReCoKDLib.nnunet.labels import output_channels

    return output_channels(_dataset_spec(dataset), dataset.num_classes)


def _kd_num_classes(dataset: CaseSet) -> int:
    """``num_classes`` of the KD losses: classes, or background + regions (one mask per region)."""
    spec = _dataset_spec(dataset)
    return spec.num_heads + 1 if spec is not None and spec.has_regions else dataset.num_classes


def _label_spec_record(dataset: CaseSet) -> dict[str, Any]:
    """What a model card records of the dataset's label semantics (``ModelCard.label_spec``)."""
    from ReCoKDLib.nnunet.labels import card_label_spec

    spec = _dataset_spec(dataset)
    return card_label_spec(spec) if spec is not None else {}


def _check_teacher_labels(teacher_card: ckpt.ModelCard, dataset: CaseSet) -> None:
    """The teacher's outputs must mean what the dataset's labels mean (classes, or the same regions)."""
    from ReCoKDLib.nnunet.labels import label_spec_from_card

    teacher_spec, spec = label_spec_from_card(teacher_card), _dataset_spec(dataset)
    teacher_regions = teacher_spec is not None and teacher_spec.has_regions
    if teacher_regions or (spec is not None and spec.has_regions):
        if not (teacher_regions and spec is not None and spec.has_regions and teacher_spec.regions == spec.regions):
            raise TrainingError(
                f"the teacher's outputs are {'regions ' + str(teacher_spec.regions) if teacher_regions else 'classes'} "
                f"but the dataset's labels are {'regions ' + str(spec.regions) if spec and spec.has_regions else 'classes'}; "
                "distil on a dataset with the teacher's label definition (dataset.json 'labels')")
        return
    if list(teacher_card.classes) != list(dataset.class_names) and len(teacher_card.classes) != dataset.num_classes:
        raise TrainingError(
            f"the dataset has {dataset.num_classes} classes {dataset.class_names} but the teacher predicts "
            f"{len(teacher_card.classes)} {teacher_card.classes}; label maps must use the teacher's class ids"
        )


def _teacher_parts(teacher: Any) -> tuple[nn.Module, ckpt.ModelCard, str]:
    """``(network, card, sha256)`` of a teacher given as a model file path or a loaded model."""
    if isinstance(teacher, (str, os.PathLike)):
        path = Path(teacher)
        try:
            from ReCoKDLib.teachers import load_model
        except ImportError:
            load_model = None
        if load_model is not None:
            loaded = load_model(path, "cpu")
            sha = ckpt.sha256_file(path) if path.is_file() else getattr(loaded, "sha256", None)  # dir: nnU-Net folder
            return loaded.network, loaded.card, sha or state_sha256(loaded.network)
        card, state = ckpt.load_model_file(path)
        if card.architecture.get("kind") != "dynunet":
            raise TrainingError(f"{path}: only built-in (dynunet) teachers can be loaded without ReCoKDLib.teachers")
        network = build_unet(UNetConfig.from_dict(card.architecture["config"]))
        network.load_state_dict(state)
        return network, card, ckpt.sha256_file(path)
    network, card = getattr(teacher, "network", None), getattr(teacher, "card", None)
    if network is None or card is None:
        raise TrainingError("teacher must be a model file path or an object with .network and .card (teachers.LoadedModel)")
    source = getattr(teacher, "source", "")
    sha = getattr(teacher, "sha256", None) or (ckpt.sha256_file(source) if source and Path(source).is_file() else None)
    return network, card, sha or card.provenance.get("sha256") or state_sha256(network)


def _student_config(config: TrainConfig, teacher_card: ckpt.ModelCard) -> UNetConfig:
    from ReCoKDLib.nnunet.student import NNUNetStudentConfig, is_nnunet_architecture, student_architecture

    if config.student_norm is not None and (config.student_config is not None
                                             or teacher_card.architecture.get("kind") != "dynunet"):
        raise TrainingError("student_norm (--student-norm) applies to a student derived from a built-in U-Net "
                            "teacher; with an explicit student architecture set its 'norm' there")
    if config.student_stem != "full" and (config.student_config is not None
                                          or teacher_card.architecture.get("kind") != "dynunet"):
        raise TrainingError("student_stem (--student-stem) applies to a student derived from a built-in U-Net "
                            "teacher; with an explicit student architecture set its 'strides' there")
    if is_nnunet_architecture(config.student_config):
        return NNUNetStudentConfig(config.student_config)  # type: ignore[return-value]
    if config.student_config is not None:
        return UNetConfig.from_dict(dict(config.student_config))
    if is_nnunet_architecture(teacher_card.architecture):  # nnU-Net teacher: its plans network, widths / 2**t
        return NNUNetStudentConfig(student_architecture(  # type: ignore[return-value]
            teacher_card.architecture, config.student_reduction, config.min_channels))
    if teacher_card.architecture.get("kind") != "dynunet":
        raise TrainingError(
            "the teacher is not a built-in U-Net, so the student cannot be derived from it: give the student "
            "architecture (student_config / --student-json) and the taps of both networks"
        )
    teacher_config = UNetConfig.from_dict(teacher_card.architecture["config"])
    try:
        return derive_student_config(teacher_config, config.student_reduction, config.min_channels,
                                     config.student_norm, config.student_stem)
    except NetworkConfigError as exc:  # the reduction, min_channels or stem does not fit this teacher
        raise TrainingError(f"the student cannot be derived from this teacher: {exc}") from None


#: KD methods that read only the logits (all others read tapped features)
OUTPUT_LEVEL_METHODS = frozenset({"logit"})


def _check_output_only_teacher(teacher: Any, card: ckpt.ModelCard, spec: Mapping[str, Any]) -> None:
    """A TorchScript teacher has no named modules to tap: refuse feature-level KD methods clearly."""
    kind = getattr(teacher, "kind", None) or card.architecture.get("kind")
    feature_methods = sorted(set(spec) - OUTPUT_LEVEL_METHODS)
    if kind == "torchscript" and feature_methods:
        raise TrainingError(
            f"the teacher is a TorchScript file: only output-level distillation (--kd logit) applies, but "
            f"{feature_methods} need its intermediate features. Give the eager architecture instead (an entry point "
            "with a state dict, or a teacher preset) to use feature methods")


def _kd_taps(config: TrainConfig, teacher_card: ckpt.ModelCard, student_config: Any,
             teacher_kind: str | None = None) -> tuple[list[str], list[str]]:
    """The teacher's and the student's module names whose features are distilled, paired in order.

    Explicit taps win, then the teacher card's; otherwise the encoder stages of a built-in or
    nnU-Net teacher. A TorchScript teacher distilled at the output level only (``logit``) has no
    taps at all.
    """
    kind = teacher_card.architecture.get("kind")
    teacher_taps = list(config.teacher_taps or teacher_card.tap_names or [])
    if not teacher_taps:
        if "torchscript" in (kind, teacher_kind) and not set(config.kd) - OUTPUT_LEVEL_METHODS:
            return [], []
        if kind == "nnunet":
            from ReCoKDLib.nnunet.network import encoder_tap_names as nnunet_tap_names

            teacher_taps = nnunet_tap_names(teacher_card.architecture)
        elif kind == "dynunet":
            teacher_taps = encoder_tap_names(UNetConfig.from_dict(teacher_card.architecture["config"]))
        else:
            raise TrainingError("give the teacher's tap names (teacher_taps / --teacher-taps) for this architecture")
    nnunet_student = hasattr(student_config, "build")  # nnunet.student.NNUNetStudentConfig
    if (kind == "dynunet" and not config.teacher_taps and not config.student_taps and not nnunet_student
            and student_config.strided_stem):
        return _strided_stem_taps(teacher_card, teacher_taps, student_config)
    student_taps = list(config.student_taps or (student_config.tap_names() if nnunet_student
                                                else _default_student_taps(teacher_card, teacher_taps, student_config)))
    if len(student_taps) != len(teacher_taps):
        raise TrainingError(f"{len(teacher_taps)} teacher taps but {len(student_taps)} student taps; pair them one to one")
    return teacher_taps, student_taps


def _default_student_taps(teacher_card: ckpt.ModelCard, teacher_taps: Sequence[str], student_config: UNetConfig) -> list[str]:
    """The student's encoder stages; for a preset teacher whose card records its taps' strides,
    the stages at those strides (``teacher_presets.student_taps_for``)."""
    strides = teacher_card.provenance.get("tap_strides") if isinstance(teacher_card.provenance, dict) else None
    if strides and list(teacher_taps) == list(teacher_card.tap_names):
        from ReCoKDLib.teacher_presets import student_taps_for

        return student_taps_for(strides, student_config)
    return encoder_tap_names(student_config)


def _strided_stem_taps(teacher_card: ckpt.ModelCard, teacher_taps: list[str],
                       student_config: UNetConfig) -> tuple[list[str], list[str]]:
    """A built-in teacher's default encoder taps paired with a strided-stem student's stages at the
    same strides; the teacher's taps at strides the student has no stage for (its full-resolution
    stage) are left out."""
    teacher_config = UNetConfig.from_dict(teacher_card.architecture["config"])
    names = encoder_tap_names(teacher_config, drop_deepest=False)
    teacher_strides = dict(zip(names, cumulative_strides(teacher_config)))
    student_names = encoder_tap_names(student_config, drop_deepest=False)
    student_at = dict(zip(cumulative_strides(student_config), student_names))
    pairs = [(t, student_at[teacher_strides[t]]) for t in teacher_taps if teacher_strides.get(t) in student_at]
    if not pairs:
        raise TrainingError("no teacher tap has a student stage at its stride; give --teacher-taps/--student-taps")
    return [t for t, _ in pairs], [s for _, s in pairs]


def teacher_size_step(teacher_card: ckpt.ModelCard, teacher_net: nn.Module,
                      tap_strides: Sequence[Sequence[int] | None] = ()) -> tuple[int, int, int]:
    """The multiple a whole volume is padded to before the teacher runs on it ``(D, H, W)``: the
    network's total stride where the card says it (built-in U-Net, nnU-Net plans, a preset's
    ``pad_multiple``), else the least common multiple of the known tap strides."""
    import math

    arch = teacher_card.architecture or {}
    if arch.get("kind") == "dynunet":
        return tuple(int(d) for d in UNetConfig.from_dict(arch["config"]).divisor)  # type: ignore[return-value]
    from ReCoKDLib.nnunet.student import NNUNetStudentConfig, is_nnunet_architecture

    if is_nnunet_architecture(arch):
        return tuple(int(d) for d in NNUNetStudentConfig(arch).divisor)  # type: ignore[return-value]
    pad = getattr(teacher_net, "pad_multiple", None)
    if pad:
        return tuple(int(p) for p in pad)  # type: ignore[return-value]
    known = [s for s in tap_strides if s is not None]
    return tuple(math.lcm(*[int(s[a]) for s in known]) if known else 1 for a in range(3))  # type: ignore[return-value]
