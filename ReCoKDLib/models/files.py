"""Networks from model files: a ReCoKD model file, a TorchScript file, a state dict with an entry point.

* :func:`build_network`: an untrained network from a card's ``architecture`` (``dynunet``,
  ``nnunet`` or ``entry_point``; entry points only through :func:`ReCoKDLib.trust.resolve_entry_point`);
* :func:`load_weights` / :func:`unwrap_state_dict`: a state dict (as other tools save it) into a
  network, strictly;
* :func:`load_file_model`: one of the three file kinds as a checked
  :class:`~ReCoKDLib.models.base.LoadedModel`.

Every weight file is read with ``torch.load(..., weights_only=True)``
(:func:`ReCoKDLib.checkpoint.safe_torch_load`).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ReCoKDLib.checkpoint import ModelCard, card_path_for, load_model_file, safe_torch_load
from ReCoKDLib.models.base import LoadedModel, ModelLoadError, network_logits, resolve_device
from ReCoKDLib.trust import EntryPointError, resolve_entry_point

__all__ = ["is_torchscript_file", "build_network", "as_card", "unwrap_state_dict", "load_weights",
           "check_output_channels", "load_file_model"]

#: keys under which checkpoints of other tools keep their state dict
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "network_weights", "model", "weights")


def is_torchscript_file(path: str | os.PathLike) -> bool:
    """True for a ``torch.jit.save`` archive (a zip holding compiled ``code/``), False otherwise."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in n or n.endswith("constants.pkl") for n in names)


def build_network(architecture: Mapping[str, Any], *, source: str = "the model card",
                  trusted: Iterable[str] = ()) -> nn.Module:
    """An untrained network from a card's ``architecture`` (``dynunet``, ``nnunet`` or ``entry_point``).

    An ``entry_point`` architecture runs only when :func:`ReCoKDLib.trust.resolve_entry_point`
    allows it (allow-listed, or named in ``trusted`` / ``--trust-entry-point``); otherwise
    :class:`~ReCoKDLib.trust.UntrustedCodeError` is raised before anything is imported.
    """
    kind = architecture.get("kind") if isinstance(architecture, Mapping) else None
    if kind == "dynunet":
        from ReCoKDLib.networks import UNetConfig, build_unet

        return build_unet(UNetConfig.from_dict(dict(architecture.get("config", {}))))
    if kind == "entry_point":
        try:
            factory = resolve_entry_point(architecture.get("factory", ""), source=source, trusted=trusted)
        except EntryPointError as exc:
            raise ModelLoadError(str(exc)) from None
        try:
            network = factory(**dict(architecture.get("kwargs") or {}))
        except TypeError as exc:
            raise ModelLoadError(f"entry point {architecture.get('factory')} rejected its kwargs: {exc}") from None
        if not isinstance(network, nn.Module):
            raise ModelLoadError(f"entry point {architecture.get('factory')} returned {type(network).__name__}, not an nn.Module")
        return network
    if kind == "nnunet":  # an nnU-Net v2 network (ReCoKDLib.nnunet.network.architecture_record)
        from ReCoKDLib.nnunet.network import build_from_record

        return build_from_record(architecture)
    raise ModelLoadError(f"unknown architecture kind {kind!r} in model card; expected 'dynunet' or 'entry_point'")


def as_card(card: ModelCard | Mapping[str, Any] | str | os.PathLike | None, source: Path) -> ModelCard:
    """A :class:`ModelCard` from a card object, a dict, a JSON path, or (``None``) ``source``'s sidecar JSON."""
    if isinstance(card, ModelCard):
        return card
    if isinstance(card, Mapping):
        return ModelCard.from_dict(dict(card))
    path = Path(card) if card is not None else card_path_for(source)
    if not path.is_file():
        raise ModelLoadError(
            f"no model card for {source}: give card= (a JSON file, dict or ModelCard) or put it beside the model as {path.name}")
    try:
        return ModelCard.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"model card {path} is not valid JSON: {exc}") from None


