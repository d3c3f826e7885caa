"""The MRML bridge: numpy arrays with exact geometry <-> 3D Slicer nodes.

This module is the only one in ``ReCoKDLib`` that imports ``slicer``, and it imports only its MRML
classes, a displayable manager's pixel reader and ``slicer.util``'s array helpers: no Qt, no
``slicer.app``, no ``slicer.modules``. The rest of this package (:mod:`.views`: offscreen Slicer
views; :mod:`.logic`: the scene logic of the Slicer module and ``recokd serve``) works through it.
It therefore runs inside the Slicer application and with the Qt-free ``slicer-core`` wheel
(``pip install slicer-core``), which is how the tests exercise it. Every function takes the
``vtkMRMLScene`` as an argument (``slicer.mrmlScene`` does not exist in ``slicer-core``).

Conventions (the same as :mod:`ReCoKDLib.data.io` and ``slicer.util.arrayFromVolume``):

* arrays are ``(D, H, W)`` = ``(k, j, i)``;
* geometry is a :class:`ReCoKDLib.data.io.Geometry` (SimpleITK/LPS); the node's ``IJKToRAS`` is
  ``geometry.ijk_to_ras()`` and back with ``Geometry.from_ijk_to_ras``, so nothing here repeats
  the conversion;
* segments keep their class's label value (``segment.GetLabelValue()``), name and colour.

Example (Slicer Python console)::

    from ReCoKDLib import mrml
    array, geometry = mrml.array_from_volume_node(getNode("CTChest"))
    seg = mrml.segmentation_node_from_labelmap(slicer.mrmlScene, labels, geometry,
                                               ["background", "liver"], reference_volume=getNode("CTChest"))
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import slicer
import vtk

from ReCoKDLib.data.io import Geometry, grid_differences, require_3d

__all__ = [
    "MRMLBridgeError",
    "COLORMAPS",
    "default_class_colors",
    "volume_node_from_array",
    "array_from_volume_node",
    "labelmap_node_from_array",
    "segmentation_node_from_labelmap",
    "labelmap_from_segmentation_node",
    "color_table_node",
    "overlay_volume_from_array",
    "place_beside",
    "remove_node",
    "set_overlay_threshold",
    "render_window_pixels",
]


class MRMLBridgeError(ValueError):
    """An array, geometry or node cannot be converted as asked (wrong shape, grid or names)."""


#: colour maps for overlays: Slicer's procedural tables (``vtkMRMLColorTableNode.SetTypeTo<Name>``),
#: and perceptually uniform / diverging ones sampled from matplotlib.
SLICER_COLORMAPS = ("Iron", "Rainbow", "Grey", "Ocean", "Desert", "FullRainbow")
MATPLOTLIB_COLORMAPS = {"Viridis": "viridis", "Inferno": "inferno", "Magma": "magma", "Plasma": "plasma",
                        "Diverging": "RdBu_r", "Coolwarm": "coolwarm"}
COLORMAPS = SLICER_COLORMAPS + tuple(MATPLOTLIB_COLORMAPS)

#: label colours for classes 1..10 (class 0, the background, is never a segment); beyond that a
#: matplotlib qualitative map continues.
_CLASS_COLORS = (
    (0.86, 0.24, 0.22), (0.18, 0.55, 0.85), (0.30, 0.69, 0.29), (0.95, 0.66, 0.15), (0.60, 0.31, 0.64),
    (0.10, 0.74, 0.74), (0.93, 0.47, 0.71), (0.55, 0.34, 0.16), (0.74, 0.74, 0.13), (0.50, 0.50, 0.50),
)


# --------------------------------------------------------------------------------------------
# Geometry helpers


def _vtk_matrix(matrix: np.ndarray) -> "vtk.vtkMatrix4x4":
    return slicer.util.vtkMatrixFromArray(np.asarray(matrix, dtype=float))


def _node_ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _require_scene(scene) -> None:
    if scene is None or not scene.IsA("vtkMRMLScene"):
        raise MRMLBridgeError(f"expected a vtkMRMLScene (e.g. slicer.mrmlScene); got {type(scene).__name__}")


def _require_node(node, class_name: str, what: str) -> None:
    if node is None or not node.IsA(class_name):
        got = node.GetClassName() if node is not None and hasattr(node, "GetClassName") else type(node).__name__
        raise MRMLBridgeError(f"{what} must be a {class_name}; got {got}")


def _fill_volume(node, array: np.ndarray, geometry: Geometry) -> None:
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.SetIJKToRASMatrix(_vtk_matrix(geometry.ijk_to_ras()))


def _add_volume(scene, class_name: str, array: np.ndarray, geometry: Geometry, name: str):
    _require_scene(scene)
    array = require_3d(np.asarray(array), name)
    if not isinstance(geometry, Geometry):
        raise MRMLBridgeError(f"geometry of {name!r} must be a ReCoKDLib.data.io.Geometry; got {type(geometry).__name__}")
    node = scene.AddNewNodeByClass(class_name, name)
    _fill_volume(node, array, geometry)
    return node


# --------------------------------------------------------------------------------------------
# Volumes


def volume_node_from_array(scene, array: np.ndarray, geometry: Geometry, name: str = "Volume"):
    """A new ``vtkMRMLScalarVolumeNode`` in ``scene`` holding ``array`` ``(D, H, W)`` on ``geometry``.

    The array is copied; its dtype is kept (``bool`` becomes ``uint8``).
    """
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    node = _add_volume(scene, "vtkMRMLScalarVolumeNode", array, geometry, name)
    node.CreateDefaultDisplayNodes()
    return node


def array_from_volume_node(node) -> tuple[np.ndarray, Geometry]:
    """``(array (D, H, W), Geometry)`` of a scalar or label-map volume node (the array is a copy).

    A transform above the node is not applied: the geometry is the node's own ``IJKToRAS``; results
    put back with :func:`place_beside` observe the same transform, so they show where the volume does.
    """
    _require_node(node, "vtkMRMLScalarVolumeNode", "the volume node")
    if node.GetImageData() is None:
        raise MRMLBridgeError(f"volume node {node.GetName()!r} holds no image data")
    array = np.array(slicer.util.arrayFromVolume(node), copy=True)
    return array, Geometry.from_ijk_to_ras(_node_ijk_to_ras(node), array.shape)


def labelmap_node_from_array(scene, labels: np.ndarray, geometry: Geometry, name: str = "Labels",
                             color_node=None):
    """A new ``vtkMRMLLabelMapVolumeNode`` holding integer ``labels`` ``(D, H, W)``.

    Args:
        color_node: optional colour table naming the label values (e.g. from
            :func:`color_table_node`); without it the display keeps Slicer's default labels table.
    """
    labels = _integer_labels(labels, name)
    node = _add_volume(scene, "vtkMRMLLabelMapVolumeNode", labels, geometry, name)
    display = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeDisplayNode")
    if color_node is not None:
        display.SetAndObserveColorNodeID(color_node.GetID())
    node.SetAndObserveDisplayNodeID(display.GetID())
    return node


def _integer_labels(labels: np.ndarray, name: str) -> np.ndarray:
    labels = require_3d(np.asarray(labels), name)
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise MRMLBridgeError(f"{name} must hold integer class ids; got dtype {labels.dtype} with fractional values")
        labels = labels.astype(np.int16)
    if labels.size and labels.min() < 0:
        raise MRMLBridgeError(f"{name} holds negative label values (min {labels.min()}); class ids start at 0")
    return labels


# --------------------------------------------------------------------------------------------
# Colour tables


def default_class_colors(num_classes: int) -> list[tuple[float, float, float]]:
    """RGB in [0, 1] for class ids ``0..num_classes-1`` (index 0, the background, is black)."""
    colors = [(0.0, 0.0, 0.0)]
    for index in range(1, num_classes):
        if index <= len(_CLASS_COLORS):
            colors.append(_CLASS_COLORS[index - 1])
        else:
            from matplotlib import colormaps

            colors.append(tuple(float(c) for c in colormaps["tab20"](index % 20)[:3]))
    return colors


def _label_color_table(scene, class_names: Sequence[str], colors: Sequence[Sequence[float]], name: str):
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    table.SetTypeToUser()
    table.SetNumberOfColors(len(class_names))
    for value, (class_name, rgb) in enumerate(zip(class_names, colors)):
        r, g, b = (float(c) for c in rgb[:3])
        table.SetColor(value, str(class_name), r, g, b, 0.0 if value == 0 else 1.0)
    return table


def color_table_node(scene, colormap: str = "Iron", name: str | None = None, num_colors: int = 256):
    """A ``vtkMRMLColorTableNode`` for continuous overlays.

    Args:
        colormap: one of :data:`COLORMAPS`: Slicer's procedural ``Iron``/``Rainbow``/... tables,
            or ``Viridis``/``Inferno``/``Magma``/``Plasma`` and the diverging ``Diverging``
            (blue-white-red, for teacher - student differences) sampled from matplotlib.
    """
    _require_scene(scene)
    key = next((c for c in COLORMAPS if c.lower() == str(colormap).lower()), None)
    if key is None:
        raise MRMLBridgeError(f"unknown colour map {colormap!r}; choose one of {list(COLORMAPS)}")
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name or f"ReCoKD {key}")
    if key in SLICER_COLORMAPS:
        getattr(table, f"SetTypeTo{key}")()
        return table
    from matplotlib import colormaps

    cmap = colormaps[MATPLOTLIB_COLORMAPS[key]]
    table.SetTypeToUser()
    table.SetNumberOfColors(num_colors)
    for index, rgba in enumerate(cmap(np.linspace(0.0, 1.0, num_colors))):
        table.SetColor(index, float(rgba[0]), float(rgba[1]), float(rgba[2]), 1.0)
    return table


# --------------------------------------------------------------------------------------------
# Segmentations


def _segment_ids(segmentation) -> list[str]:
    ids = vtk.vtkStringArray()
    segmentation.GetSegmentIDs(ids)
    return [ids.GetValue(i) for i in range(ids.GetNumberOfValues())]


def _check_reference(reference_volume, shape: Sequence[int], geometry: Geometry, what: str) -> None:
    _require_node(reference_volume, "vtkMRMLScalarVolumeNode", "reference_volume")
    ref_array, ref_geometry = array_from_volume_node(reference_volume)
    diffs = grid_differences(geometry, ref_geometry, shape, ref_array.shape)
    if diffs:
        raise MRMLBridgeError(
            f"{what} is not on the grid of reference volume {reference_volume.GetName()!r}: " + "; ".join(diffs)
            + ". Resample it onto the volume (ReCoKDLib.data.io.resample_to_grid) first."
        )


def segmentation_node_from_labelmap(
    scene,
    labels: np.ndarray,
    geometry: Geometry,
    class_names: Sequence[str],
    colors: Sequence[Sequence[float]] | None = None,
    name: str = "ReCoKD segmentation",
    reference_volume=None,
):
    """A new ``vtkMRMLSegmentationNode`` with one segment per class present in ``labels``.

    Args:
        labels: ``(D, H, W)`` integer class ids; 0 is the background and never a segment.
        class_names: names by class id (``class_names[0]`` is the background); every id in
            ``labels`` needs a name.
        colors: RGB in [0, 1] by class id; :func:`default_class_colors` when omitted.
        reference_volume: the volume ``labels`` was computed on; its grid must equal
            ``geometry``/``labels.shape`` and it becomes the segmentation's reference geometry.

    Returns:
        the segmentation node; each segment is named and coloured by its class and keeps the
        class id as its label value. Classes with no voxel get no segment.
    """
    _require_scene(scene)
    labels = _integer_labels(labels, "labels")
    class_names = [str(c) for c in class_names]
    present = [int(v) for v in np.unique(labels) if v != 0]
    if present and present[-1] >= len(class_names):
        raise MRMLBridgeError(
            f"labels hold class id {present[-1]} but only {len(class_names)} class names were given "
            f"({class_names}); pass one name per class id, background first"
        )
    colors = list(colors) if colors is not None else default_class_colors(len(class_names))
    if len(colors) < len(class_names):
        raise MRMLBridgeError(f"{len(class_names)} classes need {len(class_names)} colours; got {len(colors)}")
    if reference_volume is not None:
        _check_reference(reference_volume, labels.shape, geometry, "labels")

    table = _label_color_table(scene, class_names, colors, f"{name} colours")
    labelmap = labelmap_node_from_array(scene, labels, geometry, f"{name} labels", color_node=table)
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation_node.CreateDefaultDisplayNodes()
    try:
        if present and not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node):
            raise MRMLBridgeError(f"Slicer could not import the label map {name!r} into a segmentation")
    finally:
        remove_node(labelmap)
        scene.RemoveNode(table)
    segmentation = segmentation_node.GetSegmentation()
    for segment_id in _segment_ids(segmentation):
        segment = segmentation.GetSegment(segment_id)
        value = segment.GetLabelValue()
        segment.SetName(class_names[value])
        segment.SetColor(*(float(c) for c in colors[value][:3]))
    if reference_volume is not None:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        segmentation_node.SetNodeReferenceID(
            segmentation_node.GetReferenceImageGeometryReferenceRole(), reference_volume.GetID())
    return segmentation_node


def labelmap_from_segmentation_node(segmentation_node, reference_volume_node,
                                    class_names: Sequence[str] | None = None) -> np.ndarray:
    """``(D, H, W)`` class ids of a segmentation, on the grid of ``reference_volume_node``.

    Args:
        class_names: class names by id; each segment's **name** gives its class id, so
            segments renamed or reordered by the user still map to the right class. Without
            it, the segment's label value is used (ids kept from
            :func:`segmentation_node_from_labelmap`).

    Raises:
        MRMLBridgeError: a segment's name is not one of ``class_names`` (the message lists both),
            or a node of the wrong type.

    Where segments overlap, the later segment wins. Returns ``uint8`` for up to 255 classes,
    else ``uint16``.
    """
    _require_node(segmentation_node, "vtkMRMLSegmentationNode", "segmentation_node")
    _require_node(reference_volume_node, "vtkMRMLScalarVolumeNode", "reference_volume_node")
    scene = segmentation_node.GetScene()
    segmentation = segmentation_node.GetSegmentation()
    ids = _segment_ids(segmentation)
    index = {str(n): i for i, n in enumerate(class_names)} if class_names is not None else None
    values = []
    for segment_id in ids:
        segment = segmentation.GetSegment(segment_id)
        if index is None:
            values.append(int(segment.GetLabelValue()))
        elif segment.GetName() in index:
            values.append(index[segment.GetName()])
        else:
            raise MRMLBridgeError(
                f"segment {segment.GetName()!r} of {segmentation_node.GetName()!r} is not one of the classes "
                f"{list(class_names)}; rename it to a class name or remove it"
            )
    shape = slicer.util.arrayFromVolume(reference_volume_node).shape
    n = max(values, default=0)
    out = np.zeros(shape, dtype=np.uint8 if n < 256 else np.uint16)
    export = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "ReCoKD export")
    try:
        for segment_id, value in zip(ids, values):
            one = vtk.vtkStringArray()
            one.InsertNextValue(segment_id)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentation_node, one, export, reference_volume_node):
                raise MRMLBridgeError(f"Slicer could not export segment {segment_id!r} onto {reference_volume_node.GetName()!r}")
            mask = slicer.util.arrayFromVolume(export)
            out[mask > 0] = value
    finally:
        remove_node(export)
    return out


# --------------------------------------------------------------------------------------------
# Overlays


def overlay_volume_from_array(
    scene,
    array: np.ndarray,
    geometry: Geometry,
    name: str,
    colormap: str = "Iron",
    window: tuple[float, float] | None = None,
    threshold: float | None = None,
):
    """A float scalar volume with a colour table, for a map shown in the foreground layer.

    Args:
        array: ``(D, H, W)`` values (an attention, affinity or difference map on the image grid).
        colormap: see :func:`color_table_node`; ``Diverging`` suits signed differences.
        window: ``(low, high)`` display range; default the data range, made symmetric about 0
            for signed data with a diverging map.
        threshold: voxels below it are not shown (transparent), e.g. to hide near-zero values.

    Returns:
        a ``vtkMRMLScalarVolumeNode`` whose display node uses the new colour table node.
    """
    array = require_3d(np.asarray(array, dtype=np.float32), name)
    if not np.all(np.isfinite(array)):
        raise MRMLBridgeError(f"overlay {name!r} holds NaN or infinite values; clean the map before display")
    node = volume_node_from_array(scene, array, geometry, name)
    table = color_table_node(scene, colormap, name=f"{name} colours")
    table.SetAttribute("ReCoKD.Owner", node.GetID())  # removed with the overlay (remove_node)
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(table.GetID())
    low, high = window if window is not None else _default_window(array, colormap)
    if not high > low:
        high = low + 1e-6
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(float(low), float(high))
    if threshold is not None:
        display.SetApplyThreshold(1)
        display.SetThreshold(float(threshold), float(max(high, threshold)))
    node.SetAttribute("ReCoKD.Overlay", colormap)
    return node


def set_overlay_threshold(node, fraction: float) -> None:
    """Make the weak values of an overlay transparent, so the image shows through them.

    ``fraction`` in [0, 1) of the display range: for a signed map on a diverging table (the
    teacher - student difference) values with ``|v| < fraction * max|window|`` are hidden, for
    other maps values below ``low + fraction * (high - low)``. Works on the colour table's alpha,
    so the map's values and window stay as they are; 0 shows every voxel.

    Raises:
        MRMLBridgeError: not an overlay made by :func:`overlay_volume_from_array`, or a fraction outside [0, 1).
    """
    if not 0.0 <= float(fraction) < 1.0:
        raise MRMLBridgeError(f"an overlay threshold is a fraction of the map's range in [0, 1); got {fraction}")
    display = node.GetDisplayNode() if node is not None else None
    table = display.GetColorNode() if display is not None else None
    if table is None or not table.IsA("vtkMRMLColorTableNode") or table.GetType() != table.User:
        raise MRMLBridgeError("only overlays made by ReCoKD (a user colour table) take a threshold")
    low, high = display.GetWindowLevelMin(), display.GetWindowLevelMax()
    signed = str(node.GetAttribute("ReCoKD.Overlay") or "").lower() in ("diverging", "coolwarm")
    count = table.GetNumberOfColors()
    values = np.linspace(low, high, count)
    hidden = (np.abs(values) < fraction * max(abs(low), abs(high))) if signed else (values < low + fraction * (high - low))
    if fraction == 0.0:
        hidden[:] = False
    rgba = [0.0] * 4
    for index in range(count):
        table.GetColor(index, rgba)
        table.SetColor(index, rgba[0], rgba[1], rgba[2], 0.0 if hidden[index] else 1.0)
    table.Modified()


def _default_window(array: np.ndarray, colormap: str) -> tuple[float, float]:
    low, high = float(array.min()), float(array.max())
    if colormap.lower() in ("diverging", "coolwarm"):
        bound = max(abs(low), abs(high))
        return -bound, bound
    return low, high


# --------------------------------------------------------------------------------------------
# Subject hierarchy


def place_beside(node, reference_node) -> int:
    """Put ``node`` where ``reference_node`` is: under the same parent transform, and in the same
    subject-hierarchy folder/study; returns its subject-hierarchy item id.

    A result computed on a volume's voxel grid (a segmentation, a map) holds the volume's own
    ``IJKToRAS``; when the volume sits under a (linear or not) transform, the result must observe
    the same transform node to appear where the volume is shown (Slicer:
    ``vtkMRMLTransformableNode::SetAndObserveTransformNodeID``). Nothing is hardened.

    Works in Slicer and in ``slicer-core``: there the subject-hierarchy module logic (which gives
    every new node an item automatically) is absent, so missing items are created here. Returns 0
    when the scene has no subject-hierarchy node (the transform is still set).
    """
    if hasattr(node, "SetAndObserveTransformNodeID") and hasattr(reference_node, "GetTransformNodeID"):
        node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
    scene = reference_node.GetScene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return 0
    root = hierarchy.GetSceneItemID()

    def item_of(n) -> int:
        item = hierarchy.GetItemByDataNode(n)
        return item if item else hierarchy.CreateItem(root, n)

    parent = hierarchy.GetItemParent(item_of(reference_node))
    item = item_of(node)
    hierarchy.SetItemParent(item, parent or root)
    return item


def remove_node(node) -> None:
    """Remove ``node``, its display nodes (and the colour table made for it) and its subject-hierarchy
    item from its scene.

    In Slicer the subject-hierarchy module logic drops the item of a removed node; in ``slicer-core``
    (``recokd serve``) nothing does, and the hierarchy then reports "DataNodeCache inconsistency"
    at the next change. Removing the item first (with its data node) keeps both in step. A node
    already gone, or ``None``, is left alone.
    """
    scene = node.GetScene() if node is not None else None
    if scene is None or scene.GetNodeByID(node.GetID()) is None:
        return
    displays = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] \
        if hasattr(node, "GetNumberOfDisplayNodes") else []
    for display in [d for d in displays if d is not None]:
        table = display.GetColorNode() if hasattr(display, "GetColorNode") else None
        scene.RemoveNode(display)
        if table is not None and table.GetAttribute("ReCoKD.Owner") == node.GetID():
            scene.RemoveNode(table)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = hierarchy.GetItemByDataNode(node) if hierarchy is not None else 0
    if item:  # the item first, keeping the node (removing both at once leaves the item behind)
        hierarchy.RemoveItem(item, False, True)
    scene.RemoveNode(node)


def render_window_pixels(render_window) -> np.ndarray:
    """The pixels of a rendered ``vtkRenderWindow`` ``(H, W, 3)`` uint8, top row first (a copy),
    read the way Slicer's layer displayable manager reads its views (what trame-slicer streams)."""
    from vtkmodules.util.numpy_support import vtk_to_numpy

    image = vtk.vtkImageData()
    slicer.vtkMRMLLayerDisplayableManager.RenderWindowBufferToImage(render_window, image)
    width, height, _ = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    pixels = vtk_to_numpy(scalars).reshape(height, width, scalars.GetNumberOfComponents())
    return np.ascontiguousarray(pixels[::-1, :, :3])
