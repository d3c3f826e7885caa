"""Model loading under its first name: everything here lives in :mod:`ReCoKDLib.models`
(:func:`~ReCoKDLib.models.loading.load_model` and the kinds of source it reads)."""

from ReCoKDLib.models.base import LoadedModel, ModelLoadError
from ReCoKDLib.models.files import build_network, is_torchscript_file
from ReCoKDLib.models.loading import load_model

__all__ = ["ModelLoadError", "LoadedModel", "load_model", "build_network", "is_torchscript_file"]
