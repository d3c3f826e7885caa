"""A distilled student as an nnU-Net v2 model folder that nnU-Net's own tools run unchanged.

:func:`export_student` writes, for a student of an nnU-Net teacher (``DatasetNNN_Name``,
configuration ``CONFIG``, plans ``PLANS``)::

    ROOT/DatasetNNN_Name/nnUNetTrainer__PLANS__CONFIG_recokd/
        plans.json            the teacher's plans + configuration CONFIG_recokd: the teacher's
                              configuration (inherits_from resolved) with the student's
                              ``architecture`` (reduced ``features_per_stage``) and, when the widths
                              double per stage, the legacy keys nnU-Net <= 2.2 reads
        dataset.json          the teacher's
        fold_0/checkpoint_final.pth
                              {"network_weights": DNA state dict, "trainer_name": "nnUNetTrainer",
                               "init_args": {"configuration": "CONFIG_recokd"},
                               "inference_allowed_mirroring_axes": the teacher's}: tensors, strings
                              and tuples only, so plain ``torch.load(weights_only=True)`` reads it
                              (nnunetv2 2.3/2.4 on torch >= 2.6 included)
        recokd_model_card.json  the student's ReCoKD card (KD configuration, provenance)

Run it with ``nnUNetv2_predict -d DatasetNNN_Name -tr nnUNetTrainer -p PLANS -c CONFIG_recokd -f 0``
(``nnUNet_results=ROOT``) or point SlicerNNUnet at ``ROOT``. SlicerNNUnet takes the **first**
``dataset.json`` under the folder it is given, so ``ROOT`` must hold one model only: an export
into a folder that holds another ``dataset.json`` is refused. The trainer is always
``nnUNetTrainer``: the only trainer nnunetv2 can look up where torchvision does not import (CPU
torch, see nnunet-interop §1.3), and the student's network comes from the plans anyway.

The export is atomic: everything is written into a hidden folder under ``ROOT``, checked (the
checkpoint is read back with ``weights_only=True`` into the network the written plans describe),
then renamed into place; on any error nothing is left behind.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch

from ReCoKDLib.nnunet import NNUNetError

__all__ = ["TRAINER_NAME", "export_student", "student_configuration", "legacy_keys"]

#: the trainer nnunetv2 finds on every install (CPU torch: the only one, nnunet-interop §1.3)
TRAINER_NAME = "nnUNetTrainer"
CARD_NAME = "recokd_model_card.json"


def legacy_keys(architecture: Mapping[str, Any]) -> dict[str, Any] | None:
    """The nnU-Net <= 2.2 configuration keys for a DNA ``architecture`` entry, or ``None`` when they
    cannot express it: legacy plans imply widths ``min(base * 2**i, max)`` and a PlainConvUNet or
    ResidualEncoderUNet."""
    kwargs = architecture["arch_kwargs"]
    name = str(architecture["network_class_name"]).rsplit(".", 1)[-1]
    features = [int(f) for f in kwargs["features_per_stage"]]
    base, top = features[0], max(features)
    if name not in ("PlainConvUNet", "ResidualEncoderUNet") or features != [min(base * 2**i, top) for i in range(len(features))]:
        return None
    encoder_key = "n_conv_per_stage" if name == "PlainConvUNet" else "n_blocks_per_stage"
    strides = [list(s) if isinstance(s, (list, tuple)) else [int(s)] * 3 for s in kwargs["strides"]]
    n = int(kwargs["n_stages"])
    per_stage = kwargs[encoder_key]
    decoder = kwargs["n_conv_per_stage_decoder"]
    return {
        "UNet_class_name": name,
        "UNet_base_num_features": base,
        "unet_max_num_features": top,
        "n_conv_per_stage_encoder": list(per_stage) if isinstance(per_stage, (list, tuple)) else [int(per_stage)] * n,
        "n_conv_per_stage_decoder": list(decoder) if isinstance(decoder, (list, tuple)) else [int(decoder)] * (n - 1),
        "num_pool_per_axis": [sum(1 for s in strides if s[a] > 1) for a in range(len(strides[0]))],
        "pool_op_kernel_sizes": strides,
        "conv_kernel_sizes": copy.deepcopy(kwargs["kernel_sizes"]),
    }


def student_configuration(plans: Mapping[str, Any], teacher_configuration: str,
                          record: Mapping[str, Any]) -> dict[str, Any]:
    """The plans configuration of a student: the teacher's, resolved, with the student's architecture.

    Args:
        plans: the teacher's ``plans.json``.
        teacher_configuration: e.g. ``"3d_fullres"``.
        record: the student's architecture record (``nnunet.student.student_architecture``).
    """
    from ReCoKDLib.nnunet.folder import resolve_configuration

    configuration = copy.deepcopy(resolve_configuration(plans, teacher_configuration))
    configuration.pop("inherits_from", None)
    for key in ("UNet_class_name", "UNet_base_num_features", "unet_max_num_features", "n_conv_per_stage_encoder",
                "n_conv_per_stage_decoder", "num_pool_per_axis", "pool_op_kernel_sizes", "conv_kernel_sizes"):
        configuration.pop(key, None)  # the teacher's legacy keys would describe the teacher
    architecture = {"network_class_name": record["network_class_name"],
                    "arch_kwargs": copy.deepcopy(dict(record["arch_kwargs"])),
                    "_kw_requires_import": list(record.get("_kw_requires_import", []))}
    configuration["architecture"] = architecture
    configuration.update(legacy_keys(architecture) or {})
    return configuration


def _plain_state_dict(state: Mapping[str, Any]) -> "OrderedDict[str, torch.Tensor]":
    out = OrderedDict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise NNUNetError(f"the student's state dict holds {type(value).__name__} under {key!r}; expected tensors")
        out[key] = value.detach().cpu().clone().contiguous()
    return out


def _check_root(root: Path, target: Path, overwrite: bool) -> None:
    """Refuse a root holding another model's dataset.json, or the target unless ``overwrite``."""
    if root.exists() and not root.is_dir():
        raise NNUNetError(f"{root} exists and is not a folder; give a folder to export into")
    if target.exists() and not overwrite:
        raise NNUNetError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    if root.is_dir():
        others = [p for p in root.rglob("dataset.json")
                  if target not in p.parents and not any(part.startswith(".recokd-export-") for part in p.parts)]
        if others:
            raise NNUNetError(
                f"{root} already holds {others[0]} (another nnU-Net model): SlicerNNUnet uses the first dataset.json "
                f"under the folder it is given, so export each model into its own empty folder")


