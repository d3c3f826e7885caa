"""Everything the panel does, usable from the Python console and scripts without the GUI.

Python console examples::

    logic = slicer.util.getModuleLogic("ReCoKD")
    seg = logic.segment(getNode("CTChest"), "/models/student.pt")              # blocking, in-process
    job = logic.segmentInBackground(getNode("CTChest"), "/models/student.pt",
                                    finished=lambda job, node: print(node.GetName()))
    job = logic.distill("/models/teacher.pt", "/data/Dataset001_CT", "/runs/ct",
                        callback=lambda progress, record: print(progress.etaText()))
    job = logic.distill("/models/teacher.pt", "/data/unlabelled_ct", "/runs/ct_free", withoutLabels=True,
                        teacherOutputs="cache")  # no labels: a folder of images, the teacher run once per case
    logic.showAffinity(getNode("CTChest"), "/models/teacher.pt", "/models/student.pt",
                       level=0, mapName="difference")
    logic.untrustedEntryPoints("/models/downloaded.pt")    # [("mypkg.nets:MyUNet", "the model card of ...")]
    logic.trustEntryPoint("mypkg.nets:MyUNet")              # runs it from now on, until Slicer closes

A model file never chooses code to run (:mod:`ReCoKDLib.trust`): the code a card or teacher-preset
file names (an entry point) runs only when it is allow-listed or trusted by name. The names trusted
with :meth:`ReCoKDLogic.trustEntryPoint` are kept in :attr:`ReCoKDLogic.trustedEntryPoints` for this
Slicer session only, and go to every model load: in-process (``ReCoKDLib.trust.trusted_entry_points``)
and in child jobs (``--trust-entry-point``).

The scene-level work (segment a volume node, region-mask and overlay nodes, ``.seg.nrrd``
export) is ``ReCoKDLib.mrml.logic.SceneLogic``, shared with ``recokd serve``; long jobs run as
``PythonSlicer -m ReCoKDLib <subcommand> ... --progress json`` child processes
(:mod:`ReCoKDModule.process`), one training job and one segmentation at a time.
"""

import contextlib
import importlib
import os
import pathlib
import shutil
import sys
import tempfile

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from ReCoKDModule import requirements
from ReCoKDModule.commandLines import (DistillOptions, ReCoKDInputError, chosenPath, distillArguments,
                                       isDatasetFolder, segmentArguments, torchDevice, trainTeacherArguments)
from ReCoKDModule.jobProgress import JobProgress
from ReCoKDModule.parameters import ReCoKDParameterNode
from ReCoKDModule.process import ChildJob, QProcessRunner, qtSchedule
from ReCoKDModule.roi import cropGeometry, fullBox, roiVoxelBox

#: the two job slots: training (distill or train a teacher) and segmentation run side by side
TRAINING, SEGMENT = "training", "segment"
#: where "Train a teacher" writes, inside the Distill output folder (distillation writes into the
#: folder itself, and refuses a folder that already holds a run)
TEACHER_SUBFOLDER = "teacher"
PLOT_VIEW_TAG = "ReCoKDPlotView"


def pythonSlicerExecutable() -> str:
    """The Python that runs child jobs: Slicer's ``PythonSlicer`` launcher (sets up Slicer's
    environment), else this interpreter (outside Slicer)."""
    return shutil.which("PythonSlicer") or sys.executable


def _isTorchScript(path) -> bool:
    """A TorchScript file: its card's architecture is never built (``ReCoKDLib.models.files``)."""
    try:
        from ReCoKDLib.models.files import is_torchscript_file
    except ImportError:  # no torch yet: nothing loads; treat it as the model file it may be
        return False
    return is_torchscript_file(path)


