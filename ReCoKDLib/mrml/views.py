"""Slicer's own slice and 3D views, rendered offscreen to PNG (the ``render`` extra).

The pictures come from Slicer's C++ pipeline, driven by Kitware's ``trame-slicer``
(``SlicerApp`` + ``DirectViewFactory(do_render_offscreen=True)``, EGL/Mesa, no display):
``vtkMRMLSliceLogic`` reslices each layer, the volume display nodes apply window/level, colour
table and threshold, the layer logic blends the foreground over the background with the
foreground opacity, and the 2D segmentation displayable manager draws each segment's fill and
outline in its colour. A PNG written here is therefore what the ReCoKD Slicer module shows.

Scenes are built with the MRML bridge (:mod:`ReCoKDLib.mrml`), so geometry is exact and segments
keep their class names and colours.

Pixel arrays are ``(H, W, 3)`` ``uint8``, top row first (as the PNG). Rendering is deterministic:
the same scene, size and slice positions give byte-identical images.

Example::

    from ReCoKDLib.mrml.views import OffscreenViews

    with OffscreenViews(size=(512, 512)) as views:
        views.show_volume(ct, geometry, window_level=(400, 40))
        views.show_segmentation(labels, geometry, class_names)
        views.show_overlay(affinity, geometry, "teacher affinity", colormap="Viridis", threshold=0.05)
        views.focus_on_labels(labels, geometry)
        paths = views.render_slices("pngs/", prefix="case1_")  # {"axial": Path, ...}

The one known trame-slicer pitfall (a segmentation added before the slice image actor exists is
drawn over black, not blended; VTK 9.6 actor order) is handled by
:func:`ensure_background_layer_first`, which every view created here goes through; other code
that creates slice views (``recokd serve``) must call it too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ReCoKDLib.data.io import Geometry

__all__ = [
    "RenderError",
    "SLICE_ORIENTATIONS",
    "require_render_extra",
    "ensure_background_layer_first",
    "grab",
    "encode_png",
    "write_png",
    "hstack_images",
    "OffscreenViews",
    "render_segmentation_pngs",
    "render_overlay_png",
]

#: orientations of the slice views, in Slicer's naming
SLICE_ORIENTATIONS = ("axial", "coronal", "sagittal")

#: default 2D segment display: fill opacity and outline opacity (Slicer's defaults are 0.5 / 1)
DEFAULT_FILL = 0.35
DEFAULT_OUTLINE = 1.0


class RenderError(ValueError):
    """The offscreen views cannot render as asked (missing extra, bad option, nothing to show)."""


def require_render_extra():
    """Import trame-slicer lazily; return ``(SlicerApp, DirectViewFactory, ViewLayoutDefinition)``.

    Also selects the EGL render window (``VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow``, kept
    when already set) so no X display is needed.

    Raises:
        RenderError: trame-slicer / slicer-core are not installed, naming the extra to install.
    """
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    try:
        from trame_slicer.core import SlicerApp
        from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RenderError(
            f"offscreen Slicer rendering needs the 'render' extra (trame-slicer[standalone], slicer-core, "
            f"vtk==9.6.0): pip install -e '.[render]' ({exc})"
        ) from exc
    return SlicerApp, DirectViewFactory, ViewLayoutDefinition


# --------------------------------------------------------------------------------------------
# View-level helpers (also used by `recokd serve` on its web views)


def ensure_background_layer_first(view) -> None:
    """Put a slice view's image actor first in its renderer, so segment fills blend over it.

    trame-slicer's ``SliceView`` adds the slice image ``vtkActor2D`` to the renderer lazily, when
    the first volume is connected. Segmentation actors created before that come first in the prop
    list, and VTK 9.6 then draws the image over them: fills appear as ``opacity * colour`` over
    black instead of ``opacity * colour + (1 - opacity) * image``. Call this right after a slice
    view is created (idempotent; also repairs a view whose actors are already out of order).
    3D views are left untouched.
    """
    manager = getattr(view, "_render_manager", None)
    actor = getattr(manager, "image_actor", None)
    if actor is None:  # a 3D view, or a trame-slicer without the lazy image actor
        return
    renderer = view.first_renderer()
    props = renderer.GetViewProps()
    ordered = [props.GetItemAsObject(i) for i in range(props.GetNumberOfItems())]
    if ordered and ordered[0] is actor:
        return
    if not ordered:
        actor.SetVisibility(False)  # no image yet: SetImageDataConnection makes it visible
        renderer.AddViewProp(actor)
        return
    renderer.RemoveAllViewProps()
    renderer.AddViewProp(actor)
    for prop in ordered:
        if prop is not actor:
            renderer.AddViewProp(prop)
    if not actor.GetMapper().GetNumberOfInputConnections(0):
        actor.SetVisibility(False)


def grab(view) -> np.ndarray:
    """Render ``view`` and return its pixels ``(H, W, 3)`` uint8, top row first (a copy)."""
    from ReCoKDLib.mrml import render_window_pixels

    view.render()
    return render_window_pixels(view.render_window())


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of ``(H, W, 3|4)`` uint8 pixels, top row first (VTK's lossless PNG writer)."""
    from vtkmodules.util.numpy_support import numpy_to_vtk
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkIOImage import vtkPNGWriter

    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise RenderError(f"expected (H, W, 3|4) uint8 pixels; got {pixels.shape} {pixels.dtype}")
    height, width, components = pixels.shape
    image = vtkImageData()
    image.SetDimensions(width, height, 1)
    flat = np.ascontiguousarray(pixels[::-1]).reshape(-1, components)  # VTK rows run bottom-up
    image.GetPointData().SetScalars(numpy_to_vtk(flat, deep=True))
    writer = vtkPNGWriter()
    writer.SetWriteToMemory(True)
    writer.SetInputData(image)
    writer.Write()
    from vtkmodules.util.numpy_support import vtk_to_numpy

    return vtk_to_numpy(writer.GetResult()).tobytes()


