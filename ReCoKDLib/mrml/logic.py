"""Scene-level work shared by the Slicer module (``ReCoKD/ReCoKDModule/logic.py``) and ``recokd serve``.

:class:`SceneLogic` segments a volume node with a model into a named, coloured segmentation node,
turns the inspection maps into a region-mask segmentation or a coloured overlay volume, and writes
a segmentation as ``.seg.nrrd``. It works on the ``vtkMRMLScene`` it is given (Slicer's
``slicer.mrmlScene`` or trame-slicer's ``SlicerApp().scene``) with MRML, numpy and library calls
only: no Qt, no ``slicer.app``.

Every long job is split in three so that a front end can run the middle part off its event loop
(a thread, a process) while MRML nodes are touched only on the loop:

1. :meth:`SceneLogic.read_volume` (on the loop) copies the voxels and geometry out of a node;
2. :meth:`SceneLogic.run_segmentation` / :meth:`SceneLogic.run_maps` (anywhere) do the torch
   work on that copy and report progress through a :class:`~ReCoKDLib.progress.Reporter`;
3. :meth:`SceneLogic.add_segmentation` / :meth:`SceneLogic.add_region_mask` /
   :meth:`SceneLogic.add_overlay` (on the loop) put the result into the scene.

:meth:`SceneLogic.segment` and :meth:`SceneLogic.compute_maps` chain them for blocking callers.

Model sources (:func:`describe_model_source`, :meth:`ModelCache.get`): a ReCoKD model file or a
TorchScript file (with its card), an nnU-Net v2 model folder, or a teacher preset written
``"preset:<name>"``.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ReCoKDLib import mrml
from ReCoKDLib.data.io import Geometry, crop

__all__ = [
    "SceneLogicError",
    "PRESET_PREFIX",
    "ModelCache",
    "VolumeInput",
    "SegmentationOutput",
    "SceneLogic",
    "describe_model_source",
    "model_source_kind",
    "available_presets",
    "class_key",
    "full_box",
]

#: a teacher preset is named ``preset:<name>`` wherever a model path is accepted
PRESET_PREFIX = "preset:"

Box = tuple  # (slice k, slice j, slice i) on a volume's (D, H, W) array


class SceneLogicError(ValueError):
    """A scene-level request cannot be done (no volume, missing model, class mismatch, bad key);
    the message says what to provide instead."""


# --------------------------------------------------------------------------------------------
# Model sources


def model_source_kind(source: str | os.PathLike) -> str:
    """``"preset"``, ``"nnunet"`` (a model folder), ``"file"`` (ReCoKD or TorchScript file).

    Raises:
        SceneLogicError: an empty source, a path that does not exist, or a folder that is not an
            nnU-Net v2 model folder.
    """
    text = str(source or "").strip()
    if not text or text == ".":
        raise SceneLogicError("no model chosen: give a model file, an nnU-Net model folder or 'preset:<name>'")
    if text.startswith(PRESET_PREFIX):
        return "preset"
    path = Path(text)
    if path.is_file():
        return "file"
    if path.is_dir():
        nnunet = _optional("ReCoKDLib.nnunet", "is_model_folder")
        if nnunet is None:
            raise SceneLogicError(f"{path} is a folder, and nnU-Net model folders are not available in this "
                                  "installation (ReCoKDLib.nnunet is missing); choose a model file")
        if not nnunet(path):
            raise SceneLogicError(f"{path} is not an nnU-Net v2 model folder (it needs plans.json, dataset.json "
                                  "and fold_<k>/checkpoint_final.pth); choose a model file or such a folder")
        return "nnunet"
    raise SceneLogicError(f"model {text!r} does not exist; give a model file, an nnU-Net model folder "
                          "or 'preset:<name>'")


def _optional(module_name: str, attribute: str):
    """``module.attribute`` of a library part another helper may not have installed, else None."""
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return getattr(module, attribute, None)


def available_presets() -> list[str]:
    """Teacher preset names (:func:`ReCoKDLib.choices.builtin_teacher_presets`: read without torch,
    so a front end lists them before PyTorch is installed); empty when the folder is unreadable."""
    from ReCoKDLib.choices import builtin_teacher_presets

    try:
        return builtin_teacher_presets()
    except OSError:
        return []


def describe_model_source(source: str | os.PathLike) -> str:
    """One line about a model source: classes and spacing (read from its card, folder or preset
    without loading weights where possible).

    Raises:
        SceneLogicError: the source is missing, unreadable or its kind is not available here.
    """
    kind = model_source_kind(source)
    text = str(source).strip()
    try:
        if kind == "preset":
            describe = _optional("ReCoKDLib.teacher_presets", "describe_preset")
            if describe is None:
                raise SceneLogicError("teacher presets are not available in this installation "
                                      "(ReCoKDLib.teacher_presets is missing)")
            return str(describe(text[len(PRESET_PREFIX):]))
        if kind == "nnunet":
            describe = _optional("ReCoKDLib.nnunet", "describe_model_folder")
            if describe is None:
                raise SceneLogicError("nnU-Net model folders are not available in this installation")
            return str(describe(text))
        from ReCoKDLib.checkpoint import read_model_card

        card = read_model_card(text)
    except SceneLogicError:
        raise
    except ValueError as exc:  # CheckpointError, a preset or folder error of the library
        raise SceneLogicError(f"cannot read model {text}: {exc}") from None
    spacing = " x ".join(f"{s:g}" for s in card.spacing)
    return (f"{card.role}: {card.num_classes - 1} classes ({', '.join(card.classes[1:])}); spacing {spacing} mm; "
            f"patch {' x '.join(str(p) for p in card.patch_size)}")


class ModelCache:
    """Loaded models by (source, modification time, device); keeps the last ``size`` (a teacher
    and a student for inspection). Thread-safe: the web app loads from a worker thread."""

    def __init__(self, size: int = 2):
        self.size = size
        self._models: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(source, device) -> tuple:
        text = str(source).strip()
        path = Path(text)
        if not text.startswith(PRESET_PREFIX) and path.exists():
            return str(path.resolve()), path.stat().st_mtime, str(device)
        return text, 0.0, str(device)

    def get(self, source, device: str = "auto"):
        """A :class:`~ReCoKDLib.teachers.LoadedModel` for ``source`` (see the module docstring).

        Raises:
            SceneLogicError: unknown or unavailable kind of source.
            ValueError: the library's own load errors (``ModelLoadError``, ``CheckpointError``).
        """
        model_source_kind(source)  # clear message for a missing path or an unsupported folder
        key = self._key(source, device)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        from ReCoKDLib import teachers

        model = teachers.load_model(str(source).strip(), device)
        with self._lock:
            self._models[key] = model
            while len(self._models) > self.size:
                self._models.popitem(last=False)
        return model

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


# --------------------------------------------------------------------------------------------
# Plain data passed between the loop and a worker


def full_box(shape: Sequence[int]) -> Box:
    return tuple(slice(0, int(n)) for n in shape[-3:])


def _normalised_box(box: Box | None, shape: Sequence[int]) -> Box:
    if box is None:
        return full_box(shape)
    if len(box) != 3:
        raise SceneLogicError(f"a box is three slices (k, j, i); got {box!r}")
    out = []
    for s, n in zip(box, shape[-3:]):
        start, stop = max(0, s.start or 0), min(int(n), int(n) if s.stop is None else s.stop)
        if stop <= start:
            raise SceneLogicError(f"the box {box!r} holds no voxel of the volume (shape {tuple(shape)})")
        out.append(slice(start, stop))
    return tuple(out)


@dataclass
class VolumeInput:
    """Voxels of a volume node copied out of the scene: ``array`` ``(D, H, W)``, its ``geometry``,
    and the ``box`` (slices ``(k, j, i)``) to compute; ``node_id`` names the node it came from."""

    array: np.ndarray
    geometry: Geometry
    box: Box
    node_id: str = ""
    name: str = "volume"

    def cropped(self) -> tuple[np.ndarray, Geometry]:
        """The box's voxels and their geometry (the box placed exactly where it was)."""
        start = [b.start for b in self.box]
        size = [b.stop - b.start for b in self.box]
        return crop(self.array, self.geometry, start, size)