def unwrap_state_dict(obj: Any, source: Path) -> dict[str, torch.Tensor]:
    """The parameter mapping inside a checkpoint (``state_dict``, ``network_weights``, ... or the mapping
    itself), with a DDP ``module.`` prefix removed."""
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{source} holds no state dict (a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in obj):  # saved from a DDP wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_weights(network: nn.Module, state_dict: Mapping[str, torch.Tensor], source: Path) -> None:
    """``network.load_state_dict(state_dict, strict=True)`` with a readable error."""
    try:
        network.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ModelLoadError(
            f"the weights in {source} do not fit the network: {' '.join(first[:3])[:600]}. Check the architecture "
            f"(entry point and kwargs, or the card's config)") from None


def check_output_channels(network: nn.Module, card: ModelCard, device: torch.device) -> None:
    """One probe forward pass on a ``card.patch_size`` input: the output must have one channel per
    class (per region for nnU-Net region-based labels)."""
    from ReCoKDLib.nnunet.labels import label_spec_from_card, output_channels

    x = torch.zeros((1, card.in_channels, *card.patch_size), device=device)
    try:
        with torch.no_grad():
            out = network_logits(network(x))
    except Exception as exc:  # noqa: BLE001 - any failure of foreign code is reported the same way
        raise ModelLoadError(
            f"probe forward pass on a (1, {card.in_channels}, {', '.join(map(str, card.patch_size))}) input failed: "
            f"{type(exc).__name__}: {exc}. Check the card's in_channels and patch_size") from None
    expected = output_channels(label_spec_from_card(card), card.num_classes)  # region-based: one head per region
    if out.shape[1] != expected:
        raise ModelLoadError(
            f"the network outputs {out.shape[1]} channels but its card names {card.num_classes} classes {card.classes}"
            + (f" painted from {expected} regions" if expected != card.num_classes else ""))


def _check_dynunet_classes(card: ModelCard) -> None:
    from ReCoKDLib.nnunet.labels import label_spec_from_card, output_channels

    n = int(card.architecture.get("config", {}).get("num_classes", -1))
    expected = output_channels(label_spec_from_card(card), card.num_classes)  # regions: R heads
    if n != expected:
        raise ModelLoadError(
            f"the network has {n} output classes but its card names {card.num_classes} {card.classes}"
            + (f" painted from {expected} regions" if expected != card.num_classes else ""))


def load_file_model(source: Path, device: str | torch.device = "cpu", *, entry_point: str | None = None,
                    kwargs: Mapping[str, Any] | None = None,
                    card: ModelCard | Mapping[str, Any] | str | os.PathLike | None = None,
                    trust_entry_points: Iterable[str] = ()) -> LoadedModel:
    """A ReCoKD model file, a TorchScript file, or (with ``entry_point``) a state dict file
    (see :func:`ReCoKDLib.models.load_model`)."""
    dev = resolve_device(device)
    if entry_point is not None:
        model_card = as_card(card, source)
        architecture = {"kind": "entry_point", "factory": entry_point, "kwargs": dict(kwargs or {})}
        model_card.architecture = architecture
        network = build_network(architecture, source=f"--entry-point {entry_point}", trusted=[entry_point])
        load_weights(network, unwrap_state_dict(safe_torch_load(source), source), source)
        kind = "entry_point"
    elif is_torchscript_file(source):
        model_card = as_card(card, source)
        try:
            network = torch.jit.load(str(source), map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"cannot load TorchScript file {source}: {str(exc).splitlines()[0]}") from None
        model_card.architecture = {**model_card.architecture, "kind": "torchscript"}
        kind = "torchscript"
    else:
        stored_card, state_dict = load_model_file(source)
        model_card = as_card(card, source) if card is not None else stored_card
        network = build_network(model_card.architecture, source=f"the model card of {source}",
                                trusted=trust_entry_points)
        load_weights(network, state_dict, source)
        kind = "recokd"

    network = network.to(dev).eval()  # frozen (requires_grad off) by the engine when used as a teacher
    if model_card.architecture.get("kind") == "dynunet":
        _check_dynunet_classes(model_card)
    else:
        check_output_channels(network, model_card, dev)
    return LoadedModel(network=network, card=model_card, kind=kind, source=str(source))
