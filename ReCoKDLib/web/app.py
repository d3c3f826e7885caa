"""The ``recokd serve`` web app: Slicer's own slice views in the browser (trame-slicer).

One :class:`ServeApp` holds a trame-slicer ``SlicerApp`` (its MRML scene, remote-rendered slice
views) and a :class:`~ReCoKDLib.mrml.logic.SceneLogic` on that scene, the same logic the Slicer
module's ``ReCoKDLogic`` delegates to. Page actions:

* **Load** a volume from a path on the server or an upload from the browser
  (:func:`ReCoKDLib.data.io.read_image`: NIfTI, NRRD, MHA, a DICOM folder path);
* **Segment** with the chosen model (files and folders from the command line, teacher presets);
  inference runs in a worker thread, progress events of :mod:`ReCoKDLib.progress` drive the bar,
  and MRML nodes are created back on the event loop;
* sliders for segment fill, outline and overlay opacity;
* **Inspect**: teacher and student, level, class, and a teacher / student / difference map as a
  foreground overlay (maps computed in the worker, cached per volume and model pair);
* **Download** the segmentation as ``.seg.nrrd``.

Errors (an unreadable file, a model that does not fit, teacher and student with different
classes) are shown in the page; the server keeps running.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Sequence

from trame.app import TrameApp, asynchronous
from trame.app.file_upload import ClientFile
from trame.ui.vuetify3 import SinglePageWithDrawerLayout
from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

from ReCoKDLib import mrml
from ReCoKDLib.data.io import read_image
from ReCoKDLib.inspection import MAP_CHOICES
from ReCoKDLib.mrml.logic import ModelCache, SceneLogic, class_key
from ReCoKDLib.mrml.views import ensure_background_layer_first  # the blending fix, in one place
from ReCoKDLib.progress import Reporter
from ReCoKDLib.web.catalogue import ModelChoice

__all__ = ["ServeApp", "INSPECT_MAPS"]

log = logging.getLogger("recokd.serve")

#: overlays the Inspect panel offers (the region mask is a segmentation, shown by the Slicer module)
INSPECT_MAPS = tuple(m for m in MAP_CHOICES if m != "region mask")
#: suffixes kept for uploads (the reader chooses the format from the name)
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def _remove_node(scene, node) -> None:
    if node is None or scene.GetNodeByID(node.GetID()) is None:
        return
    for i in range(node.GetNumberOfDisplayNodes()):
        display = node.GetNthDisplayNode(i)
        if display is not None:
            scene.RemoveNode(display)
    scene.RemoveNode(node)


class ServeApp(TrameApp):
    """The page and its actions (see the module docstring).

    Args:
        models: the picker's entries (:func:`ReCoKDLib.web.catalogue.find_models`).
        image: a volume to load at start (optional).
        views: 1 (axial) or 3 (axial, coronal, sagittal) slice views.
        device: where models run (``auto``, ``cpu``, ``cuda``).
        encoder: the remote view encoder (``png`` or ``jpeg``).
    """

    def __init__(self, server=None, models: Sequence[ModelChoice] = (), image: str | None = None, views: int = 1,
                 device: str = "auto", encoder: str = "jpeg"):
        super().__init__(server)
        self.device = device
        self.choices = list(models)
        self.slicer = SlicerApp()
        self.scene = self.slicer.scene
        self.logic = SceneLogic(self.scene, ModelCache(size=2))
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recokd-serve")
        self.volume = self.segmentation = self.overlay = None
        self._maps_key, self._maps = None, None
        self._fitted = set()

        register_rca_factories(self.slicer.view_manager, self.server, rca_encoder=encoder)
        self.layouts = LayoutManager(self.scene, self.slicer.view_manager, self.server)
        definitions = [ViewLayoutDefinition.axial_view()]
        if views >= 3:
            definitions += [ViewLayoutDefinition.coronal_view(), ViewLayoutDefinition.sagittal_view()]
        direction = LayoutDirection.Horizontal if len(definitions) > 1 else LayoutDirection.Vertical
        self.layouts.register_layout_dict({"views": Layout(direction, definitions)})
        self.layouts.set_layout("views")
        self.views = [self.slicer.view_manager.get_view(d.singleton_tag) for d in definitions]
        for view in self.views:
            ensure_background_layer_first(view)  # before any segmentation exists, so fills blend over the image
            view.render_window().AddObserver("WindowResizeEvent", partial(self._fit_once, view))

        items = [c.as_item() for c in self.choices]
        first = items[0]["value"] if items else None
        self.state.update(dict(
            image_path=image or "", upload=None, status="Load a volume to begin.", error="", busy=False,
            progress=0, progress_known=False, models=items, model=first, model_info="",
            fill_opacity=0.5, outline_opacity=1.0, overlay_opacity=0.5, has_result=False, has_volume=False,
            teacher=first, student=items[1]["value"] if len(items) > 1 else first, level=0, inspect_class="",
            classes=[], map_choice="difference", map_choices=list(INSPECT_MAPS),
        ))
        self.state.change("fill_opacity", "outline_opacity")(self._on_segment_opacity)
        self.state.change("overlay_opacity")(self._on_overlay_opacity)
        self.state.change("upload")(self._on_upload)
        self.state.change("model")(self._on_model)
        self.state.change("teacher")(self._on_teacher)
        self._build_ui()
        if first:
            self._on_model(first)
            self._on_teacher(first)
        if image:
            self.load_path(image)

    # -- page ------------------------------------------------------------------------------------

    def _build_ui(self) -> None:
        download = self.server.controller.trigger_name(self.download_segmentation)
        with SinglePageWithDrawerLayout(self.server) as self.ui:
            self.ui.title.set_text("ReCoKD")
            with self.ui.drawer, v3.VContainer(classes="pa-2"):
                html.Div("Volume", classes="text-subtitle-2")
                v3.VTextField(v_model=("image_path",), label="Path on the server", density="compact",
                              hide_details=True, id="image_path")
                v3.VBtn("Load", click=self.load_from_state, id="load", block=True, classes="my-1",
                        disabled=("busy",))
                v3.VFileInput(v_model=("upload",), label="or upload a file", density="compact", hide_details=True,
                              id="upload", disabled=("busy",))
                v3.VDivider(classes="my-2")
                html.Div("Segment", classes="text-subtitle-2")
                v3.VSelect(v_model=("model",), items=("models",), label="Model", density="compact",
                           hide_details=True, id="model")
                html.Div("{{ model_info }}", style="font-size: 0.75rem; white-space: pre-wrap;", id="model_info")
                v3.VBtn("Segment", click=self.segment, id="segment", block=True, color="primary", classes="my-1",
                        disabled=("busy || !has_volume",))
                v3.VProgressLinear(model_value=("progress",), indeterminate=("busy && !progress_known",),
                                   active=("busy",), id="progress")
                html.Div("Segment fill {{ fill_opacity }}")
                v3.VSlider(v_model=("fill_opacity",), min=0, max=1, step=0.05, hide_details=True, id="fill_opacity")
                html.Div("Segment outline {{ outline_opacity }}")
                v3.VSlider(v_model=("outline_opacity",), min=0, max=1, step=0.05, hide_details=True,
                           id="outline_opacity")
                html.Div("Overlay opacity {{ overlay_opacity }}")
                v3.VSlider(v_model=("overlay_opacity",), min=0, max=1, step=0.05, hide_details=True,
                           id="overlay_opacity")
                v3.VBtn("Download .seg.nrrd", id="download", block=True, classes="my-1",
                        disabled=("!has_result",),
                        click=f"utils.download('segmentation.seg.nrrd', trigger('{download}'), "
                              "'application/octet-stream')")
                v3.VDivider(classes="my-2")
                html.Div("Inspect", classes="text-subtitle-2")
                v3.VSelect(v_model=("teacher",), items=("models",), label="Teacher", density="compact",
                           hide_details=True, id="teacher")
                v3.VSelect(v_model=("student",), items=("models",), label="Student", density="compact",
                           hide_details=True, id="student")
                v3.VTextField(v_model_number=("level",), type="number", label="Level", density="compact",
                              hide_details=True, id="level")
                v3.VSelect(v_model=("inspect_class",), items=("classes",), label="Class (region maps)",
                           density="compact", hide_details=True, clearable=True, id="inspect_class")
                v3.VSelect(v_model=("map_choice",), items=("map_choices",), label="Map", density="compact",
                           hide_details=True, id="map_choice")
                v3.VBtn("Show map", click=self.inspect, id="inspect", block=True, classes="my-1",
                        disabled=("busy || !has_volume",))
                v3.VAlert(v_if=("error",), type="error", text=("error",), density="compact", id="error",
                          classes="my-1")
                html.Div("{{ status }}", id="status", style="font-size: 0.85rem;")
            with self.ui.content, html.Div(style="width: 100%; height: calc(100vh - 64px);"):
                self.layouts.initialize_layout_grid(self.ui)

    def _fit_once(self, view, *_):
        """The real view size arrives from the browser after the first frame: fit again once."""
        if self.volume is not None and id(view) not in self._fitted:
            self._fitted.add(id(view))
            view.fit_view_to_content()

    def _report(self, **values) -> None:
        with self.state:
            self.state.update(values)

    def _fail(self, exc: BaseException, what: str) -> None:
        if isinstance(exc, (ValueError, OSError)):
            message = f"{what}: {exc}"
        else:  # a bug: keep the server running, say so, log the traceback
            log.exception("%s", what)
            message = f"{what}: unexpected {type(exc).__name__}: {exc} (see the server log)"
        self._report(error=message, status="", busy=False)

    def _render(self) -> None:
        for view in self.views:
            view.schedule_render()

    # -- volume ----------------------------------------------------------------------------------

    def load_from_state(self) -> None:
        self.load_path(self.state.image_path)

    def load_path(self, path: str, name: str | None = None) -> bool:
        """Read an image file (or DICOM folder) and show it in every view; True when loaded."""
        try:
            text = str(path or "").strip()
            if not text:
                raise ValueError("type the path of a NIfTI, NRRD or MHA file (or a DICOM folder) on the server")
            array, geometry = read_image(text, allow_channels=False)
            self._show_volume(mrml.volume_node_from_array(self.scene, array, geometry, name or Path(text).name))
        except Exception as exc:  # noqa: BLE001 - every failure is shown in the page
            self._fail(exc, f"Could not load {name or path}")
            return False
        return True

    def _on_upload(self, upload=None, **_):
        if not upload:
            return
        item = upload[0] if isinstance(upload, list) else upload
        file = ClientFile(item)
        if file.is_empty:
            return
        name = Path(file.name or "upload.nii.gz").name
        suffix = next((s for s in UPLOAD_SUFFIXES if name.lower().endswith(s)), None)
        if suffix is None:
            self._report(error=f"Could not load {name}: upload a NIfTI (.nii, .nii.gz), NRRD (.nrrd) or MHA (.mha) "
                               "file", status="")
            return
        with tempfile.TemporaryDirectory(prefix="recokd-upload-") as folder:
            path = Path(folder) / f"upload{suffix}"
            path.write_bytes(file.content)
            self.load_path(str(path), name=name)

    def _show_volume(self, node) -> None:
        for old in (self.overlay, self.segmentation, self.volume):
            _remove_node(self.scene, old)
        self.volume, self.segmentation, self.overlay = node, None, None
        self._maps_key = self._maps = None
        self._fitted.clear()
        for view in self.views:
            view.set_foreground_volume_id(None)
            view.set_background_volume_id(node.GetID())
            view.fit_view_to_content()
        self._render()
        shape = "x".join(str(n) for n in reversed(node.GetImageData().GetDimensions()))
        self._report(has_volume=True, has_result=False, error="", progress=0,
                     status=f"Loaded {node.GetName()} ({shape} voxels).")

    # -- segmentation ----------------------------------------------------------------------------

    def _on_model(self, model=None, **_):
        from ReCoKDLib.mrml.logic import describe_model_source

        try:
            info = describe_model_source(model) if model else "No model: start recokd serve with --model PATH."
        except ValueError as exc:
            info = str(exc)
        self._report(model_info=info)

    def _on_teacher(self, teacher=None, **_):
        classes = []
        if teacher and not str(teacher).startswith("preset:") and Path(str(teacher)).is_file():
            try:
                from ReCoKDLib.checkpoint import read_model_card

                classes = list(read_model_card(teacher).classes[1:])
            except ValueError:
                classes = []
        self._report(classes=classes, inspect_class="")

    def _progress_callback(self, loop):
        def on_event(record: dict) -> None:  # called in the worker: hand over to the loop
            loop.call_soon_threadsafe(self._on_progress, record)
        return on_event

    def _on_progress(self, record: dict) -> None:
        event, total = record.get("event"), record.get("total")
        if event == "progress" and total:
            self._report(progress=round(100.0 * record.get("step", 0) / total), progress_known=True,
                         status=f"{record.get('stage')}: {record.get('step')}/{total}")
        elif event in ("start", "log") and record.get("message"):
            self._report(status=f"{record.get('stage')}: {record['message']}")

    def segment(self) -> None:
        asynchronous.create_task(self.run_segment())

    async def run_segment(self):
        """Segment the loaded volume with the chosen model off the loop; the node is made here."""
        if self.state.busy:
            return None
        model = self.state.model
        try:
            if self.volume is None:
                raise ValueError("load a volume first")
            if not model:
                raise ValueError("no model to segment with: start recokd serve with --model PATH")
            data = self.logic.read_volume(self.volume)
            self._report(busy=True, error="", progress=0, progress_known=False, status="Loading the model...")
            loop = asyncio.get_running_loop()
            reporter = Reporter(self._progress_callback(loop))
            output = await loop.run_in_executor(
                self.executor, partial(self.logic.run_segmentation, data, model, self.device, reporter))
            if self.volume is None or self.volume.GetID() != data.node_id:
                raise ValueError("the volume changed while segmenting; segment again")
            _remove_node(self.scene, self.segmentation)
            self.segmentation = self.logic.add_segmentation(self.volume, output)
            self._apply_segment_opacity()
            segments = self.segmentation.GetSegmentation().GetNumberOfSegments()
            self._report(busy=False, progress=100, has_result=True,
                         status=f"Segmented in {output.seconds:.1f} s: {segments} segment(s).")
            return self.segmentation
        except Exception as exc:  # noqa: BLE001 - shown in the page, the server goes on
            self._fail(exc, "Segmentation failed")
            return None
        finally:
            self._render()

    def _apply_segment_opacity(self) -> None:
        if self.segmentation is None:
            return
        display = self.segmentation.GetDisplayNode()
        display.SetOpacity2DFill(float(self.state.fill_opacity))
        display.SetOpacity2DOutline(float(self.state.outline_opacity))
        self._render()

    def _on_segment_opacity(self, **_):
        self._apply_segment_opacity()

    def _on_overlay_opacity(self, overlay_opacity=0.5, **_):
        for view in self.views:
            view.set_foreground_opacity(float(overlay_opacity))
        self._render()

    def download_segmentation(self):
        """The result as ``.seg.nrrd`` bytes for the browser (a trame attachment)."""
        if self.segmentation is None:
            self._report(error="Nothing to download: segment a volume first.")
            return None
        try:
            with tempfile.TemporaryDirectory(prefix="recokd-download-") as folder:
                path = self.logic.export_segmentation(self.segmentation, Path(folder) / "segmentation.seg.nrrd")
                data = path.read_bytes()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, "Export failed")
            return None
        return self.server.protocol.addAttachment(data)

    # -- inspection ------------------------------------------------------------------------------

    def inspect(self) -> None:
        asynchronous.create_task(self.run_inspect())

    async def run_inspect(self):
        """Compute (or reuse) the maps of teacher and student off the loop; show the chosen one."""
        if self.state.busy:
            return None
        teacher, student = self.state.teacher, self.state.student
        try:
            if self.volume is None:
                raise ValueError("load a volume first")
            if not teacher or not student:
                raise ValueError("choose a teacher and a student")
            level = int(self.state.level or 0)
            key = (self.volume.GetID(), teacher, student)
            if self._maps_key != key:
                data = self.logic.read_volume(self.volume)
                self._report(busy=True, error="", progress_known=False, status="Computing the maps...")
                loop = asyncio.get_running_loop()
                self._maps = await loop.run_in_executor(
                    self.executor, partial(self.logic.run_maps, data, teacher, student, None, None, self.device))
                self._maps_key = key
            classes = list(self.state.classes or [])
            class_id = class_key(["background", *classes], self.state.inspect_class or "")
            _remove_node(self.scene, self.overlay)
            self.overlay = None
            self.overlay = self.logic.add_overlay(self.volume, self._maps, level, self.state.map_choice, class_id)
            for view in self.views:
                view.set_foreground_volume_id(self.overlay.GetID())
                view.set_foreground_opacity(float(self.state.overlay_opacity))
            self._report(busy=False, status=f"Showing {self.state.map_choice} at level {level}.")
            return self.overlay
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, "Inspection failed")
            return None
        finally:
            self._render()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
