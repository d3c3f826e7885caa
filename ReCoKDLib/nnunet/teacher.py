"""An nnU-Net v2 model folder as a ReCoKD model (teacher for ``distill``, model for ``segment``).

:func:`load_nnunet_model` opens the folder, builds the network from the plans with DNA, loads each
fold's weights (safely, see :mod:`.checkpoint`) strictly, and returns an :class:`NNUNetModel`
(a :class:`~ReCoKDLib.models.base.LoadedModel`):

* ``network``: the fold's DNA U-Net, or with several folds an :class:`FoldEnsemble` whose output
  is the mean of the folds' logits (its feature taps are fold 0's: ``folds.0.encoder.stages.i``);
* ``card``: classes from dataset.json, spacing and patch size in the image's ``(z, y, x)`` order
  (the plans' transposed order undone), a ReCoKD normalisation dict equivalent to the first
  channel's nnU-Net scheme (``CTNormalization`` -> ``{"scheme": "ct", "clip": [p0.5, p99.5],
  "mean", "std"}`` from the dataset fingerprint), tap names (encoder stages, bottleneck left out),
  and ``architecture`` = :func:`~ReCoKDLib.nnunet.network.architecture_record` (``kind: "nnunet"``);
  ``provenance["nnunet"]`` keeps the folder, folds, checkpoint, plans and dataset.json;
* ``folder``, ``fold_networks``, ``mirror_axes``: what nnU-Net-exact inference needs
  (:func:`ReCoKDLib.nnunet.predict.predict_case`; ``infer.segment_volume`` dispatches there).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ReCoKDLib.checkpoint import ModelCard
from ReCoKDLib.nnunet import NNUNetError
from ReCoKDLib.nnunet.checkpoint import load_nnunet_checkpoint
from ReCoKDLib.nnunet.folder import NNUNetModelFolder, label_info, open_model_folder
from ReCoKDLib.nnunet.network import architecture_record, build_from_record, encoder_tap_names
from ReCoKDLib.models.base import LoadedModel, network_logits, resolve_device

__all__ = ["FoldEnsemble", "NNUNetModel", "load_nnunet_model", "card_normalization"]


class FoldEnsemble(nn.Module):
    """Several folds of one configuration: ``(B, C, D, H, W)`` -> mean of the folds' ``(B, K, D, H, W)`` logits."""

    def __init__(self, networks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.folds = nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for network in self.folds:
            logits = network_logits(network(x))
            total = logits if total is None else total + logits
        return total / len(self.folds)


@dataclass
class NNUNetModel(LoadedModel):
    """A :class:`~ReCoKDLib.models.base.LoadedModel` from an nnU-Net folder (``kind == "nnunet"``)."""

    folder: NNUNetModelFolder | None = None
    mirror_axes: tuple[int, ...] = ()
    fold_networks: list[nn.Module] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        """One SHA-256 over the used checkpoints' hashes (the teacher's identity in a student's provenance)."""
        import hashlib

        from ReCoKDLib.checkpoint import sha256_file

        paths = self.folder.checkpoint_paths if self.folder is not None else []
        return hashlib.sha256("".join(sha256_file(p) for p in paths).encode()).hexdigest()


def card_normalization(folder: NNUNetModelFolder) -> dict[str, Any]:
    """A ReCoKD normalisation dict (:mod:`ReCoKDLib.data.preprocess`) for the first channel's nnU-Net scheme."""
    cfg = folder.configuration
    schemes = list(cfg.get("normalization_schemes") or [])
    if not schemes:
        raise NNUNetError(f"{folder.path / 'plans.json'}: configuration {folder.configuration_name!r} has no "
                          f"normalization_schemes")
    scheme = schemes[0]
    extra = {"nnunet_schemes": schemes}
    if scheme == "CTNormalization":
        props = (folder.plans.get("foreground_intensity_properties_per_channel") or {}).get("0")
        if not props:
            raise NNUNetError(f"{folder.path / 'plans.json'} lacks foreground_intensity_properties_per_channel['0'] "
                              f"needed by CTNormalization")
        return {"scheme": "ct", "clip": [float(props["percentile_00_5"]), float(props["percentile_99_5"])],
                "mean": float(props["mean"]), "std": float(props["std"]), **extra}
    if scheme == "ZScoreNormalization":
        use_mask = list(cfg.get("use_mask_for_norm") or [False])
        return {"scheme": "zscore", "nonzero": bool(use_mask[0]), **extra}
    if scheme == "NoNormalization":
        return {"scheme": "none", **extra}
    # rescale / RGB schemes: ReCoKD's own preprocessing has no equivalent; nnU-Net-exact inference still applies
    return {"scheme": "none", **extra}


def _untranspose(values: Sequence[Any], backward: Sequence[int]) -> list[Any]:
    values = list(values)
    if len(values) != len(backward):
        return values
    return [values[int(a)] for a in backward]


def _mirror_axes(checkpoint: dict[str, Any]) -> tuple[int, ...]:
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    return tuple(int(a) for a in axes) if axes is not None else ()


def load_nnunet_model(path: str | os.PathLike, folds=None, device: str | torch.device = "cpu", *,
                      checkpoint_name: str = "checkpoint_final.pth") -> NNUNetModel:
    """Load an nnU-Net v2 model folder as a ReCoKD model (see the module docstring).

    Args:
        path: ``.../DatasetNNN_Name/Trainer__Plans__Configuration``.
        folds: a fold, several (logits averaged), ``"all"``, or ``None`` for every fold there is.
        device: ``"cpu"``, ``"cuda[:i]"`` or ``"auto"``.
        checkpoint_name: ``"checkpoint_final.pth"`` or ``"checkpoint_best.pth"``.

    Raises:
        NNUNetError: a missing/malformed file, a missing fold, an unsupported network, a checkpoint
            outside the allowlist, or weights that do not fit the plans' network (shape mismatch).
    """
    folder = open_model_folder(path, folds=folds, checkpoint_name=checkpoint_name)
    plans_file = folder.path / "plans.json"
    record = architecture_record(folder.plans, folder.dataset_json, folder.configuration_name,
                                 trainer_name=folder.trainer_name, source=str(plans_file))
    networks, mirror_axes = [], None
    for ckpt_path in folder.checkpoint_paths:
        checkpoint = load_nnunet_checkpoint(ckpt_path)
        configuration = (checkpoint.get("init_args") or {}).get("configuration")
        if configuration is not None and configuration != folder.configuration_name:
            raise NNUNetError(f"{ckpt_path} was trained for configuration {configuration!r}, but its folder "
                              f"{folder.path.name} names {folder.configuration_name!r}")
        network = build_from_record(record)
        try:
            network.load_state_dict(checkpoint["network_weights"], strict=True)
        except RuntimeError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            raise NNUNetError(
                f"the weights in {ckpt_path} do not fit the network that {plans_file} describes for "
                f"{folder.configuration_name!r} ({record['network_class_name'].rsplit('.', 1)[-1]}, features "
                f"{record['arch_kwargs'].get('features_per_stage')}): {' '.join(lines[1:3])[:500]}. The checkpoint "
                f"comes from other plans; use the plans.json it was trained with") from None
        networks.append(network)
        if mirror_axes is None:
            mirror_axes = _mirror_axes(checkpoint)

    dev = resolve_device(device)
    networks = [n.to(dev).eval() for n in networks]
    network: nn.Module = networks[0] if len(networks) == 1 else FoldEnsemble(networks).eval()
    taps = encoder_tap_names(record)
    if len(networks) > 1:
        taps = [f"folds.0.{name}" for name in taps]
    info = label_info(folder.dataset_json, folder.path / "dataset.json")
    backward = folder.transpose_backward
    cfg = folder.configuration
    card = ModelCard(
        architecture=record,
        classes=list(info.class_names) if not info.has_regions else list(info.class_names[1:]),
        spacing=[float(s) for s in _untranspose(cfg["spacing"], backward)],
        normalization=card_normalization(folder),
        patch_size=[int(p) for p in _untranspose(cfg["patch_size"], backward)],
        in_channels=int(record["input_channels"]),
        role="teacher",
        tap_names=taps,
        provenance={"nnunet": {
            "folder": str(folder.path), "folds": list(folder.folds), "checkpoint_name": checkpoint_name,
            "trainer_name": folder.trainer_name, "plans_name": folder.plans_name,
            "configuration_name": folder.configuration_name, "mirror_axes": list(mirror_axes or ()),
            "has_regions": info.has_regions, "plans": folder.plans, "dataset_json": folder.dataset_json}},
    )
    return NNUNetModel(network=network, card=card, kind="nnunet", source=str(folder.path), folder=folder,
                       mirror_axes=tuple(mirror_axes or ()), fold_networks=networks)
