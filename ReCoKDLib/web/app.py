"""The ``recokd serve`` web app: Slicer's own slice views in the browser (trame-slicer).

One :class:`ServeApp` holds a trame-slicer ``SlicerApp`` (its MRML scene, remote-rendered slice
views) and a :class:`~ReCoKDLib.mrml.logic.SceneLogic` on that scene, the same logic the Slicer
module's ``ReCoKDLogic`` delegates to. Page actions:

* **Load** a volume from a path on the server (a file or a DICOM series folder) or an upload
  (an image file, a DICOM series as its files or a ``.zip``; :mod:`ReCoKDLib.web.uploads`), with
  window/level presets (CT abdomen, brain, bone; MR auto);
* **Segment** with the chosen model (titled from its model card, :mod:`ReCoKDLib.web.catalogue`);
  inference runs in a worker thread, progress events of :mod:`ReCoKDLib.progress` drive the bar,
  and MRML nodes are created back on the event loop;
* sliders for segment fill, outline and overlay opacity, and an overlay threshold (weak values
  transparent);
* **Inspect**: an explicitly chosen teacher and student (a pair of different classes is refused),
  a level among those the maps have, a class, and a teacher / student / difference map as a
  foreground overlay (maps computed in the worker, cached per volume and model pair);
* **Download** the segmentation as ``.seg.nrrd``, or as a DICOM SEG for a volume read from DICOM.

Errors (an unreadable file, a model that does not fit, a pair that does not belong together) are
shown at the top of the views, where the eye is; the last good view stays as it was, and the
server keeps running.
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
from ReCoKDLib.web.catalogue import ModelChoice, check_pair
from ReCoKDLib.web.uploads import stage_upload

__all__ = ["ServeApp", "INSPECT_MAPS", "WINDOW_PRESETS"]

log = logging.getLogger("recokd.serve")

#: overlays the Inspect panel offers (the region mask is a segmentation, shown by the Slicer module)
INSPECT_MAPS = tuple(m for m in MAP_CHOICES if m != "region mask")
#: window/level presets (width, level) in HU, as Slicer's volume module offers them; None: automatic
WINDOW_PRESETS = {"CT abdomen": (350.0, 40.0), "CT brain": (100.0, 50.0), "CT bone": (1000.0, 400.0),
                  "MR / automatic": None}
MESSAGE_STYLE = ("position: absolute; top: 8px; left: 50%; transform: translateX(-50%); z-index: 20; "
                 "width: min(760px, 92%);")


class ServeApp(TrameApp):
    """The page and its actions (see the module docstring).

    Args:
        models: the pickers' entries (:func:`ReCoKDLib.web.catalogue.find_models`).
        image: a volume to load at start (optional).
        views: 1 (axial) or 3 (axial, coronal, sagittal) slice views.
        device: where models run (``auto``, ``cpu``, ``cuda``).
        encoder: the remote view encoder (``png`` or ``jpeg``).
    """

    def __init__(self, server=None, models: Sequence[ModelChoice] = (), image: str | None = None, views: int = 1,
                 device: str = "auto", encoder: str = "jpeg"):
        super().__init__(server)
        self.device = device
        self.choices = {c.source: c for c in models}
        self.slicer = SlicerApp()
        self.scene = self.slicer.scene
        self.logic = SceneLogic(self.scene, ModelCache(size=2))
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recokd-serve")
        self.volume = self.segmentation = self.overlay = None
        self.result = None  # the SegmentationOutput behind self.segmentation (DICOM SEG export)
        self.series_folder: Path | None = None  # the DICOM series the volume came from
        self._upload_folder: tempfile.TemporaryDirectory | None = None
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

        items = [c.as_item() for c in models]
        teachers = [c.as_item() for c in models if c.role != "student"]
        students = [c.as_item() for c in models if c.role == "student"]
        self.state.update(dict(
            image_path=image or "", upload=None, status="Load a volume to begin.", error="", busy=False,
            progress=0, progress_known=False, models=items, model=items[0]["value"] if items else None,
            model_info="", fill_opacity=0.5, outline_opacity=1.0, overlay_opacity=0.6, threshold=0.1,
            has_result=False, has_volume=False, is_dicom=False, has_overlay=False,
            window_preset="MR / automatic", window_presets=list(WINDOW_PRESETS),
            teachers=teachers, students=students, teacher=None, student=None, pair_problem="",
            levels=[], level=None, inspect_class="", classes=[], map_choice="difference",
            map_choices=list(INSPECT_MAPS),
        ))
        self.state.change("fill_opacity", "outline_opacity")(self._on_segment_opacity)
        self.state.change("overlay_opacity")(self._on_overlay_opacity)
        self.state.change("threshold")(self._on_threshold)
        self.state.change("window_preset")(self._on_window_preset)
        self.state.change("upload")(self._on_upload)
        self.state.change("model")(self._on_model)
        self.state.change("teacher", "student")(self._on_pair)
        self._build_ui()
        self._on_model(self.state.model)
        if image:
            self.load_path(image)

    # -- page ------------------------------------------------------------------------------------

    def _build_ui(self) -> None:
        seg_nrrd = self.server.controller.trigger_name(self.download_segmentation)
        dicom_seg = self.server.controller.trigger_name(self.download_dicom_seg)
        compact = dict(density="compact", hide_details=True)
        with SinglePageWithDrawerLayout(self.server) as self.ui:
            self.ui.title.set_text("ReCoKD")
            with self.ui.drawer, v3.VContainer(classes="pa-2"):
                html.Div("Volume", classes="text-subtitle-2")
                v3.VTextField(v_model=("image_path",), label="Path on the server (file or DICOM folder)",
                              id="image_path", **compact)
                v3.VBtn("Load", click=self.load_from_state, id="load", block=True, classes="my-1",
                        disabled=("busy",))
                v3.VFileInput(v_model=("upload",), label="or upload: an image, a DICOM series (its files or a .zip)",
                              multiple=True, id="upload", disabled=("busy",), **compact)
                v3.VSelect(v_model=("window_preset",), items=("window_presets",), label="Window / level",
                           id="window_preset", classes="mt-1", **compact)
                v3.VDivider(classes="my-2")
                html.Div("Segment", classes="text-subtitle-2")
                v3.VSelect(v_model=("model",), items=("models",), label="Model", id="model", **compact)
                html.Div("{{ model_info }}", style="font-size: 0.75rem; white-space: pre-wrap;", id="model_info")
                v3.VBtn("Segment", click=self.segment, id="segment", block=True, color="primary", classes="my-1",
                        disabled=("busy || !has_volume || !model",))
                html.Div("Segment fill {{ fill_opacity }}")
                v3.VSlider(v_model=("fill_opacity",), min=0, max=1, step=0.05, hide_details=True, id="fill_opacity")
                html.Div("Segment outline {{ outline_opacity }}")
                v3.VSlider(v_model=("outline_opacity",), min=0, max=1, step=0.05, hide_details=True,
                           id="outline_opacity")
                v3.VBtn("Download .seg.nrrd", id="download", block=True, classes="my-1", disabled=("!has_result",),
                        click=f"utils.download('segmentation.seg.nrrd', trigger('{seg_nrrd}'), "
                              "'application/octet-stream')")
                v3.VBtn("Download DICOM SEG", id="download_dicom", block=True, classes="my-1",
                        disabled=("!has_result || !is_dicom",),
                        click=f"utils.download('segmentation.dcm', trigger('{dicom_seg}'), 'application/dicom')")
                v3.VDivider(classes="my-2")
                html.Div("Inspect", classes="text-subtitle-2")
                v3.VSelect(v_model=("teacher",), items=("teachers",), label="Teacher (choose)", id="teacher",
                           **compact)
                v3.VSelect(v_model=("student",), items=("students",), label="Student (choose)", id="student",
                           classes="mt-1", **compact)
                html.Div("{{ pair_problem }}", v_if=("pair_problem",), id="pair_problem",
                         style="font-size: 0.75rem; color: #b71c1c;")
                v3.VSelect(v_model=("level",), items=("levels",), label="Level", id="level", classes="mt-1",
                           no_data_text="Show map first: it lists the levels the maps have", **compact)
                v3.VSelect(v_model=("inspect_class",), items=("classes",), label="Class (region maps)",
                           clearable=True, id="inspect_class", classes="mt-1", **compact)
                v3.VSelect(v_model=("map_choice",), items=("map_choices",), label="Map", id="map_choice",
                           classes="mt-1", **compact)
                html.Div("Overlay opacity {{ overlay_opacity }}")
                v3.VSlider(v_model=("overlay_opacity",), min=0, max=1, step=0.05, hide_details=True,
                           id="overlay_opacity")
                html.Div("Hide values below {{ Math.round(threshold * 100) }} % of the map's range")
                v3.VSlider(v_model=("threshold",), min=0, max=0.95, step=0.05, hide_details=True, id="threshold")
                v3.VBtn("Show map", click=self.inspect, id="inspect", block=True, classes="my-1",
                        disabled=("busy || !has_volume || !teacher || !student",))
            with self.ui.content:
                with html.Div(style="display: flex; align-items: center; gap: 12px; height: 36px; padding: 0 12px; "
                                    "font-size: 0.9rem; border-bottom: 1px solid #ddd;", id="status_bar"):
                    html.Div("{{ status }}", id="status", style="white-space: nowrap; overflow: hidden; "
                                                                "text-overflow: ellipsis; flex: 1;")
                    v3.VProgressLinear(model_value=("progress",), indeterminate=("busy && !progress_known",),
                                       active=("busy",), id="progress", style="max-width: 240px;", height=6)
                with html.Div(style="position: relative; width: 100%; height: calc(100vh - 100px);"):
                    with html.Div(style=MESSAGE_STYLE):
                        v3.VAlert(v_if=("error",), type="error", text=("error",), closable=True, density="compact",
                                  id="error", elevation=4, click_close="error = ''")
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
        log.info("%s", message)
        self._report(error=message, status=f"{what}; the view is unchanged.", busy=False)

    def _render(self) -> None:
        for view in self.views:
            view.schedule_render()

    # -- volume ----------------------------------------------------------------------------------

    def load_from_state(self) -> None:
        self.load_path(self.state.image_path)

    def load_path(self, path: str | Path, name: str | None = None, keep: tempfile.TemporaryDirectory | None = None
                  ) -> bool:
        """Read an image file or a DICOM series folder and show it in every view; True when loaded.
        On failure the previous volume and results stay; ``keep`` (an upload's folder) is then removed."""
        try:
            text = str(path or "").strip()
            if not text:
                raise ValueError("type the path of a NIfTI, NRRD or MHA file (or a DICOM folder) on the server")
            array, geometry = read_image(text, allow_channels=False)
            node = mrml.volume_node_from_array(self.scene, array, geometry, name or Path(text).name)
        except Exception as exc:  # noqa: BLE001 - every failure is shown in the page
            if keep is not None:
                keep.cleanup()
            self._fail(exc, f"Could not load {name or path}")
            return False
        self._show_volume(node, Path(text) if Path(text).is_dir() else None, keep)
        return True

    def _on_upload(self, upload=None, **_):
        if not upload:
            return
        files = [ClientFile(item) for item in (upload if isinstance(upload, list) else [upload])]
        files = [f for f in files if not f.is_empty]
        if not files:
            return
        shown = files[0].name if len(files) == 1 else f"{len(files)} files ({files[0].name}, ...)"
        folder = tempfile.TemporaryDirectory(prefix="recokd-upload-")
        try:
            path = stage_upload([(f.name, f.content) for f in files], folder.name)
        except Exception as exc:  # noqa: BLE001
            folder.cleanup()
            self._fail(exc, f"Could not load {shown}")
            return
        self.load_path(path, name=shown, keep=folder)

    def _show_volume(self, node, series_folder: Path | None, upload_folder) -> None:
        for old in (self.overlay, self.segmentation, self.volume):
            mrml.remove_node(old)
        if self._upload_folder is not None:
            self._upload_folder.cleanup()
        self._upload_folder = upload_folder
        self.volume, self.segmentation, self.overlay, self.result = node, None, None, None
        self.series_folder = series_folder
        self._maps_key = self._maps = None
        self._fitted.clear()
        for view in self.views:
            view.set_foreground_volume_id(None)
            view.set_background_volume_id(node.GetID())
            view.fit_view_to_content()
        low = node.GetImageData().GetScalarRange()[0]
        preset = "CT abdomen" if low <= -500 else "MR / automatic"  # air at -1000 HU: a CT
        if self.state.window_preset == preset:
            self._on_window_preset(preset)
        self._render()
        shape = "x".join(str(n) for n in reversed(node.GetImageData().GetDimensions()))
        source = " (DICOM series)" if series_folder is not None else ""
        self._report(has_volume=True, has_result=False, has_overlay=False, error="", progress=0, window_preset=preset,
                     is_dicom=series_folder is not None, status=f"Loaded {node.GetName()}{source}: {shape} voxels.")

    def _on_window_preset(self, window_preset=None, **_):
        if self.volume is None or window_preset not in WINDOW_PRESETS:
            return
        display = self.volume.GetDisplayNode()
        values = WINDOW_PRESETS[window_preset]
        if values is None:
            display.AutoWindowLevelOn()
        else:
            display.AutoWindowLevelOff()
            display.SetWindowLevel(*values)
        self._render()

    # -- segmentation ----------------------------------------------------------------------------

    def _on_model(self, model=None, **_):
        from ReCoKDLib.mrml.logic import describe_model_source

        choice = self.choices.get(model)
        try:
            info = describe_model_source(model) if model else "No model: start recokd serve with --model PATH."
        except ValueError as exc:
            info = str(exc)
        self._report(model_info=f"{choice.title}\n{info}" if choice else info)

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
        """Segment the loaded volume with the chosen model off the loop; the node is made here.
        A failure leaves the previous segmentation shown."""
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
            segmentation = self.logic.add_segmentation(self.volume, output)
            mrml.remove_node(self.segmentation)
            self.segmentation, self.result = segmentation, output
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

    def _on_overlay_opacity(self, overlay_opacity=0.6, **_):
        for view in self.views:
            view.set_foreground_opacity(float(overlay_opacity))
        self._render()

    def _on_threshold(self, threshold=0.1, **_):
        if self.overlay is not None:
            mrml.set_overlay_threshold(self.overlay, float(threshold))
            self._render()

    def _attachment(self, what: str, write) -> object:
        """``write(folder) -> path`` in a temporary folder; its bytes as a trame attachment."""
        try:
            with tempfile.TemporaryDirectory(prefix="recokd-download-") as folder:
                data = Path(write(Path(folder))).read_bytes()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, f"{what} failed")
            return None
        return self.server.protocol.addAttachment(data)

    def download_segmentation(self):
        """The result as ``.seg.nrrd`` bytes for the browser (a trame attachment)."""
        if self.segmentation is None:
            self._report(error="Nothing to download: segment a volume first.")
            return None
        return self._attachment("Export", lambda folder: self.logic.export_segmentation(
            self.segmentation, folder / "segmentation.seg.nrrd"))

    def download_dicom_seg(self):
        """The result as a DICOM SEG object referencing the loaded DICOM series (a trame attachment)."""
        if self.result is None or self.series_folder is None:
            self._report(error="A DICOM SEG needs a volume loaded from a DICOM series and a segmentation of it.")
            return None
        from ReCoKDLib.data.dicom_seg import write_dicom_seg

        choice = self.choices.get(self.result.model_source)
        name = choice.label if choice and choice.label else Path(str(self.result.model_source)).name

        def write(folder: Path) -> Path:
            written = write_dicom_seg(self.result.labels, self.result.geometry, self.series_folder,
                                      self.result.class_names, folder / "segmentation.dcm", colors=self.result.colors,
                                      algorithm=name)
            notes = f" Note: {'; '.join(written.notes)}." if written.notes else ""
            self._report(status=f"DICOM SEG with {len(written.segments)} segment(s): "
                                f"{', '.join(written.segments)}.{notes}")
            return written.path

        return self._attachment("DICOM SEG export", write)

    # -- inspection ------------------------------------------------------------------------------

    def _on_pair(self, teacher=None, student=None, **_):
        """A new teacher/student pair: say at once whether they belong together; offer the teacher's
        classes, and the levels once the pair's maps exist (the first Show map computes level 0)."""
        pair = self.choices.get(teacher), self.choices.get(student)
        problem = check_pair(*pair) if teacher and student else ""
        classes = list(pair[0].classes[1:]) if pair[0] is not None else []
        known = self._maps_key is not None and self._maps_key[1:] == (teacher, student)
        levels = sorted({int(k.split("/")[0]) for k in self._maps}) if known else []
        self._report(pair_problem=problem, levels=levels, level=levels[0] if levels else None, classes=classes,
                     inspect_class="")

    def inspect(self) -> None:
        asynchronous.create_task(self.run_inspect())

    async def run_inspect(self):
        """Compute (or reuse) the maps of teacher and student off the loop; show the chosen one.
        A failure leaves the overlay that was shown."""
        if self.state.busy:
            return None
        teacher, student = self.state.teacher, self.state.student
        try:
            if self.volume is None:
                raise ValueError("load a volume first")
            if not teacher or not student:
                raise ValueError("choose a teacher and a student")
            problem = check_pair(self.choices.get(teacher), self.choices.get(student))
            if problem:
                raise ValueError(problem)
            key = (self.volume.GetID(), teacher, student)
            if self._maps_key != key:
                data = self.logic.read_volume(self.volume)
                self._report(busy=True, error="", progress_known=False, status="Computing the maps...")
                loop = asyncio.get_running_loop()
                self._maps = await loop.run_in_executor(
                    self.executor, partial(self.logic.run_maps, data, teacher, student, None, None, self.device))
                self._maps_key = key
                levels = sorted({int(k.split("/")[0]) for k in self._maps})
                self._report(levels=levels, level=self.state.level if self.state.level in levels else levels[0])
            level = int(self.state.level if self.state.level is not None else 0)
            classes = list(self.state.classes or [])
            class_id = class_key(["background", *classes], self.state.inspect_class or "")
            overlay = self.logic.add_overlay(self.volume, self._maps, level, self.state.map_choice, class_id)
            mrml.set_overlay_threshold(overlay, float(self.state.threshold))
            mrml.remove_node(self.overlay)
            self.overlay = overlay
            for view in self.views:
                view.set_foreground_volume_id(self.overlay.GetID())
                view.set_foreground_opacity(float(self.state.overlay_opacity))
            self._report(busy=False, error="", has_overlay=True,
                         status=f"Showing {self.state.map_choice} at level {level}.")
            return self.overlay
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, "Inspection failed")
            return None
        finally:
            self._render()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self._upload_folder is not None:
            self._upload_folder.cleanup()
