"""Models: loading them (every kind of source) and the backends that run them, in one place.

Layers, each importing only those above it in this list (no import runs back up):

* :mod:`.base`: :class:`LoadedModel`, :class:`ModelLoadError`, :class:`InferenceError`,
  :class:`SegmentationResult`, :func:`resolve_device`, :func:`network_logits`;
* loaders: :mod:`.files` (ReCoKD model file, TorchScript, state dict + entry point), :mod:`.presets`
  (third-party teachers described in JSON), :mod:`ReCoKDLib.nnunet.teacher` (nnU-Net v2 folders),
  :func:`.loading.load_onnx_model` (exported graphs); :func:`.loading.load_model` picks one;
* :mod:`.runtimes` (ONNX export, ONNX Runtime / OpenVINO networks), :mod:`.backends` (which engine
  runs a model: PyTorch fp32/bf16, ONNX Runtime, OpenVINO; chosen, checked, cached), :mod:`.window`
  (the inference window from the model and the free memory).

:mod:`ReCoKDLib.infer` (sliding window, exact geometry) sits above all of them; ``ReCoKDLib.teachers``
and ``ReCoKDLib.teacher_presets`` are the older names of :mod:`.loading` and :mod:`.presets`.
"""

from ReCoKDLib.models.base import InferenceError, LoadedModel, ModelLoadError, SegmentationResult, network_logits, resolve_device
from ReCoKDLib.models.loading import load_model

__all__ = ["LoadedModel", "ModelLoadError", "InferenceError", "SegmentationResult", "load_model", "network_logits",
           "resolve_device"]
