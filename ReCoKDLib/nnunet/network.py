"""nnU-Net v2 networks from ``plans.json`` with ``dynamic_network_architectures`` (DNA) alone.

nnU-Net builds its network from the configuration's ``architecture`` entry: a class path
(``network_class_name``), its keyword arguments (``arch_kwargs``) and the list of those that name
classes (``_kw_requires_import``: ``conv_op``, ``norm_op``, ``dropout_op``, ``nonlin``). This module
does the same without nnunetv2 and without importing whatever a JSON file names:

* network classes are looked up **by the last component** of the name among DNA's U-Nets
  (``PlainConvUNet``, ``ResidualEncoderUNet``, ``ResidualUNet``), which also maps legacy paths such
  as ``...architectures.residual_unet.ResidualEncoderUNet`` (gone from DNA 0.4); Primus (a
  transformer built by its own trainer) and anything else are refused;
* op classes are taken from ``torch.nn`` by name (``Conv3d``, ``InstanceNorm3d``, ``LeakyReLU``, ...)
  and DNA's residual blocks, nothing else;
* legacy plans (nnU-Net <= 2.2: ``UNet_class_name``, ``UNet_base_num_features``, ...) are converted
  as nnU-Net >= 2.3 does (features ``min(base * 2**i, max)``, InstanceNorm eps 1e-5 affine,
  LeakyReLU, conv bias);
* trainers that change the network: ``nnUNetTrainerBN`` (BatchNorm, eps 1e-5, affine); Primus
  trainers are refused; every other trainer builds from the plans unchanged.

Input channels are ``len(channel_names)`` (legacy ``modality``); output heads follow
:func:`~ReCoKDLib.nnunet.folder.label_info` (all classes with background, or one per region).

The JSON-serialisable :func:`architecture_record` (a model card's ``architecture``, ``{"kind":
"nnunet", ...}``) rebuilds the same network with :func:`build_from_record`.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

from torch import nn

from ReCoKDLib.nnunet import NNUNetError, require_dna
from ReCoKDLib.nnunet.folder import label_info, resolve_configuration

__all__ = [
    "SUPPORTED_NETWORKS",
    "architecture_record",
    "build_network",
    "build_from_record",
    "encoder_tap_names",
    "network_architecture",
]

#: last component of ``network_class_name`` -> DNA module holding it
SUPPORTED_NETWORKS = {
    "PlainConvUNet": "dynamic_network_architectures.architectures.unet",
    "ResidualEncoderUNet": "dynamic_network_architectures.architectures.unet",
    "ResidualUNet": "dynamic_network_architectures.architectures.unet",
}

_DNA_BLOCKS = {"BasicBlockD", "BottleneckD"}
_TORCH_OPS = {
    "Conv1d", "Conv2d", "Conv3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "BatchNorm1d",
    "BatchNorm2d", "BatchNorm3d", "GroupNorm", "LayerNorm", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d",
    "AlphaDropout", "LeakyReLU", "ReLU", "PReLU", "ELU", "GELU", "SiLU", "Mish", "Tanh", "Sigmoid",
}


def _legacy_architecture(cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The ``architecture`` entry nnU-Net >= 2.3 derives from legacy (<= 2.2) configuration keys."""
    name = cfg.get("UNet_class_name")
    if name not in ("PlainConvUNet", "ResidualEncoderUNet"):
        raise NNUNetError(f"{source}: legacy configuration names network {name!r}; only PlainConvUNet and "
                          f"ResidualEncoderUNet can be converted")
    try:
        n_stages = len(cfg["n_conv_per_stage_encoder"])
        dim = len(cfg["patch_size"])
        kwargs = {
            "n_stages": n_stages,
            "features_per_stage": [min(int(cfg["UNet_base_num_features"]) * 2 ** i, int(cfg["unet_max_num_features"]))
                                   for i in range(n_stages)],
            "conv_op": f"torch.nn.Conv{dim}d",
            "kernel_sizes": copy.deepcopy(cfg["conv_kernel_sizes"]),
            "strides": copy.deepcopy(cfg["pool_op_kernel_sizes"]),
            ("n_conv_per_stage" if name == "PlainConvUNet" else "n_blocks_per_stage"):
                copy.deepcopy(cfg["n_conv_per_stage_encoder"]),
            "n_conv_per_stage_decoder": copy.deepcopy(cfg["n_conv_per_stage_decoder"]),
            "conv_bias": True,
            "norm_op": f"torch.nn.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
        }
    except (KeyError, TypeError) as exc:
        raise NNUNetError(f"{source}: legacy configuration lacks {exc} (needs UNet_base_num_features, "
                          f"unet_max_num_features, n_conv_per_stage_encoder/decoder, conv_kernel_sizes, "
                          f"pool_op_kernel_sizes, patch_size)") from None
    return {"network_class_name": name, "arch_kwargs": kwargs,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def _input_channels(dataset_json: Mapping[str, Any], cfg: Mapping[str, Any], source: str) -> int:
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(channels, Mapping) or not channels:
        raise NNUNetError(f"{source}: dataset.json needs 'channel_names' (e.g. {{\"0\": \"CT\"}})")
    if cfg.get("previous_stage"):
        raise NNUNetError(
            f"{source}: configuration is a cascade stage (previous_stage {cfg['previous_stage']!r}); it needs the "
            f"lower-resolution stage's segmentation as input, which ReCoKD does not run. Use 3d_fullres or 3d_lowres")
    return len(channels)


def network_architecture(plans: Mapping[str, Any], configuration_name: str, trainer_name: str = "nnUNetTrainer",
                         source: str = "plans.json") -> dict[str, Any]:
    """The resolved ``architecture`` entry (legacy plans converted, trainer variants applied), a copy."""
    cfg = resolve_configuration(plans, configuration_name, source)
    if "Primus" in trainer_name:
        raise NNUNetError(f"trainer {trainer_name!r} builds a Primus transformer in its own code; ReCoKD loads "
                          f"nnU-Net U-Nets (PlainConvUNet, ResidualEncoderUNet) only")
    if "architecture" in cfg:
        arch = copy.deepcopy(dict(cfg["architecture"]))
    elif "UNet_class_name" in cfg:
        arch = _legacy_architecture(cfg, source)
    else:
        raise NNUNetError(f"{source}: configuration {configuration_name!r} has no 'architecture' entry "
                          f"(nor legacy 'UNet_class_name')")
    if not isinstance(arch.get("arch_kwargs"), Mapping) or not isinstance(arch.get("network_class_name"), str):
        raise NNUNetError(f"{source}: configuration {configuration_name!r} 'architecture' needs "
                          f"'network_class_name' and 'arch_kwargs'")
    short = arch["network_class_name"].rsplit(".", 1)[-1]
    if short.startswith("Primus") or short not in SUPPORTED_NETWORKS:
        raise NNUNetError(
            f"{source}: configuration {configuration_name!r} names network class {arch['network_class_name']!r}; "
            f"ReCoKD builds {sorted(SUPPORTED_NETWORKS)} from dynamic_network_architectures")
    arch["network_class_name"] = f"{SUPPORTED_NETWORKS[short]}.{short}"
    if trainer_name.startswith("nnUNetTrainerBN"):
        kw = arch["arch_kwargs"]
        dim = str(kw.get("conv_op", "Conv3d"))[-2]
        kw["norm_op"] = f"torch.nn.BatchNorm{dim}d"
        kw["norm_op_kwargs"] = {"eps": 1e-05, "affine": True}
    arch.setdefault("_kw_requires_import", ["conv_op", "norm_op", "dropout_op", "nonlin"])
    return arch


def architecture_record(plans: Mapping[str, Any], dataset_json: Mapping[str, Any], configuration_name: str,
                        features_per_stage: Sequence[int] | None = None, *, trainer_name: str = "nnUNetTrainer",
                        source: str = "plans.json") -> dict[str, Any]:
    """A JSON-serialisable model-card ``architecture``: ``{"kind": "nnunet", "network_class_name",
    "arch_kwargs", "_kw_requires_import", "input_channels", "num_classes", "configuration_name",
    "trainer_name"}``; :func:`build_from_record` (and ``teachers.build_network``) rebuilds the network.

    ``features_per_stage`` replaces the plans' widths (a student); it must have ``n_stages`` entries.
    """
    arch = network_architecture(plans, configuration_name, trainer_name, source)
    cfg = resolve_configuration(plans, configuration_name, source)
    kwargs = dict(arch["arch_kwargs"])
    if features_per_stage is not None:
        features = [int(f) for f in features_per_stage]
        if len(features) != int(kwargs.get("n_stages", len(features))) or min(features) < 1:
            raise NNUNetError(f"features_per_stage needs {kwargs.get('n_stages')} positive widths (one per stage); "
                              f"got {features}")
        kwargs["features_per_stage"] = features
    return {
        "kind": "nnunet",
        "network_class_name": arch["network_class_name"],
        "arch_kwargs": kwargs,
        "_kw_requires_import": list(arch["_kw_requires_import"]),
        "input_channels": _input_channels(dataset_json, cfg, source),
        "num_classes": label_info(dataset_json).num_heads,
        "configuration_name": configuration_name,
        "trainer_name": trainer_name,
    }


def _resolve_class(name: str, key: str) -> type:
    short = name.rsplit(".", 1)[-1]
    if short in _TORCH_OPS:
        return getattr(nn, short)
    if short in _DNA_BLOCKS:
        from dynamic_network_architectures.building_blocks import residual

        return getattr(residual, short)
    raise NNUNetError(f"arch_kwargs[{key!r}] names {name!r}; ReCoKD allows torch.nn layers "
                      f"({', '.join(sorted(_TORCH_OPS))}) and DNA's BasicBlockD/BottleneckD")


def build_from_record(record: Mapping[str, Any], *, deep_supervision: bool = False) -> nn.Module:
    """The (untrained) DNA network of an :func:`architecture_record`."""
    require_dna()
    import importlib

    short = str(record.get("network_class_name", "")).rsplit(".", 1)[-1]
    if short not in SUPPORTED_NETWORKS:
        raise NNUNetError(f"nnunet architecture record names network {record.get('network_class_name')!r}; "
                          f"supported: {sorted(SUPPORTED_NETWORKS)}")
    cls = getattr(importlib.import_module(SUPPORTED_NETWORKS[short]), short)
    kwargs = copy.deepcopy(dict(record["arch_kwargs"]))
    for key in record.get("_kw_requires_import", []):
        if kwargs.get(key) is not None:
            kwargs[key] = _resolve_class(str(kwargs[key]), key)
    try:
        return cls(input_channels=int(record["input_channels"]), num_classes=int(record["num_classes"]),
                   deep_supervision=deep_supervision, **kwargs)
    except (TypeError, AssertionError, ValueError, IndexError) as exc:
        raise NNUNetError(f"{short} rejected the arch_kwargs of the plans: {type(exc).__name__}: {exc}") from None


def build_network(plans: Mapping[str, Any], dataset_json: Mapping[str, Any], configuration_name: str, *,
                  deep_supervision: bool = False, features_per_stage: Sequence[int] | None = None,
                  trainer_name: str = "nnUNetTrainer", source: str = "plans.json") -> nn.Module:
    """The network nnU-Net would build for ``configuration_name`` (untrained; load weights into it).

    Args:
        plans, dataset_json: the parsed ``plans.json`` and ``dataset.json``.
        configuration_name: e.g. ``"3d_fullres"`` (``inherits_from`` resolved).
        deep_supervision: return the list of outputs of every decoder stage (training).
        features_per_stage: other widths (students), one per stage.
        trainer_name: ``nnUNetTrainerBN`` switches to BatchNorm; Primus trainers are refused.

    Returns:
        a DNA ``PlainConvUNet``/``ResidualEncoderUNet`` mapping ``(B, C, D, H, W)`` to
        ``(B, heads, D, H, W)`` logits (a list, full resolution first, with deep supervision).
    """
    record = architecture_record(plans, dataset_json, configuration_name, features_per_stage,
                                 trainer_name=trainer_name, source=source)
    return build_from_record(record, deep_supervision=deep_supervision)


def encoder_tap_names(network_or_record: nn.Module | Mapping[str, Any], drop_deepest: bool = True) -> list[str]:
    """Module names of the encoder stages (``encoder.stages.i``), the bottleneck left out by default.

    Accepts a DNA U-Net or an :func:`architecture_record`.
    """
    if isinstance(network_or_record, Mapping):
        n = int(network_or_record["arch_kwargs"]["n_stages"])
    else:
        encoder = getattr(network_or_record, "encoder", None)
        stages = getattr(encoder, "stages", None)
        if stages is None:
            raise NNUNetError(f"{type(network_or_record).__name__} has no encoder.stages; not a DNA U-Net")
        n = len(stages)
    names = [f"encoder.stages.{i}" for i in range(n)]
    return names[:-1] if drop_deepest else names
