"""nnU-Net v2 model folders as ReCoKD teachers, reproducing nnU-Net's own inference.

An nnU-Net v2 model folder is ``DatasetNNN_Name/Trainer__Plans__Configuration/`` holding
``plans.json``, ``dataset.json`` and ``fold_k/checkpoint_final.pth`` (or ``checkpoint_best.pth``;
``k`` a number or ``all``). This package reads such a folder without running any of nnU-Net's
code paths that need it installed:

* :mod:`.checkpoint`: ``torch.load(..., weights_only=True)`` with an explicit allowlist of the
  plain numpy types nnU-Net pickles (never ``weights_only=False``);
* :mod:`.folder`: the folder, its plans (``inherits_from`` resolved), labels (regions, ignore);
* :mod:`.network`: the network from the plans' ``architecture`` with ``dynamic_network_architectures``
  alone (PlainConvUNet, ResidualEncoderUNet; ``nnUNetTrainerBN`` -> BatchNorm);
* :mod:`.preprocess`: nnU-Net's ``DefaultPreprocessor`` (transpose, crop to non-zero, normalise,
  resample with its order rules) and its export (resample logits back, argmax or regions, paste
  into the crop box, transpose back);
* :mod:`.predict`: nnU-Net's sliding window (window placement, Gaussian, fp16 accumulation,
  mirroring, fold averaging) and whole-file prediction;
* :mod:`.teacher`: a :class:`~ReCoKDLib.teachers.LoadedModel` for distillation and ``recokd segment``.

Only :mod:`.network` needs ``dynamic_network_architectures`` (the ``nnunet`` extra:
``pip install 'recokd[nnunet]'``); ``nnunetv2`` itself is never imported here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["NNUNetError", "is_model_folder", "describe_model_folder", "require_dna"]

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")


class NNUNetError(ValueError):
    """An nnU-Net model folder, plans file or checkpoint is missing, malformed or unsupported."""


def require_dna():
    """Import ``dynamic_network_architectures`` or say which extra installs it."""
    try:
        import dynamic_network_architectures  # noqa: F401
    except ImportError as exc:
        raise NNUNetError(
            "building an nnU-Net network needs the package 'dynamic-network-architectures': install ReCoKD's "
            f"'nnunet' extra (pip install 'recokd[nnunet]'); import failed with: {exc}") from None
    return dynamic_network_architectures


def is_model_folder(path: str | os.PathLike) -> bool:
    """True for a directory holding ``plans.json``, ``dataset.json`` and at least one ``fold_*`` folder
    with a checkpoint: what nnU-Net v2 writes to ``nnUNet_results/DatasetNNN_Name/Trainer__Plans__Config``."""
    path = Path(path)
    if not (path.is_dir() and (path / "plans.json").is_file() and (path / "dataset.json").is_file()):
        return False
    return any(d.is_dir() and any((d / name).is_file() for name in CHECKPOINT_NAMES) for d in path.glob("fold_*"))


def describe_model_folder(path: str | os.PathLike) -> str:
    """One line for people: ``"nnU-Net 3d_fullres: 2 classes (liver, spleen); spacing 3 x 3 x 3 mm; folds 0"``.

    Reads only the JSON files (no torch); raises :class:`NNUNetError` for a folder that is not a model folder.
    """
    from ReCoKDLib.nnunet.folder import label_info, resolve_configuration, split_folder_name, available_folds

    path = Path(path)
    if not is_model_folder(path):
        raise NNUNetError(f"{path} is not an nnU-Net v2 model folder (expected plans.json, dataset.json and "
                          f"fold_*/checkpoint_final.pth inside)")
    plans = json.loads((path / "plans.json").read_text())
    dataset_json = json.loads((path / "dataset.json").read_text())
    _trainer, _plans_name, configuration_name = split_folder_name(path)
    configuration = resolve_configuration(plans, configuration_name, source=path / "plans.json")
    info = label_info(dataset_json)
    names = info.class_names[1:]
    spacing = " x ".join(f"{float(s):g}" for s in configuration.get("spacing", []))
    folds = ", ".join(str(f) for f in available_folds(path))
    kind = "regions" if info.has_regions else "classes"
    return (f"nnU-Net {configuration_name}: {len(names)} {kind} ({', '.join(names)}); spacing {spacing} mm; "
            f"folds {folds}")