@dataclass
class SegmentationOutput:
    """A label map on the whole volume grid (zero outside the box) and what made it."""

    labels: np.ndarray
    geometry: Geometry
    class_names: list
    model_source: str
    seconds: float
    colors: list | None = None
    info: dict = field(default_factory=dict)


def class_key(class_names: Sequence[str], class_name: str) -> str:
    """The class part of an inspection key: the class id for a known class name, else the text
    itself (an id typed directly), empty for all classes."""
    class_name = str(class_name or "")
    names = [str(c) for c in class_names]
    return str(names.index(class_name)) if class_name in names else class_name


# --------------------------------------------------------------------------------------------
# The logic


class SceneLogic:
    """Segment, inspect and export on one MRML scene (see the module docstring).

    Args:
        scene: the ``vtkMRMLScene`` to add nodes to.
        models: a shared :class:`ModelCache` (default: a new one).
    """

    def __init__(self, scene, models: ModelCache | None = None):
        if scene is None or not scene.IsA("vtkMRMLScene"):
            raise SceneLogicError(f"SceneLogic needs a vtkMRMLScene; got {type(scene).__name__}")
        self.scene = scene
        self.models = models or ModelCache()

    # -- reading ---------------------------------------------------------------------------------

    def read_volume(self, volume_node, box: Box | None = None) -> VolumeInput:
        """Copy a scalar volume node's voxels and geometry (call on the event loop)."""
        if volume_node is None:
            raise SceneLogicError("select an input volume first")
        try:
            array, geometry = mrml.array_from_volume_node(volume_node)
        except mrml.MRMLBridgeError as exc:
            raise SceneLogicError(str(exc)) from None
        return VolumeInput(array, geometry, _normalised_box(box, array.shape), volume_node.GetID() or "",
                           volume_node.GetName() or "volume")

    # -- segmentation ----------------------------------------------------------------------------

    def run_segmentation(self, volume: VolumeInput, model_source, device: str = "auto", reporter=None,
                         **segment_kwargs: Any) -> SegmentationOutput:
        """Segment ``volume`` with a model (no MRML access: safe in a worker thread).

        ``reporter`` (a :class:`~ReCoKDLib.progress.Reporter`) receives the ``"segment"`` stage's
        events from :func:`ReCoKDLib.infer.segment_volume`; ``segment_kwargs`` go there too.
        """
        from ReCoKDLib import infer

        model = self.models.get(model_source, device)
        started = time.perf_counter()
        image, geometry = volume.cropped()
        result = infer.segment_volume(model, image, geometry, device=device, reporter=reporter, **segment_kwargs)
        labels = np.zeros(volume.array.shape[-3:], dtype=result.labels.dtype)
        labels[volume.box] = result.labels
        colors = getattr(model.card, "colors", None)
        return SegmentationOutput(labels, volume.geometry, list(model.card.classes), str(model_source),
                                  time.perf_counter() - started, colors=list(colors) if colors else None,
                                  info={"device": result.device, **result.info})

    def add_segmentation(self, volume_node, output: SegmentationOutput, name: str | None = None):
        """A new segmentation node for ``output`` on ``volume_node``'s grid: one segment per class
        present, named and coloured by the model's classes, beside the volume in the subject
        hierarchy, with ``ReCoKD.Model`` and ``ReCoKD.Seconds`` attributes (call on the loop)."""
        if volume_node is None:
            raise SceneLogicError("the input volume was removed from the scene before the result arrived")
        try:
            node = mrml.segmentation_node_from_labelmap(
                self.scene, output.labels, output.geometry, output.class_names, colors=output.colors,
                name=name or f"{volume_node.GetName()} ReCoKD", reference_volume=volume_node)
        except mrml.MRMLBridgeError as exc:
            raise SceneLogicError(str(exc)) from None
        mrml.place_beside(node, volume_node)
        node.SetAttribute("ReCoKD.Model", str(output.model_source))
        node.SetAttribute("ReCoKD.Seconds", f"{output.seconds:.2f}")
        return node

    def segment(self, volume_node, model_source, box: Box | None = None, device: str = "auto",
                name: str | None = None, reporter=None):
        """Blocking :meth:`read_volume` + :meth:`run_segmentation` + :meth:`add_segmentation`."""
        volume = self.read_volume(volume_node, box)
        output = self.run_segmentation(volume, model_source, device, reporter)
        return self.add_segmentation(volume_node, output, name)

    # -- inspection ------------------------------------------------------------------------------

    def run_maps(self, volume: VolumeInput, teacher_source, student_source, labels=None, method=None,
                 device: str = "cpu", kd_state: Any = "auto") -> dict:
        """Inspection maps of a teacher and a student for ``volume`` (no MRML: worker-safe).

        Args:
            labels: ``(D, H, W)`` class ids on the volume's grid, or ``None`` (the region masks then
                come from the teacher's prediction).
            kd_state: trained adapters (``"auto"``: from the student's run folder, if any).

        Returns:
            ``{"<level>/<name>[/<class>]": (D, H, W) float32}`` on the whole volume grid (zero
            outside the box).

        Raises:
            SceneLogicError: teacher and student do not segment the same classes.
        """
        from ReCoKDLib import inspection

        teacher = self.models.get(teacher_source, device)
        student = self.models.get(student_source, device)
        if list(teacher.card.classes) != list(student.card.classes):
            raise SceneLogicError(
                f"teacher and student segment different classes: teacher {teacher.card.classes}, student "
                f"{student.card.classes}; choose the student distilled from this teacher")
        if kd_state == "auto":
            kd_state = inspection.load_trained_kd_state(student_source) if Path(str(student_source)).is_file() else None
        image, geometry = volume.cropped()
        crop_labels = None if labels is None else np.asarray(labels)[volume.box]
        maps = inspection.inspect_volume(teacher, student, image, geometry, crop_labels, method=method,
                                         kd_state=kd_state)
        out = {}
        for key, value in maps.items():
            whole = np.zeros(volume.array.shape[-3:], np.float32)
            whole[volume.box] = value
            out[key] = whole
        return out

    def compute_maps(self, volume_node, teacher_source, student_source, labels=None, method=None,
                     device: str = "cpu", box: Box | None = None) -> dict:
        """Blocking :meth:`read_volume` + :meth:`run_maps`."""
        return self.run_maps(self.read_volume(volume_node, box), teacher_source, student_source, labels, method,
                             device)

    @staticmethod
    def select_map(maps, level: int, choice: str, class_id: str = "") -> str:
        """The key of ``maps`` for a map choice (``ReCoKDLib.inspection.MAP_CHOICES``)."""
        from ReCoKDLib.inspection import InspectionError, select_map_key

        try:
            return select_map_key(list(maps), level, choice, class_id)
        except InspectionError as exc:
            raise SceneLogicError(str(exc)) from None

    def add_region_mask(self, volume_node, maps: dict, level: int = 0, class_id: str = "", class_name: str = ""):
        """The class-aware region mask of ``level`` as a one-segment segmentation node; the
        segment's name carries the region's weight (ReCo-KD: inverse region size)."""
        key = self.select_map(maps, level, "region mask", class_id)
        _array, geometry = mrml.array_from_volume_node(volume_node)
        values = np.asarray(maps[key])
        weight = float(values.max())
        title = f"{class_name or 'foreground'} level {level} (weight {weight:.3g})"
        node = mrml.segmentation_node_from_labelmap(self.scene, (values > 0).astype(np.uint8), geometry,
                                                    ["background", title], name=f"ReCoKD region mask {key}",
                                                    reference_volume=volume_node)
        mrml.place_beside(node, volume_node)
        return node

    def add_overlay(self, volume_node, maps: dict, level: int = 0, choice: str = "teacher affinity",
                    class_id: str = "", name: str | None = None, threshold: float | None = None):
        """An attention/affinity map or the teacher-student difference as a float volume with a
        colour table (a diverging one for the difference), for the foreground layer."""
        key = self.select_map(maps, level, choice, class_id)
        _array, geometry = mrml.array_from_volume_node(volume_node)
        colormap = "Diverging" if choice == "difference" else "Inferno"
        node = mrml.overlay_volume_from_array(self.scene, maps[key], geometry, name or f"ReCoKD {key}", colormap,
                                              threshold=threshold)
        mrml.place_beside(node, volume_node)
        return node

    # -- export ----------------------------------------------------------------------------------

    def export_segmentation(self, segmentation_node, path: str | os.PathLike) -> Path:
        """Write a segmentation node as ``.seg.nrrd`` (segment names, colours and label values kept;
        Slicer opens it as is), atomically: a failed write leaves nothing at ``path``."""
        from ReCoKDLib.checkpoint import atomic_output

        if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
            raise SceneLogicError("nothing to export: segment a volume first")
        path = Path(path)
        if not path.name.endswith(".seg.nrrd"):
            raise SceneLogicError(f"a segmentation is written as .seg.nrrd; got {path.name}")
        storage = self.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode", "ReCoKD export storage")
        try:
            with atomic_output(path, suffix=".seg.nrrd") as tmp:
                storage.SetFileName(str(tmp))
                storage.SetUseCompression(1)
                if not storage.WriteData(segmentation_node):
                    raise OSError(f"Slicer could not write {segmentation_node.GetName()!r} to {path}")
        finally:
            self.scene.RemoveNode(storage)
        return path

    def export_scene_case(self, volume_node, segmentation_node, folder, class_names=None) -> Path:
        """A volume + segmentation pair as a one-case nnU-Net raw dataset (``imagesTr``,
        ``labelsTr``, ``dataset.json``). Segments map to classes by name (``class_names``,
        background first); without it, segment order defines the classes."""
        from ReCoKDLib.data.io import write_image
        from ReCoKDLib.data.layout import write_dataset_json

        if volume_node is None or segmentation_node is None:
            raise SceneLogicError("select both a training volume and its segmentation")
        if class_names is None:
            segmentation = segmentation_node.GetSegmentation()
            class_names = ["background"] + [segmentation.GetNthSegment(i).GetName()
                                            for i in range(segmentation.GetNumberOfSegments())]
        image, geometry = mrml.array_from_volume_node(volume_node)
        labels = mrml.labelmap_from_segmentation_node(segmentation_node, volume_node, list(class_names))
        folder = Path(folder)
        write_image(image, geometry, folder / "imagesTr" / "scene_000_0000.nii.gz")
        write_image(labels, geometry, folder / "labelsTr" / "scene_000.nii.gz")
        write_dataset_json(folder, ["CT"], list(class_names), 1)
        return folder
