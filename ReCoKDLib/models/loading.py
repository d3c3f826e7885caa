"""``load_model``: any model source to a checked :class:`~ReCoKDLib.models.base.LoadedModel`.

Sources, and the module that loads each:

1. **a ReCoKD model file** (``.pt`` from :func:`ReCoKDLib.checkpoint.save_model`), **a TorchScript
   file**, or **a state dict with an entry point**: :mod:`ReCoKDLib.models.files`;
2. **a teacher preset** (``"preset:hd-bet"`` or a preset JSON file): :mod:`ReCoKDLib.models.presets`;
3. **an nnU-Net v2 model folder** (``Dataset/Trainer__Plans__Configuration``): :mod:`ReCoKDLib.nnunet.teacher`;
4. **an exported ONNX graph** (``recokd export``: ``student.onnx`` with ``student.json`` beside it):
   :func:`load_onnx_model`, run by ONNX Runtime or OpenVINO (logits only: no feature taps).

Example (a MONAI ``UNet`` as the teacher)::

    import torch
    from monai.networks.nets import UNet
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(16, 32, 64), strides=(2, 2))
    torch.save(net.state_dict(), "unet_weights.pt")          # a plain state dict, nothing else

    from ReCoKDLib.models import load_model
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
TorchScript code, and ONNX graphs run in their runtimes, not Python.

**Checks.** The network's output channels must equal the card's classes (for the built-in U-Net
from its configuration; for other kinds from one probe forward pass on a ``card.patch_size``
input), and the card's input channels are what the probe feeds.

Inference on a loaded model goes through :mod:`ReCoKDLib.models.backends` (which engine runs it)
and :mod:`ReCoKDLib.infer` (the sliding window and the exact geometry); nothing here imports them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ReCoKDLib.checkpoint import ModelCard
from ReCoKDLib.models.base import LoadedModel, ModelLoadError, resolve_device

__all__ = ["load_model", "load_onnx_model", "is_onnx_file"]


def is_onnx_file(path: str | os.PathLike) -> bool:
    """A ``.onnx`` file (by its name; its bytes are read by the runtime)."""
    return Path(path).suffix.lower() == ".onnx" and Path(path).is_file()


def load_onnx_model(source: str | os.PathLike,
                    card: ModelCard | Mapping[str, Any] | str | os.PathLike | None = None) -> LoadedModel:
    """An exported graph (``recokd export``) and its card (``card=`` or the sidecar JSON), run by ONNX
    Runtime when installed, else OpenVINO; checked with one probe pass on the card's patch.

    Raises:
        ModelLoadError: no card, no runtime, a graph the runtime cannot read, or a class mismatch.
    """
    from ReCoKDLib.models.files import as_card, check_output_channels
    from ReCoKDLib.models.runtimes import GraphNetwork, runtime_available

    source = Path(source)
    model_card = as_card(card, source)
    runtime = next((r for r in ("onnxruntime", "openvino") if runtime_available(r)), None)
    if runtime is None:
        raise ModelLoadError(f"{source} is an ONNX graph: running it needs onnxruntime or openvino "
                             f"(pip install -c requirements/constraints.txt 'recokd[export]')")
    try:
        network = GraphNetwork(source, runtime)
    except Exception as exc:  # noqa: BLE001 - the runtime's own errors on a bad file
        raise ModelLoadError(f"{runtime} cannot read {source}: {type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}") from None
    model_card.architecture = {**model_card.architecture, "graph": "onnx"}
    check_output_channels(network, model_card, torch.device("cpu"))
    return LoadedModel(network=network, card=model_card, kind="onnx", source=str(source))


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
        source: a ReCoKD model file, a TorchScript file, (with ``entry_point``) a state dict file, a
            preset (``"preset:NAME"`` or a preset JSON), an nnU-Net model folder, or an exported ``.onnx``.
        device: ``"cpu"``, ``"cuda[:i]"`` or ``"auto"`` (ONNX graphs: the CPU).
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
    from ReCoKDLib.models.presets import is_preset_source, load_preset_model

    if is_preset_source(source):  # "preset:hd-bet" or a teacher-preset JSON file
        return load_preset_model(source, device, trust_entry_points=trust_entry_points)
    if Path(source).is_dir():  # an nnU-Net v2 model folder: Trainer__Plans__Configuration
        from ReCoKDLib.nnunet.teacher import load_nnunet_model  # NNUNetError naming what the folder lacks

        return load_nnunet_model(source, device=device)
    path = Path(source)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    if is_onnx_file(path) and entry_point is None:
        resolve_device(device)
        return load_onnx_model(path, card)
    from ReCoKDLib.models.files import load_file_model

    return load_file_model(path, device, entry_point=entry_point, kwargs=kwargs, card=card,
                           trust_entry_points=trust_entry_points)