def write_png(pixels: np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``(H, W, 3|4)`` uint8 pixels to ``path`` atomically; returns the path."""
    from ReCoKDLib.checkpoint import atomic_write_bytes

    return atomic_write_bytes(Path(path), encode_png(pixels))


def hstack_images(images: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """Put ``(H, W, 3)`` images side by side on black, top-aligned, ``gap`` pixels apart."""
    if not images:
        raise RenderError("no image to put side by side")
    height = max(i.shape[0] for i in images)
    width = sum(i.shape[1] for i in images) + gap * (len(images) - 1)
    out = np.zeros((height, width, 3), dtype=np.uint8)
    x = 0
    for image in images:
        out[: image.shape[0], x: x + image.shape[1]] = image[..., :3]
        x += image.shape[1] + gap
    return out


def _ras_of_voxel(geometry: Geometry, kji: Sequence[float]) -> np.ndarray:
    k, j, i = (float(v) for v in kji)
    return (geometry.ijk_to_ras() @ np.array([i, j, k, 1.0]))[:3]


def _require_size(size: Sequence[int]) -> tuple[int, int]:
    try:
        width, height = (int(s) for s in size)
    except (TypeError, ValueError):
        raise RenderError(f"size must be (width, height) in pixels; got {size!r}") from None
    if width < 16 or height < 16 or width > 4096 or height > 4096:
        raise RenderError(f"size must be between 16 and 4096 pixels per side; got {width}x{height}")
    return width, height


# --------------------------------------------------------------------------------------------
# The offscreen scene


class OffscreenViews:
    """A ``SlicerApp`` (its own MRML scene) with offscreen slice views and, optionally, a 3D view.

    Args:
        size: ``(width, height)`` of every view in pixels.
        orientations: slice views to create, from :data:`SLICE_ORIENTATIONS`.
        threed: also create a 3D view (segments as closed surfaces).

    Use it as a context manager (or call :meth:`close`); nodes are added with ``show_*`` and
    removed with :meth:`clear`. All views show the same background, foreground and segmentations.
    """

    def __init__(self, size: Sequence[int] = (512, 512), orientations: Iterable[str] = SLICE_ORIENTATIONS,
                 threed: bool = False):
        width, height = _require_size(size)
        orientations = [str(o).lower() for o in orientations]
        unknown = [o for o in orientations if o not in SLICE_ORIENTATIONS]
        if unknown or not orientations and not threed:
            raise RenderError(f"orientations must be among {SLICE_ORIENTATIONS} (at least one view); got {orientations}")
        SlicerApp, DirectViewFactory, ViewLayoutDefinition = require_render_extra()
        from trame_slicer.views.render_scheduler import NoScheduleRendering

        self.app = SlicerApp()
        self.app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
        self.size = (width, height)
        self.slice_views = {}
        for orientation in orientations:
            view = self.app.view_manager.create_view(ViewLayoutDefinition.slice_view(orientation.capitalize()))
            view.set_scheduled_render(NoScheduleRendering())  # render only when a picture is taken
            ensure_background_layer_first(view)
            view.update_size(width, height)
            self.slice_views[orientation] = view
        self.threed_view = None
        if threed:
            self.threed_view = self.app.view_manager.create_view(ViewLayoutDefinition.threed_view())
            self.threed_view.set_scheduled_render(NoScheduleRendering())
            view_node = self.threed_view.get_view_node()
            view_node.SetBoxVisible(False)  # the segments alone, as a clean picture
            view_node.SetAxisLabelsVisible(False)
            self.threed_view.update_size(width, height)
        self.background = None
        self.foreground = None
        self.segmentations: list = []

    # -- lifetime ------------------------------------------------------------------------------

    @property
    def scene(self):
        """The ``vtkMRMLScene`` the views show (pass it to :mod:`ReCoKDLib.mrml` functions)."""
        return self.app.scene

    def __enter__(self) -> "OffscreenViews":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def clear(self) -> None:
        """Remove every volume and segmentation shown (the views stay, ready for a new scene)."""
        for view in self.slice_views.values():
            view.set_foreground_volume_id(None)
            view.set_background_volume_id(None)
        for node in [self.background, self.foreground, *self.segmentations]:
            if node is not None and node.GetScene() is not None:
                self._remove(node)
        self.background, self.foreground, self.segmentations = None, None, []

    def close(self) -> None:
        """Release the views' render windows."""
        for view in [*self.slice_views.values(), self.threed_view]:
            if view is not None:
                view.render_window().Finalize()
        self.slice_views, self.threed_view = {}, None

    def _remove(self, node) -> None:
        color = node.GetDisplayNode().GetColorNode() if node.GetDisplayNode() is not None else None
        for i in range(node.GetNumberOfDisplayNodes()):
            self.scene.RemoveNode(node.GetNthDisplayNode(i))
        for i in range(node.GetNumberOfStorageNodes()):
            self.scene.RemoveNode(node.GetNthStorageNode(i))
        if color is not None and color.GetName().endswith(" colours"):
            self.scene.RemoveNode(color)
        self.scene.RemoveNode(node)

    # -- what is shown -------------------------------------------------------------------------

    def show_volume(self, array: np.ndarray, geometry: Geometry, name: str = "image",
                    window_level: tuple[float, float] | None = None):
        """Show ``array`` ``(D, H, W)`` as the background of every slice view; returns its node.

        Args:
            window_level: ``(window, level)`` in the image's units (e.g. ``(400, 40)`` for
                abdominal CT); default the 1st-99th percentile range of the volume.
        """
        from ReCoKDLib import mrml

        node = mrml.volume_node_from_array(self.scene, array, geometry, name)
        display = node.GetDisplayNode()
        display.AutoWindowLevelOff()
        if window_level is None:
            low, high = (float(v) for v in np.percentile(np.asarray(array, dtype=np.float32), [1, 99]))
            window_level = (max(high - low, 1e-6), (high + low) / 2)
        window, level = (float(v) for v in window_level)
        if not window > 0:
            raise RenderError(f"window must be positive; got {window}")
        display.SetWindowLevel(window, level)
        display.SetInterpolate(False)
        if self.background is not None:
            self._remove(self.background)
        self.background = node
        for view in self.slice_views.values():
            view.set_background_volume_id(node.GetID())
        self.fit()
        return node

    def show_segmentation(self, labels: np.ndarray, geometry: Geometry, class_names: Sequence[str],
                          colors: Sequence[Sequence[float]] | None = None, name: str = "segmentation",
                          fill: float = DEFAULT_FILL, outline: float = DEFAULT_OUTLINE, in_3d: bool = True):
        """Show a label map as a segmentation (one segment per class present); returns its node.

        Args:
            labels: ``(D, H, W)`` class ids on ``geometry``; class_names/colors: by class id
                (see :func:`ReCoKDLib.mrml.segmentation_node_from_labelmap`).
            fill, outline: 2D fill and outline opacity in [0, 1] (0 hides that part).
            in_3d: build closed surfaces for the 3D view (when there is one).
        """
        from ReCoKDLib import mrml

        reference = self.background
        node = mrml.segmentation_node_from_labelmap(self.scene, labels, geometry, class_names, colors=colors,
                                                    name=name, reference_volume=reference)
        self.segmentations.append(node)
        self.set_segmentation_opacity(fill, outline, node)
        if self.threed_view is not None and in_3d:
            node.CreateClosedSurfaceRepresentation()
            node.GetDisplayNode().SetVisibility3D(True)
        return node

    def set_segmentation_opacity(self, fill: float, outline: float | None = None, node=None) -> None:
        """2D fill (and outline) opacity of ``node`` (default: every segmentation shown)."""
        for value in (fill, outline):
            if value is not None and not 0.0 <= float(value) <= 1.0:
                raise RenderError(f"segmentation opacity must be in [0, 1]; got {value}")
        for seg in [node] if node is not None else self.segmentations:
            display = seg.GetDisplayNode()
            display.SetVisibility2DFill(float(fill) > 0)
            display.SetOpacity2DFill(float(fill))
            if outline is not None:
                display.SetVisibility2DOutline(float(outline) > 0)
                display.SetOpacity2DOutline(float(outline))

    def show_overlay(self, array: np.ndarray, geometry: Geometry, name: str = "overlay", colormap: str = "Viridis",
                     window: tuple[float, float] | None = None, threshold: float | None = None,
                     opacity: float = 0.5):
        """Show a map ``(D, H, W)`` in the foreground layer of every slice view; returns its node.

        Args:
            colormap, window, threshold: see :func:`ReCoKDLib.mrml.overlay_volume_from_array`;
                voxels below ``threshold`` are transparent (the image shows through).
            opacity: foreground opacity in [0, 1] (Slicer's foreground slider).
        """
        from ReCoKDLib import mrml

        node = mrml.overlay_volume_from_array(self.scene, array, geometry, name, colormap=colormap, window=window,
                                              threshold=threshold)
        node.GetDisplayNode().SetInterpolate(False)
        if self.foreground is not None:
            self._remove(self.foreground)
        self.foreground = node
        for view in self.slice_views.values():
            view.set_foreground_volume_id(node.GetID())
        self.set_overlay_opacity(opacity)
        return node

    def set_overlay_opacity(self, opacity: float) -> None:
        """Foreground (overlay) opacity of every slice view, in [0, 1]."""
        if not 0.0 <= float(opacity) <= 1.0:
            raise RenderError(f"overlay opacity must be in [0, 1]; got {opacity}")
        for view in self.slice_views.values():
            view.set_foreground_opacity(float(opacity))

    # -- where the views look ------------------------------------------------------------------

    def fit(self) -> None:
        """Fit every view to the background volume (slice views) or the scene (3D)."""
        for view in self.slice_views.values():
            view.fit_view_to_content()
        if self.threed_view is not None:
            self.threed_view.renderer().ResetCamera()

    def focus_on(self, ras: Sequence[float]) -> None:
        """Move every slice view so it passes through the RAS point ``ras`` (mm)."""
        r, a, s = (float(v) for v in ras)
        for view in self.slice_views.values():
            view.get_view_node().JumpSliceByOffsetting(r, a, s)

    def focus_on_voxel(self, kji: Sequence[float], geometry: Geometry) -> None:
        """Move every slice view through voxel ``(k, j, i)`` of an array on ``geometry``."""
        self.focus_on(_ras_of_voxel(geometry, kji))

    def focus_on_labels(self, labels: np.ndarray, geometry: Geometry) -> None:
        """Look through the centre of mass of ``labels > 0`` (the volume centre when empty)."""
        labels = np.asarray(labels)
        foreground = np.argwhere(labels > 0)
        centre = foreground.mean(axis=0) if len(foreground) else (np.array(labels.shape) - 1) / 2.0
        self.focus_on_voxel(np.round(centre), geometry)

    # -- pictures ------------------------------------------------------------------------------

    def render(self, orientation: str = "axial") -> np.ndarray:
        """Pixels ``(H, W, 3)`` uint8 of one slice view (``"3d"`` for the 3D view)."""
        if orientation == "3d":
            return self.render_3d()
        view = self.slice_views.get(str(orientation).lower())
        if view is None:
            raise RenderError(f"no {orientation!r} view; this OffscreenViews has {list(self.slice_views)}")
        return grab(view)

    def render_3d(self, direction: str = "anterior") -> np.ndarray:
        """Pixels ``(H, W, 3)`` of the 3D view (segments as closed surfaces), seen from ``direction``."""
        if self.threed_view is None:
            raise RenderError("this OffscreenViews has no 3D view; create it with threed=True")
        from trame_slicer.views.threed_view import ViewDirection

        try:
            where = ViewDirection[str(direction).upper()]
        except KeyError:
            raise RenderError(f"unknown 3D direction {direction!r}; choose one of "
                              f"{[d.name.lower() for d in ViewDirection]}") from None
        self.threed_view.rotate_to_view_direction(where)
        self.threed_view.renderer().ResetCamera()
        return grab(self.threed_view)

    def render_slices(self, out_dir: str | os.PathLike, prefix: str = "",
                      with_3d: bool | None = None) -> dict[str, Path]:
        """Write ``<prefix><orientation>.png`` per slice view (and ``<prefix>3d.png``) in ``out_dir``.

        Returns:
            ``{orientation: path}`` (``"3d"`` included when there is a 3D view and ``with_3d``
            is not False).
        """
        out_dir = Path(out_dir)
        paths = {o: write_png(self.render(o), out_dir / f"{prefix}{o}.png") for o in self.slice_views}
        if self.threed_view is not None and with_3d is not False:
            paths["3d"] = write_png(self.render_3d(), out_dir / f"{prefix}3d.png")
        return paths


# --------------------------------------------------------------------------------------------
# One-call pictures for commands and reports


def render_segmentation_pngs(image: np.ndarray, geometry: Geometry, labels: np.ndarray, class_names: Sequence[str],
                             out_dir: str | os.PathLike, prefix: str = "", size: Sequence[int] = (512, 512),
                             window_level: tuple[float, float] | None = None, with_3d: bool = True,
                             overlay: np.ndarray | None = None, overlay_name: str = "overlay",
                             colormap: str = "Viridis", threshold: float | None = None,
                             overlay_opacity: float = 0.5) -> dict[str, Path]:
    """Axial, coronal, sagittal (and 3D) PNGs of ``image`` with its segmentation ``labels``.

    Args:
        image: ``(D, H, W)`` (or ``(C, D, H, W)``: the first channel is shown); labels: ``(D, H, W)``
            class ids on the same grid; class_names: by class id, background first.
        overlay: an optional ``(D, H, W)`` map on the same grid in the foreground layer.

    Returns:
        ``{"axial"|"coronal"|"sagittal"|"3d": path}``; the slices pass through the centre of the
        segmented voxels.
    """
    image = np.asarray(image)
    if image.ndim == 4:
        image = image[0]
    if np.asarray(labels).shape != image.shape:
        raise RenderError(f"labels {np.asarray(labels).shape} are not on the image grid {image.shape}")
    with OffscreenViews(size=size, threed=with_3d and bool(np.any(labels))) as views:
        views.show_volume(image, geometry, window_level=window_level)
        views.show_segmentation(labels, geometry, class_names)
        if overlay is not None:
            views.show_overlay(overlay, geometry, overlay_name, colormap=colormap, threshold=threshold,
                               opacity=overlay_opacity)
        views.focus_on_labels(labels, geometry)
        return views.render_slices(out_dir, prefix=prefix)


def render_overlay_png(image: np.ndarray, geometry: Geometry, prediction: np.ndarray, label: np.ndarray | None,
                       class_names: Sequence[str], size: Sequence[int] = (320, 320),
                       views: OffscreenViews | None = None) -> bytes:
    """One PNG (axial | coronal | sagittal) of ``prediction`` filled and ``label`` outlined.

    The evaluation report's picture: both are segmentations with the same class colours, the
    prediction drawn as a fill, the reference as an outline. ``views`` reuses an existing
    :class:`OffscreenViews` (its scene is cleared first), else a new one is made and closed.
    """
    own = views is None
    views = views or OffscreenViews(size=size)
    try:
        views.clear()
        image = np.asarray(image)
        image = image[0] if image.ndim == 4 else image
        views.show_volume(image, geometry)
        views.show_segmentation(prediction, geometry, class_names, name="prediction", fill=0.45, outline=0.0)
        if label is not None:
            views.show_segmentation(label, geometry, class_names, name="reference", fill=0.0, outline=1.0)
        views.focus_on_labels(label if label is not None and np.any(label) else prediction, geometry)
        return encode_png(hstack_images([views.render(o) for o in views.slice_views]))
    finally:
        if own:
            views.close()
