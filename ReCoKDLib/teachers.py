"""Load a teacher (or any segmentation network) safely, whatever its architecture.

Three kinds of source, all answered by :func:`load_model` with a :class:`LoadedModel`
(``network`` in eval mode, its :class:`~ReCoKDLib.checkpoint.ModelCard`, and ``kind``):

1. **A ReCoKD model file** (``.pt`` written by :func:`ReCoKDLib.checkpoint.save_model`): weights and
   a card whose ``architecture`` says how to rebuild the network: ``{"kind": "dynunet", "config":
   UNetConfig.to_dict()}`` (the built-in nnU-Net-like U-Net) or ``{"kind": "entry_point",
   "factory": "package.module:callable", "kwargs": {...}}``.
2. **A TorchScript file** (``torch.jit.save``): the network carries its own code. Its card comes
   from ``card=`` or from the sidecar ``<name>.json``. Without an eager architecture there are no
   named submodules to hook reliably, so only output-level distillation (logits) applies to it.
3. **Any architecture, backbone-agnostic**: ``entry_point="package.module:factory"`` (a class or a
   function returning an ``nn.Module``), ``kwargs`` for it, ``source`` = a **state dict** file, and
   a card (``card=`` as a path to a JSON file, a dict or a ``ModelCard``; else the sidecar JSON).
4. **A teacher preset**: ``"preset:hd-bet"`` or a preset JSON file (:mod:`ReCoKDLib.teacher_presets`):
   entry point, kwargs, weights, eval hook, preprocessing, output convention and taps of a
   third-party pretrained network, declared in JSON.

Example (a MONAI ``UNet`` as the teacher)::

    import torch
    from monai.networks.nets import UNet
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(16, 32, 64), strides=(2, 2))
    torch.save(net.state_dict(), "unet_weights.pt")          # a plain state dict, nothing else

    from ReCoKDLib.teachers import load_model
    teacher = load_model(
        "unet_weights.pt",
        entry_point="monai.networks.nets:UNet",
        kwargs={"spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                "channels": [16, 32, 64], "strides": [2, 2]},
        card={"architecture": {}, "classes": ["background", "liver", "spleen"],
              "spacing": [3.0, 1.5, 1.5], "normalization": {"scheme": "ct", "clip": [-100, 240],
              "mean": 80.0, "std": 60.0}, "patch_size": [32, 64, 64]},
    )

On the command line the same teacher is ``--teacher unet_weights.pt --teacher-entry-point
monai.networks.nets:UNet --teacher-kwargs '{...}' --teacher-card card.json``. The card's
``architecture`` is filled in with the entry point and kwargs, so a student saved later can name it.

**Safety.** Every weight file is read with ``torch.load(..., weights_only=True)``
(:func:`ReCoKDLib.checkpoint.safe_torch_load`): a pickle that needs arbitrary code to rebuild
(a whole pickled ``nn.Module``, or a malicious ``__reduce__``) is refused with
:class:`~ReCoKDLib.checkpoint.CheckpointError` and nothing of it runs. Entry points are imported
only when the caller names them or they are allow-listed (:mod:`ReCoKDLib.trust`: a
card or preset file never chooses code to run on its own); TorchScript files run
TorchScript code, not Python.

**Checks.** The network's output channels must equal the card's classes (for the built-in U-Net
from its configuration; for other kinds from one probe forward pass on a ``card.patch_size``
input), and the card's input channels are what the probe feeds.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ReCoKDLib.checkpoint import CheckpointError, ModelCard, card_path_for, load_model_file, safe_torch_load
from ReCoKDLib.trust import EntryPointError, resolve_entry_point

__all__ = ["ModelLoadError", "LoadedModel", "load_model", "build_network", "is_torchscript_file"]

#: keys under which checkpoints of other tools keep their state dict
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "network_weights", "model", "weights")


class ModelLoadError(CheckpointError):
    """A model cannot be loaded: unknown kind, bad entry point, weights that do not fit, class mismatch."""


@dataclass
class LoadedModel:
    """A network ready for inference or distillation.

    Attributes:
        network: the module, in eval mode, on the requested device.
        card: how to feed it (classes, spacing, normalisation, patch size).
        kind: ``"recokd"``, ``"torchscript"`` or ``"entry_point"``.
        source: the file it came from.
    """

    network: nn.Module
    card: ModelCard
    kind: str
    source: str = ""

    @property
    def feature_kd(self) -> bool:
        """Whether intermediate features can be tapped (eager modules); TorchScript: logits only."""
        return self.kind != "torchscript"


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


def _as_card(card: ModelCard | Mapping[str, Any] | str | os.PathLike | None, source: Path) -> ModelCard:
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


def _unwrap_state_dict(obj: Any, source: Path) -> dict[str, torch.Tensor]:
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


def _load_weights(network: nn.Module, state_dict: Mapping[str, torch.Tensor], source: Path) -> None:
    try:
        network.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ModelLoadError(
            f"the weights in {source} do not fit the network: {' '.join(first[:3])[:600]}. Check the architecture "
            f"(entry point and kwargs, or the card's config)") from None


def _check_classes(network: nn.Module, card: ModelCard, device: torch.device) -> None:
    """One probe forward pass: the output must have ``card.num_classes`` channels."""
    from ReCoKDLib.infer import network_logits

    x = torch.zeros((1, card.in_channels, *card.patch_size), device=device)
    try:
        with torch.no_grad():
            out = network_logits(network(x))
    except Exception as exc:  # noqa: BLE001 - any failure of foreign code is reported the same way
        raise ModelLoadError(
            f"probe forward pass on a (1, {card.in_channels}, {', '.join(map(str, card.patch_size))}) input failed: "
            f"{type(exc).__name__}: {exc}. Check the card's in_channels and patch_size") from None
    from ReCoKDLib.nnunet.labels import label_spec_from_card, output_channels

    expected = output_channels(label_spec_from_card(card), card.num_classes)  # region-based: one head per region
    if out.shape[1] != expected:
        raise ModelLoadError(
            f"the network outputs {out.shape[1]} channels but its card names {card.num_classes} classes {card.classes}"
            + (f" painted from {expected} regions" if expected != card.num_classes else ""))


def load_model(
    source: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    entry_point: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
    card: ModelCard | Mapping[str, Any] | str | os.PathLike | None = None,
    trust_entry_points: Iterable[str] = (),
) -> LoadedModel:
    """Load a network for inference or as a frozen teacher (see the module docstring).

    Args:
        source: a ReCoKD model file, a TorchScript file, or (with ``entry_point``) a state dict file.
        device: ``"cpu"``, ``"cuda[:i]"`` or ``"auto"``.
        entry_point: ``"package.module:factory"`` building the architecture of a state dict.
        kwargs: keyword arguments of the factory.
        card: the model card (path, dict or ``ModelCard``); for ReCoKD files it replaces the stored one.
        trust_entry_points: entry points a card, preset or file may name beyond the allow-list
            (:mod:`ReCoKDLib.trust`; the CLI's ``--trust-entry-point``). ``entry_point`` is trusted
            because the caller names it.

    Raises:
        UntrustedCodeError: the file's card or preset names code that is neither allow-listed nor
            trusted (nothing was imported; the message says how to trust it).
        CheckpointError: missing, corrupt or unsafe file (nothing of it was run).
        ModelLoadError: bad entry point, weights that do not fit, or a class-count mismatch.
    """
    from ReCoKDLib.infer import resolve_device
    from ReCoKDLib.teacher_presets import is_preset_source, load_preset_model

    if is_preset_source(source):  # "preset:hd-bet" or a teacher-preset JSON file (ReCoKDLib.teacher_presets)
        return load_preset_model(source, device, trust_entry_points=trust_entry_points)
    if Path(source).is_dir():  # an nnU-Net v2 model folder (ReCoKDLib.nnunet): Trainer__Plans__Configuration
        from ReCoKDLib.nnunet.teacher import load_nnunet_model  # NNUNetError naming what the folder lacks

        return load_nnunet_model(source, device=device)
    source = Path(source)
    if not source.is_file():
        raise ModelLoadError(f"model file {source} does not exist")
    dev = resolve_device(device)

    if entry_point is not None:
        model_card = _as_card(card, source)
        architecture = {"kind": "entry_point", "factory": entry_point, "kwargs": dict(kwargs or {})}
        model_card.architecture = architecture
        network = build_network(architecture, source=f"--entry-point {entry_point}", trusted=[entry_point])
        _load_weights(network, _unwrap_state_dict(safe_torch_load(source), source), source)
        kind = "entry_point"
    elif is_torchscript_file(source):
        model_card = _as_card(card, source)
        try:
            network = torch.jit.load(str(source), map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"cannot load TorchScript file {source}: {str(exc).splitlines()[0]}") from None
        model_card.architecture = {**model_card.architecture, "kind": "torchscript"}
        kind = "torchscript"
    else:
        stored_card, state_dict = load_model_file(source)
        model_card = _as_card(card, source) if card is not None else stored_card
        network = build_network(model_card.architecture, source=f"the model card of {source}",
                                trusted=trust_entry_points)
        _load_weights(network, state_dict, source)
        kind = "recokd"

    network = network.to(dev).eval()  # frozen (requires_grad off) by the engine when used as a teacher
    arch = model_card.architecture
    if arch.get("kind") == "dynunet":
        from ReCoKDLib.nnunet.labels import label_spec_from_card, output_channels

        n = int(arch.get("config", {}).get("num_classes", -1))
        expected = output_channels(label_spec_from_card(model_card), model_card.num_classes)  # regions: R heads
        if n != expected:
            raise ModelLoadError(
                f"the network has {n} output classes but its card names {model_card.num_classes} {model_card.classes}"
                + (f" painted from {expected} regions" if expected != model_card.num_classes else ""))
    else:
        _check_classes(network, model_card, dev)
    return LoadedModel(network=network, card=model_card, kind=kind, source=str(source))
