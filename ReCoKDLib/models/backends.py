"""The inference backend layer: which engine runs a model's network, chosen per model and machine.

Every front end (``recokd segment``, ``evaluate``, ``inspect``, the Slicer module, ``recokd
serve``) segments through :func:`ReCoKDLib.infer.segment_volume`, which asks
:func:`prepare_runner` for a :class:`Runner`: the model's network(s) wrapped so that a sliding
window calls them like the PyTorch network, ``(B, C, D, H, W) -> (B, K, D, H, W)`` float32 logits.

Backends and precisions (``--backend``, ``--precision``):

* ``torch``: the eager network (convolutions through oneDNN, see
  :class:`ReCoKDLib.networks.OneDNNConv3d`), ``fp32`` or ``bf16`` autocast (where the CPU has bf16
  instructions; fp16/bf16 autocast on CUDA);
* ``onnxruntime``: ONNX Runtime on the CPU, fp32;
* ``openvino``: OpenVINO on the CPU, ``fp32`` or ``bf16`` inference precision;
* ``auto`` (default): on CUDA the PyTorch network; on the CPU every installed candidate is run once
  on a probe window, those that disagree with PyTorch fp32 are refused, and the fastest of the rest
  is used. The choice, its reason and the measurements are logged and remembered beside the model
  for this machine (CPU, threads, library versions), so the measurement happens once.

**Agreement** (first use of a backend with a model): the backend's logits on the probe window are
compared with PyTorch fp32's. An fp32 backend must agree within :data:`FP32_TOLERANCE` (max
``|Δlogit|`` relative to ``max(1, max |logit|)``: summation order only); a bf16 backend must give
the same class for at least :data:`BF16_MIN_AGREEMENT` of the probe's voxels. A backend that
disagrees is refused (named with its numbers): ``auto`` goes on with the next, an explicit choice
is an :class:`~ReCoKDLib.models.base.InferenceError`. The reference asked for by name (``torch
fp32``; ONNX Runtime fp32 for an exported graph) is not probed: nothing to compare or choose, so its
first segmentation costs no extra network passes. A missing runtime is a clear error when asked
for, and skipped (with the reason logged) by ``auto``.

**Graph cache.** ONNX Runtime and OpenVINO run an ONNX graph exported from the network (dynamic
batch and spatial axes, so one graph serves every window). It is cached in ``.recokd-cache/``
beside the model, or in the user cache (``$RECOKD_CACHE_DIR``, else ``~/.cache/recokd/graphs``)
when that folder is read-only. The cache key is the SHA-256 of the model file's bytes (an nnU-Net
folder: of its checkpoints; a model without a file: of its weights) with the exporter's version;
a graph is used only when its record (a JSON file beside it) names that key and the graph's own
SHA-256: a graph dropped there by hand, or half written, is never loaded; it is exported again.
Graphs and records are written atomically (:func:`ReCoKDLib.checkpoint.atomic_output`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ReCoKDLib.models.base import InferenceError, LoadedModel, network_logits
from ReCoKDLib.models.runtimes import GraphNetwork, RuntimeMissingError, export_onnx, runtime_available, runtime_version

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "FP32_TOLERANCE",
    "BF16_MIN_AGREEMENT",
    "Runner",
    "TorchNetwork",
    "prepare_runner",
    "cpu_supports_bf16",
    "user_cache_dir",
    "model_fingerprint",
]

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
PRECISIONS = ("auto", "fp32", "bf16")
#: an fp32 backend's max |Δlogit| against PyTorch fp32, relative to max(1, max |logit|)
FP32_TOLERANCE = 1e-2
#: a bf16 backend's share of probe voxels whose class (argmax) equals PyTorch fp32's
BF16_MIN_AGREEMENT = 0.99
#: bumped when the exported graphs change (part of the cache key). 2: a strided-stem network's graph
#: upsamples its logits to each input's size (format 1 baked the export probe's size in)
GRAPH_FORMAT = 2
CACHE_FOLDER = ".recokd-cache"


def cpu_supports_bf16() -> bool:
    """Whether PyTorch's oneDNN has bf16 kernels on this CPU (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def user_cache_dir() -> Path:
    """``$RECOKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/recokd/graphs``, else ``~/.cache/recokd/graphs``."""
    if os.environ.get("RECOKD_CACHE_DIR"):
        return Path(os.environ["RECOKD_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "recokd" / "graphs"


class TorchNetwork(nn.Module):
    """The PyTorch backend: ``network`` under autocast when ``precision == "bf16"`` (CPU) or
    ``"fp16"``/``"bf16"`` (CUDA), returning float32 full-resolution logits."""

    def __init__(self, network: nn.Module, precision: str = "fp32", device_type: str = "cpu") -> None:
        super().__init__()
        self.network = network
        self.precision = precision
        self.device_type = device_type

    def forward(self, x: Tensor) -> Tensor:
        if self.precision == "fp32":
            return network_logits(self.network(x)).float()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        with torch.autocast(self.device_type, dtype=dtype):
            return network_logits(self.network(x)).float()


@dataclass
class Runner:
    """A model's network(s) on one backend, ready for a sliding window.

    Attributes:
        networks: one per fold (nnU-Net folders with several folds), each ``(B, C, D, H, W) ->
            (B, K, D, H, W)`` float32 logits.
        backend, precision: what runs them.
        device: where (graphs: the CPU).
        reason: why this backend (logged, recorded in results).
        checks: what was measured per candidate: ``backend``, ``precision``, ``seconds`` (one probe
            window), ``max_abs_diff`` and ``agreement`` against PyTorch fp32, ``status``.
        graphs: the ONNX graph files used (empty for ``torch``).
    """

    networks: list[nn.Module]
    backend: str
    precision: str
    device: torch.device
    reason: str
    checks: list[dict[str, Any]] = field(default_factory=list)
    graphs: list[str] = field(default_factory=list)

    @property
    def network(self) -> nn.Module:
        return self.networks[0]

    def record(self) -> dict[str, Any]:
        """JSON-ready summary (for result infos, model cards, benchmarks)."""
        return {"backend": self.backend, "precision": self.precision, "device": str(self.device), "reason": self.reason,
                "checks": self.checks, "graphs": self.graphs}


# --------------------------------------------------------------------------------------------
# Identity of a model (cache keys)


def _state_hash(networks: Sequence[nn.Module]) -> str:
    digest = hashlib.sha256()
    for network in networks:
        for name, tensor in network.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: LoadedModel) -> tuple[str, Path | None, str]:
    """``(sha256, folder beside the model or None, file stem)`` identifying ``model``'s weights.

    The hash is of the model file's bytes (an nnU-Net folder: of its used checkpoints), else of
    its weights in memory (then there is no folder beside it).
    """
    from ReCoKDLib.checkpoint import sha256_file

    if getattr(model, "kind", None) == "nnunet" and getattr(model, "folder", None) is not None:
        return model.sha256, Path(model.folder.path), Path(model.folder.path).name
    source = Path(str(model.source)) if getattr(model, "source", "") else None
    if source is not None and source.is_file():
        return sha256_file(source), source.parent, source.name.split(".")[0]
    return _state_hash(_torch_networks(model)), None, "model"


def _torch_networks(model: LoadedModel) -> list[nn.Module]:
    networks = list(getattr(model, "fold_networks", None) or [])
    return networks or [model.network]


# --------------------------------------------------------------------------------------------
# The graph cache


def _cache_dirs(beside: Path | None) -> list[Path]:
    dirs = [beside / CACHE_FOLDER] if beside is not None else []
    return dirs + [user_cache_dir()]


def _machine() -> str:
    """This machine as the auto choice sees it: CPU model, threads, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = [f"torch {torch.__version__}"] + [f"{r} {runtime_version(r)}" for r in ("onnxruntime", "openvino")]
    return f"{cpu}; {torch.get_num_threads()} threads; " + ", ".join(versions)


@dataclass
class _Cache:
    """The record of one model's graphs and checks (``<stem>-<key>.json``) in one cache folder."""

    folder: Path
    stem: str
    key: str
    model_sha256: str
    data: dict[str, Any]

    @property
    def record_path(self) -> Path:
        return self.folder / f"{self.stem}-{self.key}.json"

    def graph_path(self, fold: int) -> Path:
        return self.folder / f"{self.stem}-{self.key}-f{fold}.onnx"

    def save(self) -> None:
        from ReCoKDLib.checkpoint import atomic_write_text

        atomic_write_text(self.record_path, json.dumps(self.data, indent=1, sort_keys=True) + "\n")


def _graph_key(model_sha256: str, in_channels: int, folds: int) -> str:
    text = json.dumps({"model": model_sha256, "in_channels": in_channels, "folds": folds, "format": GRAPH_FORMAT,
                       "torch": torch.__version__, "onnx": runtime_version("onnx")}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _open_cache(model: LoadedModel, log: Callable[[str], None]) -> _Cache:
    """The cache record for ``model``: an existing valid one, else a new one in the first writable folder."""
    model_sha, beside, stem = model_fingerprint(model)
    key = _graph_key(model_sha, model.card.in_channels, len(_torch_networks(model)))
    for folder in _cache_dirs(beside):
        cache = _Cache(folder, stem, key, model_sha, {})
        if cache.record_path.is_file():
            try:
                data = json.loads(cache.record_path.read_text())
            except (OSError, json.JSONDecodeError):
                data = {}
            if isinstance(data, dict) and data.get("key") == key and data.get("model_sha256") == model_sha:
                cache.data = data
                return cache
            log(f"ignored {cache.record_path}: it does not belong to this model (another key or model hash)")
    for folder in _cache_dirs(beside):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return _Cache(folder, stem, key, model_sha, {"key": key, "model_sha256": model_sha, "graphs": {},
                                                         "checks": {}, "choices": {}})
        log(f"{folder} is read-only; caching graphs in {user_cache_dir()}")
    raise InferenceError(f"no writable folder for the exported graphs (tried {[str(d) for d in _cache_dirs(beside)]}); "
                         f"set RECOKD_CACHE_DIR to one")


def _cached_graphs(model: LoadedModel, cache: _Cache, log: Callable[[str], None]) -> list[Path]:
    """One trusted ONNX graph per network of ``model``: from the cache when its record names it with
    its SHA-256, else exported now (atomically) and recorded."""
    from ReCoKDLib.checkpoint import sha256_file

    networks = _torch_networks(model)
    paths, changed = [], False
    for fold, network in enumerate(networks):
        path = cache.graph_path(fold)
        entry = cache.data.setdefault("graphs", {}).get(str(fold))
        if path.is_file() and isinstance(entry, dict) and entry.get("sha256") == sha256_file(path):
            paths.append(path)
            continue
        if path.is_file():
            log(f"ignored {path}: no record of this model names it with its hash; exporting it again")
        example = torch.zeros((1, model.card.in_channels, *[int(p) for p in model.card.patch_size]))
        example[..., : example.shape[2] // 2, :, :] = 1.0
        started = time.perf_counter()
        export_onnx(network.cpu().eval(), example, path, dynamic_axes=True)
        cache.data["graphs"][str(fold)] = {"file": path.name, "sha256": sha256_file(path),
                                           "export_seconds": round(time.perf_counter() - started, 3)}
        log(f"exported {path.name} in {time.perf_counter() - started:.1f} s (cached for later runs)")
        paths.append(path)
        changed = True
    if changed:  # a new graph is checked and measured anew
        cache.data["choices"] = {}
        cache.save()
    return paths


# --------------------------------------------------------------------------------------------
# Candidates, checks, the choice


@dataclass(frozen=True)
class _Candidate:
    backend: str
    precision: str

    @property
    def name(self) -> str:
        return f"{self.backend} {self.precision}"


def _candidates(model: LoadedModel, backend: str, precision: str, log: Callable[[str], None]) -> list[_Candidate]:
    if backend not in BACKENDS:
        raise InferenceError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if precision not in PRECISIONS:
        raise InferenceError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    bf16 = cpu_supports_bf16()
    if precision == "bf16" and not bf16:
        raise InferenceError("this CPU has no bf16 instructions (AVX-512 BF16 or AMX); use --precision fp32")
    precisions = ["fp32", "bf16"] if precision == "auto" else [precision]
    if not bf16:
        precisions = ["fp32"]
    names = ["torch", "openvino", "onnxruntime"] if backend == "auto" else [backend]
    if getattr(model, "kind", None) == "onnx":
        if backend == "torch":
            raise InferenceError(f"{model.source} is an exported ONNX graph: run it with --backend onnxruntime, openvino "
                                 f"or auto, or give the PyTorch model file")
        names = [n for n in names if n != "torch"]
    out = []
    for name in names:
        if name != "torch" and not runtime_available(name):
            if backend != "auto":
                raise RuntimeMissingError(f"the {name} backend needs the package {name!r}: pip install -c "
                                          f"requirements/constraints.txt 'recokd[export]'")
            log(f"backend {name}: not installed, skipped")
            continue
        for p in precisions:
            if name == "onnxruntime" and p == "bf16":
                if backend == "onnxruntime" and precision == "bf16":
                    raise InferenceError("the onnxruntime backend runs fp32 only on the CPU; use --precision fp32 "
                                         "or --backend openvino for bf16")
                continue
            out.append(_Candidate(name, p))
    if not out:
        raise RuntimeMissingError("no inference backend is installed for this exported graph: pip install -c "
                                  "requirements/constraints.txt 'recokd[export]' (onnxruntime, openvino)")
    return out


def _compare(reference: Tensor, output: Tensor) -> dict[str, float]:
    if tuple(reference.shape) != tuple(output.shape):
        return {"max_abs_diff": float("inf"), "relative": float("inf"), "agreement": 0.0}
    diff = float((output - reference).abs().max())
    scale = max(1.0, float(reference.abs().max()))
    agreement = float((output.argmax(1) == reference.argmax(1)).float().mean()) if reference.shape[1] > 1 else \
        float(((output > 0) == (reference > 0)).float().mean())
    return {"max_abs_diff": diff, "relative": diff / scale, "agreement": agreement}


def _accepts(candidate: _Candidate, numbers: dict[str, float]) -> tuple[bool, str]:
    if not np.isfinite(numbers["max_abs_diff"]):
        return False, "non-finite or mis-shaped logits"
    if candidate.precision == "fp32":
        ok = numbers["relative"] <= FP32_TOLERANCE
        return ok, (f"max |Δlogit| {numbers['max_abs_diff']:.2g} ({numbers['relative']:.2g} of the logit scale; "
                    f"tolerance {FP32_TOLERANCE:g})")
    ok = numbers["agreement"] >= BF16_MIN_AGREEMENT
    return ok, (f"{100 * numbers['agreement']:.2f} % of voxels keep their class (needs {100 * BF16_MIN_AGREEMENT:g} %), "
                f"max |Δlogit| {numbers['max_abs_diff']:.2g}")


def _build(model: LoadedModel, candidate: _Candidate, device: torch.device, graphs: list[Path] | None) -> list[nn.Module]:
    if candidate.backend == "torch":
        from ReCoKDLib.networks import use_onednn_convolutions

        return [TorchNetwork(use_onednn_convolutions(n.to(device).eval()), candidate.precision, device.type)
                for n in _torch_networks(model)]
    sources = graphs if graphs is not None else [Path(model.source)]
    return [GraphNetwork(p, candidate.backend, candidate.precision) for p in sources]


#: the probe is timed up to this many times (the fastest counts) while the timed calls take under PROBE_SECONDS
PROBE_REPEATS = 3
PROBE_SECONDS = 1.0
#: how a remembered choice was timed; a choice timed otherwise (one call, before 2026-12-08) is made again
PROBE_TIMING = f"fastest of up to {PROBE_REPEATS} calls within {PROBE_SECONDS:g} s"


def _time_probe(network: nn.Module, probe: Tensor) -> tuple[Tensor, float]:
    """The network's output on ``probe`` and its fastest time over up to :data:`PROBE_REPEATS` calls
    after a warm-up. One call is at the mercy of whatever else the machine does: on 2 cores the demo's CT
    teacher once timed torch bf16 0.058 s against OpenVINO bf16 0.064 s per window, so torch was chosen
    and remembered, though OpenVINO segments S1 in 2.6 s against torch's 3.6 s. Slow probes (a
    whole-scan window) stop repeating after :data:`PROBE_SECONDS`."""
    with torch.no_grad():
        network(probe)  # warm-up (graph compilation, oneDNN primitive cache)
        times: list[float] = []
        while len(times) < PROBE_REPEATS and sum(times) < PROBE_SECONDS:
            started = time.perf_counter()
            out = network(probe)
            times.append(time.perf_counter() - started)
    return out.float().cpu(), min(times)


def _runner_cache(model) -> dict:
    """``model.runners`` (prepared runners of this model object), created on models without one."""
    runners = getattr(model, "runners", None)
    if runners is None:
        runners = {}
        try:
            model.runners = runners
        except AttributeError:
            pass
    return runners


def default_probe(model: LoadedModel, window: Sequence[int] | None = None) -> Tensor:
    """A deterministic ``(1, C, *window)`` probe (standard normal: what normalised scans look like)."""
    size = [int(w) for w in (window or model.card.patch_size)]
    generator = torch.Generator().manual_seed(0)
    return torch.randn((1, model.card.in_channels, *size), generator=generator)


def prepare_runner(model: LoadedModel, backend: str = "auto", precision: str = "auto",
                   device: str | torch.device = "cpu", *, probe: Tensor | None = None,
                   log: Callable[[str], None] | None = None) -> Runner:
    """The :class:`Runner` for ``model`` on ``backend``/``precision`` (see the module docstring),
    prepared once per model object (kept in ``model.runners``).

    Args:
        probe: ``(1, C, D, H, W)`` input for the agreement check and the timing (default
            :func:`default_probe`; ``segment_volume`` passes a window of the scan itself).
        log: receives one line per decision (exports, refusals, the choice and its reason).

    Raises:
        InferenceError: unknown backend/precision, a backend asked for that is missing, cannot run
            here (ONNX Runtime/OpenVINO on CUDA), or disagrees with PyTorch; no candidate left.
    """
    from ReCoKDLib.models.base import resolve_device

    say = log or (lambda _line: None)
    device = resolve_device(device)
    key = (backend, precision, str(device))
    runners = _runner_cache(model)
    if key in runners:
        return runners[key]
    if precision == "auto" and getattr(model, "kind", None) == "nnunet":
        precision = "fp32"  # an nnU-Net folder's path reproduces nnUNetPredictor: bf16 only when asked for
    if device.type != "cpu":
        if backend not in ("auto", "torch"):
            raise InferenceError(f"the {backend} backend runs on the CPU; use --backend torch (or auto) on {device}")
        prec = "fp32" if precision in ("auto", "fp32") else precision
        runner = Runner([TorchNetwork(n.to(device).eval(), prec, device.type) for n in _torch_networks(model)],
                        "torch", prec, device, f"PyTorch on {device} ({prec})")
        runners[key] = runner
        say(f"backend: {runner.reason}")
        return runner

    candidates = _candidates(model, backend, precision, say)
    probe = default_probe(model) if probe is None else probe.float().cpu()
    kind = getattr(model, "kind", None)
    needs_graph = any(c.backend != "torch" for c in candidates) and kind != "onnx"
    cache = None
    graphs: list[Path] | None = None
    if needs_graph:
        try:
            cache = _open_cache(model, say)
            graphs = _cached_graphs(model, cache, say)
        except InferenceError as exc:
            if all(c.backend != "torch" for c in candidates):
                raise
            say(f"backends onnxruntime/openvino skipped: {exc}")
            candidates = [c for c in candidates if c.backend == "torch"]

    machine = _machine()
    remembered = (cache.data.get("choices", {}).get(machine) if cache is not None else None) if len(candidates) > 1 else None
    if remembered and remembered.get("timing") == PROBE_TIMING and backend == "auto" and precision == "auto":
        match = [c for c in candidates if c.name == remembered.get("choice")]
        if match:  # measured and checked before on this machine, with these graphs: no probe runs
            runner = Runner(_build(model, match[0], device, graphs), match[0].backend, match[0].precision, device,
                            f"{match[0].name}: remembered for this model on this machine ({remembered.get('reason', '')})",
                            list(remembered.get("checks", [])),
                            [str(p) for p in graphs] if graphs is not None and match[0].backend != "torch" else [])
            runners[key] = runner
            say(f"backend: {runner.reason}")
            return runner

    if kind == "onnx":  # the graph's own reference: ONNX Runtime fp32 (what recokd export checked it with)
        reference_candidate = _Candidate("onnxruntime" if runtime_available("onnxruntime") else "openvino", "fp32")
    else:
        reference_candidate = _Candidate("torch", "fp32")
    reference_nets = _build(model, reference_candidate, device, graphs if reference_candidate.backend != "torch" else None)
    if candidates == [reference_candidate]:  # the reference itself: nothing to check or choose, no probe runs
        runner = Runner(reference_nets, reference_candidate.backend, reference_candidate.precision, device,
                        f"{reference_candidate.name}: as asked", [],
                        [str(model.source)] if kind == "onnx" else [])
        runners[key] = runner
        say(f"backend: {runner.reason}")
        return runner
    reference, reference_seconds = _time_probe(reference_nets[0], probe)

    checks: list[dict[str, Any]] = []
    chosen: tuple[_Candidate, list[nn.Module], float] | None = None
    ordered = candidates
    for candidate in ordered:
        try:
            networks = reference_nets if candidate == reference_candidate else _build(model, candidate, device, graphs)
            output, seconds = (reference, reference_seconds) if candidate == reference_candidate else \
                _time_probe(networks[0], probe)
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot run this graph is refused, not fatal
            if backend != "auto" or len(candidates) == 1:
                raise InferenceError(f"backend {candidate.name} cannot run this model: {type(exc).__name__}: "
                                     f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}") from None
            say(f"backend {candidate.name}: refused ({type(exc).__name__}: {str(exc).strip()[:200]})")
            checks.append({"backend": candidate.backend, "precision": candidate.precision, "status": f"failed: {exc}"[:300]})
            continue
        numbers = _compare(reference, output)
        ok, text = _accepts(candidate, numbers) if candidate != reference_candidate else (True, "the reference")
        checks.append({"backend": candidate.backend, "precision": candidate.precision, "seconds": round(seconds, 4),
                       **{k: round(v, 6) for k, v in numbers.items()}, "status": "ok" if ok else "refused"})
        if not ok:
            message = f"backend {candidate.name} disagrees with PyTorch fp32 on the probe window: {text}"
            if backend != "auto" and precision != "auto":
                raise InferenceError(message + "; use another backend or precision")
            say(message + "; refused")
            continue
        if chosen is None or seconds < chosen[2]:
            chosen = (candidate, networks, seconds)
    if chosen is None:
        raise InferenceError(f"no backend agreed with PyTorch fp32 on this model: {checks}")
    candidate, networks, seconds = chosen
    if len(ordered) > 1:
        timings = ", ".join(f"{c['backend']} {c['precision']} {c['seconds']:.3g} s" for c in checks if "seconds" in c)
        reason = f"{candidate.name}: fastest on a {'x'.join(map(str, probe.shape[2:]))} window here ({timings}) " \
                 f"among the backends that agree with PyTorch fp32"
    else:
        reason = f"{candidate.name}: as asked" + ("" if candidate.backend == "torch" else " (agrees with PyTorch fp32)")
    if cache is not None and len(ordered) > 1:
        cache.data.setdefault("choices", {})[machine] = {"choice": candidate.name, "reason": reason, "checks": checks,
                                                         "timing": PROBE_TIMING,
                                                         "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            cache.save()
        except OSError as exc:
            say(f"could not remember the choice in {cache.record_path}: {exc}")
    runner = Runner(networks, candidate.backend, candidate.precision, device, reason, checks,
                    [str(p) for p in graphs] if graphs is not None and candidate.backend != "torch" else
                    ([str(model.source)] if kind == "onnx" else []))
    runners[key] = runner
    say(f"backend: {reason}")
    return runner