class ReCoKDLogic(ScriptedLoadableModuleLogic):
    """Segment, distill, inspect; see the module docstring.

    Args:
        runnerFactory: makes a ``ProcessRunner`` per child job (default ``QProcessRunner``).
        schedule: ``schedule(delayMs, function)`` for the cancel timeout (default a Qt timer).
        python: the interpreter for child jobs (default ``PythonSlicer``).
    """

    def __init__(self, runnerFactory=None, schedule=None, python=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.runnerFactory = runnerFactory or QProcessRunner
        self.schedule = schedule or qtSchedule
        self.python = python
        self.jobs = {TRAINING: None, SEGMENT: None}
        self._models = None  # ReCoKDLib.mrml.logic.ModelCache, made on first use
        self._sceneLogic = None
        #: entry points the user trusted (:meth:`trustEntryPoint`), for this Slicer session only. Never
        #: stored in the parameter node: a scene file is shared, and trust must not travel with it.
        self.trustedEntryPoints = set()

    def getParameterNode(self):
        return ReCoKDParameterNode(super().getParameterNode())

    # -- dependencies ---------------------------------------------------------------------------

    @staticmethod
    def missingModules() -> list:
        return requirements.missingModules()

    def setupPythonRequirements(self, confirm=True) -> bool:
        """Install what is missing after one confirmation (see :mod:`ReCoKDModule.requirements`)."""
        return requirements.setupPythonRequirements(confirm)

    @staticmethod
    def gpuNames() -> list:
        """Names of the CUDA GPUs torch sees; empty without torch or without a GPU."""
        if importlib.util.find_spec("torch") is None:
            return []
        try:
            import torch

            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        except Exception:  # a broken CUDA setup must not break the panel; Automatic still works
            return []

    # -- model sources, teacher and data --------------------------------------------------------

    @staticmethod
    def describeModel(source) -> str:
        """One-line summary of a model source: a model file's card (read without torch), an nnU-Net
        model folder's classes and spacing, or a teacher preset (``preset:<name>``).

        Raises:
            ValueError: not a model (``ReCoKDLib.mrml.logic.SceneLogicError``).
        """
        from ReCoKDLib.mrml.logic import describe_model_source

        try:
            return describe_model_source(source)
        except ImportError as exc:
            raise ReCoKDInputError(_("Install ReCoKD's Python packages first (click Segment): {error}").format(
                error=exc)) from None

    @staticmethod
    def describeDataset(folder) -> str:
        """Summary of an nnU-Net raw folder: cases, classes and voxel spacing; of a folder of images
        without ``dataset.json`` (data for distillation without labels): how many images.

        Raises:
            ValueError: not usable data (what is missing, or which image cannot be read).
        """
        from ReCoKDLib.data.layout import RawDataset

        if not isDatasetFolder(folder):
            from ReCoKDLib.commands.distill import image_cases

            try:
                images = image_cases([str(folder)])  # what `recokd distill --images FOLDER` reads
            except ValueError:
                images = []
            if images:
                return _("{n} images without labels: distill with 'Without labels' (a teacher cannot be "
                         "trained on them)").format(n=len(images))
        dataset = RawDataset.open(folder, labels_required=False)  # says what an nnU-Net folder lacks
        unlabelled = sum(case.label_path is None for case in dataset.training_cases())
        try:
            summary = dataset.summary()  # reads image headers: SimpleITK raises RuntimeError on a broken file
        except (RuntimeError, OSError) as exc:
            raise ValueError(_("An image in {folder} cannot be read: {error}").format(folder=folder, error=exc)) from exc
        return _("{n} training / {m} test cases; classes: {classes}").format(
            n=len(dataset.training_cases()), m=len(dataset.test_cases()),
            classes=", ".join(dataset.class_names[1:])) + (
            "; " + _("spacing {s}").format(s=summary["spacing"]) if "spacing" in summary else "") + (
            "; " + _("{k} training cases without labels: distill with 'Without labels'").format(k=unlabelled)
            if unlabelled else "")

    @staticmethod
    def teacherSource(path="", preset="") -> str:
        """What the Teacher section names: ``preset:<name>`` when a preset is chosen, else the
        path (a model file or an nnU-Net v2 model folder); empty when nothing is chosen."""
        from ReCoKDLib.mrml.logic import PRESET_PREFIX

        preset = (preset or "").strip()
        if preset:
            return preset if preset.startswith(PRESET_PREFIX) else PRESET_PREFIX + preset
        path = chosenPath(path)
        return str(path) if path is not None else ""

    @staticmethod
    def teacherPresets() -> list:
        """Names of the built-in teacher presets (read without torch)."""
        from ReCoKDLib.mrml.logic import available_presets

        return available_presets()

    @staticmethod
    def isModelSource(source) -> bool:
        """True for an existing model file, an nnU-Net model folder or a ``preset:`` name."""
        from ReCoKDLib.mrml.logic import SceneLogicError, model_source_kind

        try:
            model_source_kind(source)
        except SceneLogicError:
            return False
        return True

    def modelClasses(self, source) -> list:
        """Class names (background first) of a model source: a file's card is read without torch;
        folders and presets are loaded (and kept for the next in-process use)."""
        if pathlib.Path(str(source)).is_file():
            from ReCoKDLib.checkpoint import read_model_card

            return list(read_model_card(source).classes)
        return list(self._loadModel(source).card.classes)

    def exportSceneCase(self, volumeNode, segmentationNode, folder, classNames=None) -> pathlib.Path:
        """Write a volume + segmentation pair from the scene as a one-case nnU-Net raw dataset
        (segments map to classes by name, ``classNames`` background first; else by order)."""
        if volumeNode is None or segmentationNode is None:
            raise ReCoKDInputError(_("Select both a training volume and its segmentation."))
        return self.sceneLogic(volumeNode.GetScene()).export_scene_case(volumeNode, segmentationNode, folder,
                                                                        classNames)

    def exportSceneImage(self, volumeNode, folder) -> pathlib.Path:
        """Write a volume from the scene as one unlabelled training image,
        ``<folder>/scene_000.nii.gz`` (for distillation without labels: ``recokd distill --images``)."""
        from ReCoKDLib.data.io import write_image

        if volumeNode is None:
            raise ReCoKDInputError(_("Select a training volume."))
        volume = self.sceneLogic(volumeNode.GetScene()).read_volume(volumeNode)
        return write_image(volume.array, volume.geometry, pathlib.Path(folder) / "scene_000.nii.gz")

    def exportSegmentation(self, segmentationNode, path) -> pathlib.Path:
        """Write a segmentation node as ``.seg.nrrd`` (atomic; names and colours kept)."""
        if segmentationNode is None:
            raise ReCoKDInputError(_("Segment a volume first."))
        return self.sceneLogic(segmentationNode.GetScene()).export_segmentation(segmentationNode, path)

    # -- code named by model files --------------------------------------------------------------

    def trustEntryPoint(self, entryPoint) -> str:
        """Trust ``entryPoint`` (exactly this ``"package.module:callable"``) for this session: every
        model that names it may run it, here and in child jobs. Returns the name as trusted.

        Raises:
            ReCoKDInputError: not of that form.
        """
        from ReCoKDLib.trust import EntryPointError, entry_point_text

        try:
            name = entry_point_text(entryPoint)
        except EntryPointError as exc:
            raise ReCoKDInputError(str(exc)) from None
        self.trustedEntryPoints.add(name)
        return name

    @contextlib.contextmanager
    def trustedCode(self):
        """A block in which in-process loading honours :attr:`trustedEntryPoints`
        (``ReCoKDLib.trust.trusted_entry_points``)."""
        from ReCoKDLib.trust import trusted_entry_points

        with trusted_entry_points(sorted(self.trustedEntryPoints)):
            yield

    def untrustedEntryPoints(self, source) -> list:
        """``[(entryPoint, namedBy)]``: the code a model source names that loading it would run and
        that is neither allow-listed, built in nor in :attr:`trustedEntryPoints`; read from the model
        card (or the teacher-preset file) without importing anything. Empty for a source that names
        no such code, and for one that cannot be read (describing it says why)."""
        from ReCoKDLib.mrml.logic import PRESET_PREFIX
        from ReCoKDLib.trust import EntryPointError, entry_point_text, is_allow_listed

        text = str(source or "").strip()
        path = pathlib.Path(text)
        named = []
        if text.startswith(PRESET_PREFIX) or (path.suffix.lower() == ".json" and path.is_file()):
            try:
                from ReCoKDLib.teacher_presets import load_preset

                preset = load_preset(text)
            except (ImportError, ValueError):  # no torch yet, or not a preset: nothing of it can run
                return []
            if preset.builtin:
                return []
            namedBy = f"teacher preset {preset.path or preset.name}"  # as ReCoKDLib.trust says it
            if preset.torchscript is None:
                named.append((preset.entry_point, namedBy))
            if preset.eval_hook:
                named.append((dict(preset.eval_hook).get("factory", ""), namedBy))
        elif path.is_file():
            from ReCoKDLib.checkpoint import read_model_card

            try:
                architecture = read_model_card(path).architecture
            except (ValueError, OSError):
                return []
            builtByCard = isinstance(architecture, dict) and architecture.get("kind") == "entry_point"
            if builtByCard and not _isTorchScript(path):
                named.append((architecture.get("factory", ""), f"the model card of {path}"))
        untrusted = []
        for entryPoint, namedBy in named:
            try:
                entryPoint = entry_point_text(entryPoint)
            except EntryPointError:  # a malformed name runs nothing: loading says what is wrong with it
                continue
            if entryPoint not in self.trustedEntryPoints and not is_allow_listed(entryPoint):
                untrusted.append((entryPoint, namedBy))
        return untrusted

    # -- child jobs -----------------------------------------------------------------------------

    def job(self, kind=TRAINING):
        """The last job of a slot (``TRAINING`` or ``SEGMENT``), running or finished; or None."""
        return self.jobs[kind]

    def isRunning(self, kind=TRAINING) -> bool:
        job = self.jobs[kind]
        return job is not None and job.isRunning()

    def _startJob(self, kind, arguments, environment, outputFolder, callback, finished) -> ChildJob:
        if self.isRunning(kind):
            raise ReCoKDInputError(_("A job is already running; cancel it or wait for it to finish."))
        libraryRoot = str(pathlib.Path(importlib.import_module("ReCoKDLib").__file__).resolve().parent.parent)
        env = {"PYTHONPATH": os.pathsep.join([libraryRoot, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               "PYTHONUNBUFFERED": "1", **environment}
        job = ChildJob(self.runnerFactory(), outputFolder, callback, finished, schedule=self.schedule)
        self.jobs[kind] = job
        job.start(self.python or pythonSlicerExecutable(), arguments, env)
        return job

    def distill(self, teacherPath, dataset, outputFolder, method="recokd", reduction=4, steps=1000, device="auto",
                resume=False, callback=None, finished=None, teacherOutputs="auto", withoutLabels=False,
                studentNorm="teacher", studentStem="full") -> ChildJob:
        """Start ``recokd distill`` in a child process; returns the ``ChildJob`` at once.

        ``dataset`` is an nnU-Net raw folder. ``withoutLabels=True`` distils from the teacher's
        predictions only (``--no-labels``; a ``label_free_split`` in its ``dataset.json`` chooses the
        training cases); ``dataset`` may then also be a folder of images or one image file
        (``--images``, e.g. from :meth:`exportSceneImage`). ``teacherOutputs`` (``--teacher-outputs``):
        ``"cache"`` runs the frozen teacher once per training case and stores its outputs in
        ``<outputFolder>/teacher_cache`` (float16, ``2 * (K + sum_l C_l / s_l^3)`` bytes per voxel:
        ``K`` classes, ``C_l`` channels at distilled level ``l`` of stride ``s_l``), ``"live"`` runs it
        on every patch, ``"auto"`` (default) caches when every case fits one exact whole-volume pass.
        ``studentNorm`` (``--student-norm``): ``"teacher"`` (default) keeps the teacher's normalisation;
        ``"batch"`` gives a student that Segment runs on the largest window memory allows (built-in
        U-Net teachers only); ``"instance"``. ``studentStem`` (``--student-stem``): ``"full"`` (default)
        keeps the teacher's stages; ``"strided"`` drops its full-resolution stage, which holds most of a
        thin student's CPU time (built-in U-Net teachers with 4 or more stages only).

        ``callback(progress, record)`` runs for every output line, ``finished(job)`` once at the end
        (``job.progress.resultPath`` is the student file). The teacher may run the code of
        :attr:`trustedEntryPoints`; a job refused for other code it names ends with
        ``job.progress.untrustedEntryPoint`` set.
        """
        options = DistillOptions(str(teacherPath or ""), str(dataset or ""), str(outputFolder or ""),
                                 method, int(reduction), int(steps), device, bool(resume), str(teacherOutputs),
                                 bool(withoutLabels), str(studentNorm), str(studentStem))
        problems = options.validate()
        if problems:
            raise ReCoKDInputError("\n".join(problems))
        arguments, env = distillArguments(options, self.trustedEntryPoints)
        return self._startJob(TRAINING, arguments, env, outputFolder, callback, finished)

    @staticmethod
    def teacherRunFolder(outputFolder) -> pathlib.Path:
        """Where "Train a teacher" writes: ``<output folder>/teacher``, so that a distillation into
        the output folder afterwards does not find the teacher's run there."""
        folder = chosenPath(outputFolder)
        if folder is None:
            raise ReCoKDInputError(_("Select an output folder (Distill section) for the teacher's run."))
        return folder / TEACHER_SUBFOLDER

    def trainTeacher(self, dataset, outputFolder, steps=1000, device="auto", callback=None, finished=None) -> ChildJob:
        """Start ``recokd train-teacher`` in a child process, writing into :meth:`teacherRunFolder`."""
        if chosenPath(dataset) is None or not pathlib.Path(dataset).is_dir():
            raise ReCoKDInputError(_("Select labelled data to train a teacher on."))
        runFolder = self.teacherRunFolder(outputFolder)
        arguments, env = trainTeacherArguments(dataset, runFolder, steps, device)
        return self._startJob(TRAINING, arguments, env, runFolder, callback, finished)

    def cancel(self, kind=TRAINING) -> None:
        if self.jobs[kind] is not None:
            self.jobs[kind].cancel()

    # -- segmentation ---------------------------------------------------------------------------

    def sceneLogic(self, scene):
        """The scene-level logic (``ReCoKDLib.mrml.logic.SceneLogic``) for ``scene``; loaded models
        are kept across calls (a teacher and a student)."""
        from ReCoKDLib.mrml.logic import ModelCache, SceneLogic

        if self._models is None:
            self._models = ModelCache(size=2)
        if self._sceneLogic is None or self._sceneLogic.scene is not scene:
            self._sceneLogic = SceneLogic(scene, self._models)
        return self._sceneLogic

    def _loadModel(self, source, device="auto"):
        self.sceneLogic(slicer.mrmlScene)
        with self.trustedCode():
            return self._models.get(source, torchDevice(device))

    def _checkSegmentInputs(self, volumeNode, modelSource):
        if volumeNode is None:
            raise ReCoKDInputError(_("Select an input volume."))
        if not modelSource or not self.isModelSource(modelSource):
            raise ReCoKDInputError(_("Select a model: a distilled student, a teacher file, an nnU-Net model "
                                     "folder or a preset."))

    @staticmethod
    def _box(roiNode, ijkToRas, shape):
        """Array slices of the voxels inside ``roiNode`` (all voxels without one)."""
        if roiNode is None:
            return fullBox(shape)
        bounds = [0.0] * 6
        roiNode.GetRASBounds(bounds)
        return roiVoxelBox(bounds, ijkToRas, shape)

    def _nodeBox(self, roiNode, volumeNode):
        """:meth:`_box` from the node's grid, without copying its voxels."""
        import vtk

        if roiNode is None or volumeNode.GetImageData() is None:
            return None
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        dims = volumeNode.GetImageData().GetDimensions()
        return self._box(roiNode, slicer.util.arrayFromVTKMatrix(matrix), (dims[2], dims[1], dims[0]))

    def segment(self, volumeNode, modelSource, roiNode=None, device="auto", name=None):
        """Segment ``volumeNode`` in this process (blocking; for scripts and the console).

        Returns a new segmentation node on the volume's grid with named, coloured segments, beside
        the volume (same parent transform and subject-hierarchy folder). With ``roiNode`` only the
        voxels inside it are computed.

        Raises:
            ReCoKDLib.trust.UntrustedCodeError: the model names code that is not trusted (a
                ``ValueError`` naming ``entry_point``); :meth:`trustEntryPoint` trusts it.
        """
        self._checkSegmentInputs(volumeNode, modelSource)
        logic = self.sceneLogic(volumeNode.GetScene())
        with self.trustedCode():
            return logic.segment(volumeNode, modelSource, self._nodeBox(roiNode, volumeNode), torchDevice(device),
                                 name)

    def segmentInBackground(self, volumeNode, modelSource, roiNode=None, device="auto", callback=None,
                            finished=None) -> ChildJob:
        """Segment in a child process with progress and cancel; the GUI stays responsive.

        The volume (or its ROI crop) is written to a temporary NRRD, ``recokd segment`` writes the
        labels and reports the model's classes and colours in its ``done`` event, and
        ``finished(job, node)`` gets the new segmentation node (``None`` when cancelled or failed).
        The model may run the code of :attr:`trustedEntryPoints` (``--trust-entry-point``); a job
        refused for other code it names ends with ``job.progress.untrustedEntryPoint`` set.
        """
        from ReCoKDLib.data.io import write_image

        self._checkSegmentInputs(volumeNode, modelSource)
        logic = self.sceneLogic(volumeNode.GetScene())
        volume = logic.read_volume(volumeNode)
        box = self._box(roiNode, volume.geometry.ijk_to_ras(), volume.array.shape)
        folder = pathlib.Path(tempfile.mkdtemp(prefix="ReCoKD-segment-"))
        image = write_image(volume.array[box], cropGeometry(volume.geometry, box), folder / "input.nrrd",
                            compress=False)
        output = folder / "labels.nrrd"
        volumeNodeID = volumeNode.GetID()
        scene = volumeNode.GetScene()

        def done(job):
            node = None
            try:
                if job.exitCode == 0 and not job.cancelled and output.is_file():
                    node = self.addBackgroundResult(scene.GetNodeByID(volumeNodeID), volume.geometry,
                                                    volume.array.shape, box, output, job.progress, str(modelSource))
            except ValueError as exc:
                job.progress.error = str(exc)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            if finished is not None:
                finished(job, node)

        arguments, env = segmentArguments(modelSource, image, output, device, self.trustedEntryPoints)
        return self._startJob(SEGMENT, arguments, env, folder, callback, done)

    def addBackgroundResult(self, volumeNode, geometry, shape, box, labelsPath, progress: JobProgress, modelSource):
        """The segmentation node of a finished background Segment: the child's labels placed in
        the box of the whole grid, named and coloured by the classes and colours of its ``done``
        event (the model card's, exactly as an in-process Segment)."""
        import numpy as np

        from ReCoKDLib.data.io import read_image
        from ReCoKDLib.mrml.logic import SegmentationOutput

        if volumeNode is None:
            raise ReCoKDInputError(_("The input volume was removed from the scene before the result arrived."))
        result = progress.result
        classes = result.get("classes") or self.modelClasses(modelSource)
        crop = read_image(labelsPath)[0]
        labels = np.zeros(tuple(shape), dtype=crop.dtype)
        labels[tuple(box)] = crop
        output = SegmentationOutput(labels, geometry, list(classes), modelSource, float(result.get("seconds") or 0.0),
                                    colors=result.get("colors") or None)
        return self.sceneLogic(volumeNode.GetScene()).add_segmentation(volumeNode, output)

    # -- inspection -----------------------------------------------------------------------------

    def computeMaps(self, volumeNode, teacherSource, studentSource, labels=None, method=None, device="cpu",
                    roiNode=None):
        """Region masks, attention and affinity maps of teacher and student for ``volumeNode``,
        from the same loss code that trained the student (``ReCoKDLib.inspection``).

        Returns:
            ``{"<level>/<name>[/<class>]": (D, H, W) float32 array}`` on the volume's grid
            (zero outside the ROI).

        Raises:
            ReCoKDLib.trust.UntrustedCodeError: a model names code that is not trusted
                (:meth:`trustEntryPoint`).
        """
        if volumeNode is None:
            raise ReCoKDInputError(_("Select an input volume."))
        logic = self.sceneLogic(volumeNode.GetScene())
        with self.trustedCode():
            return logic.compute_maps(volumeNode, teacherSource, studentSource, labels, method, torchDevice(device),
                                      self._nodeBox(roiNode, volumeNode))

    def _classKey(self, teacherSource, className, device="cpu") -> str:
        from ReCoKDLib.mrml.logic import class_key

        return class_key(self._loadModel(teacherSource, device).card.classes, className)

    def showRegionMask(self, volumeNode, teacherSource, studentSource, level=0, className="", labels=None,
                       roiNode=None):
        """The class-aware region mask of ``level`` (its weight in the segment's name) as a
        segmentation node on the volume's grid."""
        maps = self.computeMaps(volumeNode, teacherSource, studentSource, labels, roiNode=roiNode)
        logic = self.sceneLogic(volumeNode.GetScene())
        return logic.add_region_mask(volumeNode, maps, level, self._classKey(teacherSource, className), className)

    def showAffinity(self, volumeNode, teacherSource, studentSource, level=0, mapName="teacher affinity",
                     className="", opacity=0.5, labels=None, roiNode=None):
        """A teacher/student attention or affinity map, or their difference, as a scalar volume in
        the foreground of every slice view, with a colour map (diverging for the difference)."""
        maps = self.computeMaps(volumeNode, teacherSource, studentSource, labels, roiNode=roiNode)
        logic = self.sceneLogic(volumeNode.GetScene())
        node = logic.add_overlay(volumeNode, maps, level, mapName, self._classKey(teacherSource, className))
        slicer.util.setSliceViewerLayers(background=volumeNode, foreground=node, foregroundOpacity=opacity)
        return node

    @staticmethod
    def setOverlayOpacity(opacity: float) -> None:
        """Foreground opacity of every slice view: ``slicer.util.setSliceViewerLayers`` walks the
        scene's ``vtkMRMLSliceCompositeNode``s, so views that were never shown are covered too."""
        slicer.util.setSliceViewerLayers(foregroundOpacity=float(opacity))

    # -- plot -----------------------------------------------------------------------------------

    def updatePlot(self, progress: JobProgress, scene=None):
        """Loss and validation Dice into table nodes and one plot chart node (saved with the scene)."""
        import numpy as np

        scene = scene or slicer.mrmlScene
        chart = self._plotNode(scene, "vtkMRMLPlotChartNode", "ReCoKD training")
        for series, (column, rows, color) in {
            "loss": ("loss", progress.losses, (0.85, 0.3, 0.2)),
            "Dice": ("mean Dice", progress.dice, (0.2, 0.5, 0.85)),
        }.items():
            if not rows:
                continue
            table = self._plotNode(scene, "vtkMRMLTableNode", f"ReCoKD {series}")
            slicer.util.updateTableFromArray(table, np.asarray(rows, dtype=float), ["step", column])
            plot = self._plotNode(scene, "vtkMRMLPlotSeriesNode", f"ReCoKD {series} series")
            plot.SetAndObserveTableNodeID(table.GetID())
            plot.SetXColumnName("step")
            plot.SetYColumnName(column)
            plot.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            plot.SetColor(*color)
            if not chart.HasPlotSeriesNodeID(plot.GetID()):
                chart.AddAndObservePlotSeriesNodeID(plot.GetID())
        chart.SetXAxisTitle(_("step"))
        return chart

    @staticmethod
    def plotViewNode(scene=None):
        """The plot view node the panel's plot widget shows, found in ``scene`` (a singleton by tag)
        or made there: never a node of a scene that was closed since."""
        scene = scene or slicer.mrmlScene
        node = scene.GetSingletonNode(PLOT_VIEW_TAG, "vtkMRMLPlotViewNode")
        if node is None:
            node = scene.AddNewNodeByClass("vtkMRMLPlotViewNode", "ReCoKD plot view")
            node.SetSingletonTag(PLOT_VIEW_TAG)
        return node

    @staticmethod
    def _plotNode(scene, className, name):
        node = scene.GetFirstNode(name, className)
        return node if node is not None else scene.AddNewNodeByClass(className, name)