def _verify(config_dir: Path, configuration_name: str, fold: int | str) -> None:
    """Read the written files back as nnU-Net would: plans -> network, plain ``weights_only`` load, strict."""
    from ReCoKDLib.nnunet.network import build_network

    plans = json.loads((config_dir / "plans.json").read_text())
    dataset_json = json.loads((config_dir / "dataset.json").read_text())
    network = build_network(plans, dataset_json, configuration_name, source=str(config_dir / "plans.json"))
    path = config_dir / f"fold_{fold}" / "checkpoint_final.pth"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(checkpoint["network_weights"], strict=True)
    except (RuntimeError, KeyError, pickle.UnpicklingError) as exc:
        raise NNUNetError(f"the exported checkpoint does not read back into the network of the written plans: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:400]}") from None


def export_student(
    model_path: str | os.PathLike,
    out_root: str | os.PathLike,
    *,
    configuration_name: str | None = None,
    fold: int | str = 0,
    overwrite: bool = False,
    reporter=None,
) -> Path:
    """Write a distilled student of an nnU-Net teacher as an nnU-Net v2 model folder.

    Args:
        model_path: the student's ReCoKD model file (``model_best.pt``/``model_last.pt`` of
            ``recokd distill`` with an nnU-Net teacher).
        out_root: the export root (``nnUNet_results`` for ``nnUNetv2_predict``; the folder given to
            SlicerNNUnet). Created if missing; must not hold another model's ``dataset.json``.
        configuration_name: the new configuration (default ``<teacher configuration>_recokd``).
        fold: the fold folder name (``fold_<fold>``).
        overwrite: replace an earlier export of the same configuration.
        reporter: optional ``progress.Reporter`` (stage ``export``).

    Returns:
        the configuration folder ``out_root/DatasetNNN_Name/nnUNetTrainer__<Plans>__<configuration>``.

    Raises:
        NNUNetError: the model is not an nnU-Net-shaped student, lacks the teacher's plans, the root
            holds another model, or the written folder does not read back.
        CheckpointError: the model file is missing or unsafe.
    """
    from ReCoKDLib.checkpoint import atomic_write_text, load_model_file
    from ReCoKDLib.nnunet.student import is_nnunet_architecture, nnunet_context

    model_path = Path(model_path)
    card, state = load_model_file(model_path)
    if not is_nnunet_architecture(card.architecture):
        raise NNUNetError(
            f"{model_path} is a {card.architecture.get('kind')!r} model; only students of nnU-Net teachers (architecture "
            f"kind 'nnunet', from `recokd distill` with an nnU-Net model folder as teacher) export as nnU-Net folders")
    context = nnunet_context(card)
    teacher_config = context["configuration_name"]
    name = configuration_name or f"{teacher_config}_recokd"
    if "__" in name or "/" in name or not name:
        raise NNUNetError(f"configuration name {name!r} may not be empty or contain '__' or '/'")
    plans = copy.deepcopy(context["plans"])
    if name in plans.get("configurations", {}):
        raise NNUNetError(f"the teacher's plans already have a configuration {name!r}; choose another name")
    plans["configurations"][name] = student_configuration(plans, teacher_config, card.architecture)
    plans_name = context["plans_name"]
    dataset_name = context["dataset_name"]
    root = Path(out_root)
    relative = Path(dataset_name) / f"{TRAINER_NAME}__{plans_name}__{name}"
    target = root / relative
    _check_root(root, target, overwrite)

    mirror_axes = context.get("mirror_axes")
    if mirror_axes is None:
        mirror_axes = list(range(len(plans["configurations"][name].get("patch_size", [0, 0, 0]))))
    checkpoint = {
        "network_weights": _plain_state_dict(state),
        "trainer_name": TRAINER_NAME,
        "init_args": {"configuration": name, "fold": fold},
        "inference_allowed_mirroring_axes": tuple(int(a) for a in mirror_axes),
    }
    if reporter is not None:
        reporter.start("export", total=1)
    created = [p for p in (root, root / dataset_name) if not p.exists()]
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".recokd-export-", dir=root))
    try:
        config_dir = staging / relative
        (config_dir / f"fold_{fold}").mkdir(parents=True)
        atomic_write_text(config_dir / "plans.json", json.dumps(plans, indent=2) + "\n")
        atomic_write_text(config_dir / "dataset.json", json.dumps(context["dataset_json"], indent=2) + "\n")
        card_dict = card.to_dict()
        card_dict["provenance"] = {k: v for k, v in card_dict.get("provenance", {}).items() if k != "nnunet"}
        card_dict["provenance"]["nnunet_export"] = {"configuration": name, "teacher_configuration": teacher_config,
                                                    "plans_name": plans_name, "dataset_name": dataset_name,
                                                    "source": model_path.name}
        atomic_write_text(config_dir / CARD_NAME, json.dumps(card_dict, indent=2, sort_keys=True) + "\n")
        torch.save(checkpoint, config_dir / f"fold_{fold}" / "checkpoint_final.pth")
        _verify(config_dir, name, fold)
        (root / dataset_name).mkdir(exist_ok=True)
        if target.exists():  # overwrite: move the old export aside first, delete it after the swap
            old = staging / "replaced"
            os.replace(target, old)
        os.replace(config_dir, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(created):  # leave no empty folder we made
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    if reporter is not None:
        reporter.done("export", path=str(target))
    return target
