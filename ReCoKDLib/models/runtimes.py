"""Exported graphs run by ONNX Runtime or OpenVINO, as ``nn.Module``\\ s the sliding windows call.

* :func:`export_onnx`: a PyTorch network as an ONNX graph (written atomically);
* :class:`GraphNetwork`: ``forward((B, C, D, H, W)) -> (B, K, D, H, W)`` float32 logits computed by
  ONNX Runtime (``runtime="onnxruntime"``) or OpenVINO (``"openvino"``, fp32 or bf16 inference
  precision) on the CPU. It has no parameters; a graph exported for a fixed ``(1, C, *window)``
  input runs a batch one window at a time;
* :func:`runtime_version`, :func:`runtime_available`: what is installed.

Both runtimes come from PyPI (``pip install 'recokd[export]'``; pinned in
``requirements/constraints.txt``). Neither runs Python code from the graph file.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ReCoKDLib.models.base import InferenceError, network_logits

__all__ = ["RUNTIMES", "GraphNetwork", "export_onnx", "runtime_available", "runtime_version", "RuntimeMissingError"]

RUNTIMES = ("onnxruntime", "openvino")
_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


class RuntimeMissingError(InferenceError):
    """The runtime a backend needs is not installed."""


def runtime_version(runtime: str) -> str | None:
    """The installed version of ``runtime`` (``"onnxruntime"``, ``"openvino"``, ``"onnx"``), or ``None``."""
    from importlib import metadata

    try:
        return metadata.version(_PACKAGES.get(runtime, runtime))
    except metadata.PackageNotFoundError:
        return None


def runtime_available(runtime: str) -> bool:
    """Whether ``runtime`` can be imported here."""
    try:
        _import_runtime(runtime)
    except RuntimeMissingError:
        return False
    return True


def _import_runtime(runtime: str):
    if runtime not in RUNTIMES:
        raise InferenceError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
    try:
        if runtime == "onnxruntime":
            import onnxruntime as module
        else:
            import openvino as module
    except ImportError as exc:
        raise RuntimeMissingError(
            f"the {runtime} backend needs the package {_PACKAGES[runtime]!r}: pip install -c requirements/constraints.txt "
            f"'recokd[export]' ({exc})") from None
    return module


class _SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def keep_signal_stack():
    """Restore the calling thread's alternate signal stack (``sigaltstack``) on exit.

    OpenVINO's CPU plugin (2026.4) installs its own 20 KB alternate signal stack on the thread that
    compiles or runs a model and later frees it, while Python keeps delivering its handlers
    (``signal.signal``, faulthandler) with ``SA_ONSTACK``: the next SIGTERM or Ctrl+C then crashes
    the process (SIGSEGV inside ``kill``; seen as exit 139 when the engine's SIGTERM test ran after
    an OpenVINO probe). A no-op where the C library has no ``sigaltstack`` (Windows).
    """
    libc = _libc()
    if libc is None:
        yield
        return
    saved = _SignalStack()
    if libc.sigaltstack(None, ctypes.byref(saved)) != 0:
        yield
        return
    try:
        yield
    finally:
        current = _SignalStack()
        libc.sigaltstack(None, ctypes.byref(current))
        if (current.ss_sp, current.ss_size, current.ss_flags) != (saved.ss_sp, saved.ss_size, saved.ss_flags):
            restore = _SignalStack(saved.ss_sp, saved.ss_flags & _SS_DISABLE, saved.ss_size)
            libc.sigaltstack(ctypes.byref(restore), None)


_SS_DISABLE = 2  # <signal.h> on Linux and macOS (the only flag sigaltstack accepts when setting)


@functools.lru_cache(maxsize=1)
def _libc():
    if sys.platform == "win32":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.sigaltstack  # noqa: B018 - present on every POSIX C library
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def exporter_output_captured():
    """Everything written to the process's stdout and stderr inside, by Python or by C++, goes to a
    temporary file that is thrown away (an exporter's failure is reported by its exception).

    The exporters print progress lines, and the TorchScript one dumps its whole IR graph (tens of
    kilobytes for a teacher) from C++ when it fails on a network that the other exporter handles.
    Neither belongs on a user's terminal or in ``--progress json`` output. The capture is
    process-wide: what other threads write meanwhile (``recokd serve``'s log during a model's first,
    one-off export) is discarded too.
    """
    import tempfile

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            text = io.StringIO()  # Python-level writes (sys.stdout / sys.stderr may not be the fds)
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _instance_norm_with_running_stats(network: nn.Module) -> bool:
    """Whether an instance norm of ``network`` keeps running statistics (``track_running_stats``)."""
    return any(isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.running_mean is not None
               for m in network.modules())


def export_onnx(network: nn.Module, example: Tensor, path: str | os.PathLike, *, dynamic_axes: bool = False) -> Path:
    """Export ``network`` (eval mode) for inputs shaped like ``example`` ``(B, C, D, H, W)`` to ONNX at
    ``path``, atomically (a temporary file beside it, then renamed). Input ``image``, output
    ``logits``; ``dynamic_axes`` makes batch and spatial sizes dynamic.

    The TorchScript-based exporter is tried first (2 s for the demo's student and the CT teacher,
    against 6-7 s for the other), the ``torch.export`` based one (needs ``onnxscript``) when it fails,
    except for networks whose instance norms keep running statistics (HD-BET's): the TorchScript
    exporter's ``instance_norm`` turns those into a batch norm over ``N*C`` channels that needs a
    static batch size (``torch/onnx/_internal/torchscript_exporter/symbolic_opset9.py``,
    ``instance_norm``), which HD-BET's graph loses, and fails only after tracing it all (113 s, then
    11 s with ``torch.export``), so those try ``torch.export`` first.

    Raises:
        InferenceError: neither exporter can export the network.
    """
    from ReCoKDLib.checkpoint import atomic_output
    from ReCoKDLib.networks import plain_convolutions

    path = Path(path)
    axes = {0: "batch", 2: "depth", 3: "height", 4: "width"}
    dynamic = {"image": axes, "logits": axes} if dynamic_axes else None

    class _Logits(nn.Module):  # deep-supervision tuples and stacked outputs -> the full-resolution logits
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Tensor) -> Tensor:
            return network_logits(self.inner(x))

    errors = []
    wrapped = _Logits(network).eval()
    with plain_convolutions(network), exporter_output_captured(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dynamo in ((True, False) if _instance_norm_with_running_stats(network) else (False, True)):
            try:
                with atomic_output(path, suffix=".onnx") as tmp, torch.no_grad():
                    kwargs = {"dynamo": True, "external_data": False} if dynamo else {"dynamo": False, "opset_version": 17}
                    torch.onnx.export(wrapped, (example,), str(tmp), input_names=["image"], output_names=["logits"],
                                      dynamic_axes=dynamic, **kwargs)
                return path
            except Exception as exc:  # noqa: BLE001 - report any exporter failure as one error type
                errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}")
    raise InferenceError("ONNX export failed: " + "; ".join(errors))


class GraphNetwork(nn.Module):
    """An ONNX graph run by ONNX Runtime or OpenVINO on the CPU.

    Args:
        path: the ``.onnx`` file (input ``image`` ``(B, C, D, H, W)``, output ``logits``).
        runtime: ``"onnxruntime"`` or ``"openvino"``.
        precision: ``"fp32"`` or ``"bf16"`` (OpenVINO's inference precision; ONNX Runtime: fp32 only).
        threads: intra-op threads (default: ``torch.get_num_threads()``).

    ``forward((B, C, D, H, W))`` returns ``(B, K, D, H, W)`` float32 logits on the CPU. A graph with a
    fixed batch of 1 runs a batch window by window. Calls are serialised (one inference request).
    """

    def __init__(self, path: str | os.PathLike, runtime: str, precision: str = "fp32", threads: int | None = None):
        super().__init__()
        if precision not in ("fp32", "bf16"):
            raise InferenceError(f"precision must be fp32 or bf16; got {precision!r}")
        if runtime == "onnxruntime" and precision != "fp32":
            raise InferenceError("the onnxruntime backend runs fp32 only on the CPU; use --precision fp32 or openvino")
        self.path = str(path)
        self.runtime = runtime
        self.precision = precision
        self.threads = int(threads or torch.get_num_threads())
        self._lock = threading.Lock()
        module = _import_runtime(runtime)
        if runtime == "onnxruntime":
            options = module.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            self._session = module.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
            self._input = self._session.get_inputs()[0]
            shape = self._input.shape
        else:
            with keep_signal_stack():
                shape = self._compile_openvino(module, precision)
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.input_shape = tuple(s if isinstance(s, int) else None for s in shape)

    def _compile_openvino(self, module, precision: str) -> list[int | None]:
        """Compile the graph for the CPU, keep its inference request; the input shape (``None``: dynamic)."""
        core = module.Core()
        config = {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32" if precision == "fp32" else "bf16"}
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise InferenceError("this CPU has no bf16 instructions for OpenVINO; use --precision fp32")
        compiled = core.compile_model(core.read_model(self.path), "CPU", config)
        self._request = compiled.create_infer_request()
        return [d.get_length() if d.is_static else None for d in compiled.input(0).get_partial_shape()]

    def extra_repr(self) -> str:
        return f"{self.runtime} {self.precision}, {Path(self.path).name}, input {self.input_shape}"

    def _run(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            if self.runtime == "onnxruntime":
                return self._session.run(None, {self._input.name: x})[0]
            with keep_signal_stack():
                # OpenVINO reads the input where it is (the default copies it first) and its output
                # buffer is reused by the next call: one copy out of it (the default, share_outputs=False,
                # copies it once more: a third (B, K, D, H, W) map at the peak of a whole-scan window)
                result = self._request.infer({0: x}, share_inputs=True, share_outputs=True)
                return np.array(result[0], copy=True)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5:
            raise InferenceError(f"a graph network takes (B, C, D, H, W); got {tuple(x.shape)}")
        expected = self.input_shape[1:]
        if any(e is not None and e != s for e, s in zip(expected, x.shape[1:])):
            raise InferenceError(f"the graph {Path(self.path).name} was exported for inputs (B, {', '.join(map(str, expected))}); "
                                 f"got {tuple(x.shape)}")
        array = np.ascontiguousarray(x.detach().float().cpu().numpy())
        if self.fixed_batch == 1 and array.shape[0] != 1:
            outputs = [self._run(array[n:n + 1]) for n in range(array.shape[0])]
            out = np.concatenate(outputs, axis=0)
        else:
            out = self._run(array)
        return torch.from_numpy(np.asarray(out, dtype=np.float32))


@contextlib.contextmanager
def torch_threads(count: int):
    """PyTorch's intra-op threads set to ``count`` inside the block (process-wide), restored after."""
    before = torch.get_num_threads()
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def aggregate_on_one_thread(networks: Sequence[nn.Module]) -> contextlib.AbstractContextManager:
    """``torch_threads(1)`` when every one of ``networks`` is a :class:`GraphNetwork`, else nothing.

    Segmenting with ONNX Runtime or OpenVINO, the runtime computes the windows on its own threads
    (the ones it was compiled with) and PyTorch only adds them up (the Gaussian weighting of MONAI's
    or nnU-Net's sliding window). With two PyTorch threads, each addition is an OpenMP parallel
    region whose worker then spins, waiting for more work, on a core the runtime's next window
    needs. Measured 2026-12-07 on a 2-core bf16 CPU, the demo's HD-BET student (OpenVINO bf16) on
    pyradiomics brain2, three alternating pairs of processes: inference stage 0.305 / 0.274 /
    0.315 s with two PyTorch threads, 0.246 / 0.235 / 0.239 s with one (the whole segmentation
    0.36 s -> 0.30 s)."""
    if networks and all(isinstance(n, GraphNetwork) for n in networks):
        return torch_threads(1)
    return contextlib.nullcontext()


def graph_input_shape(path: str | os.PathLike) -> Sequence[int | None]:
    """The ``image`` input shape declared in an ONNX file (``None`` for dynamic axes), read with ``onnx``."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]
