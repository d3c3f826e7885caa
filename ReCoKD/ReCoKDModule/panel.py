"""The panel: ``Resources/UI/ReCoKD.ui`` bound to the parameter node, actions forwarded to the logic.

Clinician first: the Segment section (volume, model, device, Segment/Cancel with progress, result)
is open; Teacher, Data, Distill and Inspect are collapsed, one click away.

Two kinds of widgets:

* bound by ``connectGui`` through their ``SlicerParameterName`` (node selectors, path edits,
  spin boxes, the ``Choice`` combo boxes): Slicer's wrapper keeps widget and parameter in sync;
* the combo boxes of :data:`ReCoKDModule.parameters.SYNCED_BY_THE_PANEL` (models, devices,
  presets, methods, classes): filled here, item data = the stored value, synced both ways here.

Everything that depends on a parameter (the teacher's description, the class list, the model's
classes, the dataset summary, the buttons' state) is recomputed from the parameter node's
``ModifiedEvent``, never from a widget signal: Qt calls a signal's slots in connection order, so
a slot connected before the wrapper's own would read the previous value.

Code a model names (an entry point, ``ReCoKDLib.trust``) runs only after the user says Yes to
:meth:`ReCoKDPanel.confirmTrust`, for that exact name and this Slicer session: asked once when a
teacher or model naming it is described, and again when a job or an inspection was refused for it
(a job is then started again by the user, never on its own).
"""

import pathlib

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.util import VTKObservationMixin

from ReCoKDLib.choices import KD_METHODS
from ReCoKDLib.trust import UntrustedCodeError
from ReCoKDModule.commandLines import ReCoKDInputError, chosenPath, deviceChoices
from ReCoKDModule.jobProgress import JobProgress, formatDuration
from ReCoKDModule.logic import SEGMENT, TRAINING, ReCoKDLogic
from ReCoKDModule.modelChoices import RecentModels, modelLabel

MODEL_FILE_FILTER = "ReCoKD and TorchScript models (*.pt *.ts)"


class ReCoKDPanel(VTKObservationMixin):
    """Builds the panel into ``layout`` and runs it.

    Args:
        layout: the module widget's layout (``ScriptedLoadableModuleWidget.layout``).
        uiPath: ``Resources/UI/ReCoKD.ui``.
        logic: a :class:`ReCoKDLogic` (default: a new one).
        recentModels: a :class:`RecentModels` (default: on Slicer's settings).
    """

    def __init__(self, layout, uiPath, logic=None, recentModels=None):
        VTKObservationMixin.__init__(self)
        self.logic = logic or ReCoKDLogic()
        self.recentModels = recentModels or RecentModels()
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._syncing = False
        self._described = {}  # what the info labels were computed for
        self._askedEntryPoints = set()  # asked about while describing a model: not asked there again

        self.uiWidget = slicer.util.loadUI(str(uiPath))
        layout.addWidget(self.uiWidget)
        self.ui = slicer.util.childWidgetVariables(self.uiWidget)
        self.uiWidget.setMRMLScene(slicer.mrmlScene)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self._fillStaticChoices()
        self._connect()
        self.initializeParameterNode()

    # -- lists the panel fills ------------------------------------------------------------------

    def _fillStaticChoices(self) -> None:
        combo = self.ui.methodComboBox
        combo.clear()
        for index, method in enumerate(KD_METHODS):
            combo.addItem(method.title, method.name)
            combo.setItemData(index, method.description, qt.Qt.ToolTipRole)
        self.refreshDevices()
        self.refreshPresets()

    def refreshDevices(self) -> None:
        combo = self.ui.deviceComboBox
        combo.blockSignals(True)
        combo.clear()
        for index, (device, text, tip) in enumerate(deviceChoices(self.logic.gpuNames())):
            combo.addItem(text, device)
            combo.setItemData(index, tip, qt.Qt.ToolTipRole)
        combo.blockSignals(False)

    def refreshPresets(self) -> None:
        combo = self.ui.teacherPresetComboBox
        combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("(none: use the file or folder above)"), "")
        for name in self.logic.teacherPresets():
            combo.addItem(name, name)
        combo.blockSignals(False)

    def modelSources(self) -> list:
        """What the Segment model picker offers: the chosen model, then the recently used ones,
        the last distilled student and the teacher; only sources that still exist."""
        p = self._parameterNode
        candidates = [p.segmentModel] + self.recentModels.sources() if p else self.recentModels.sources()
        if p:
            student = chosenPath(p.studentPath)
            candidates += [str(student) if student else "", self._teacherSource()]
        sources = []
        for source in candidates:
            if source and source not in sources and self.logic.isModelSource(source):
                sources.append(source)
        return sources

    def refreshModels(self) -> None:
        combo = self.ui.modelComboBox
        combo.blockSignals(True)
        combo.clear()
        sources = self.modelSources()
        if not sources:
            combo.addItem(_("Choose a model (Browse...)"), "")
        for index, source in enumerate(sources):
            combo.addItem(modelLabel(source), source)
            combo.setItemData(index, source, qt.Qt.ToolTipRole)
        combo.blockSignals(False)
        self._selectData(combo, self._parameterNode.segmentModel if self._parameterNode else "")

    def refreshClasses(self, classes) -> None:
        combo = self.ui.classComboBox
        combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("(all classes)"), "")
        for name in classes[1:]:
            combo.addItem(name, name)
        combo.blockSignals(False)
        self._selectData(combo, self._parameterNode.inspectClass if self._parameterNode else "")

    @staticmethod
    def _selectData(combo, value) -> None:
        index = combo.findData(value)
        combo.blockSignals(True)
        combo.setCurrentIndex(index if index >= 0 else 0)
        combo.blockSignals(False)

    # -- connections ----------------------------------------------------------------------------

    def _connect(self) -> None:
        ui = self.ui
        ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        ui.startButton.connect("clicked(bool)", self.onStartButton)
        ui.trainTeacherButton.connect("clicked(bool)", self.onTrainTeacherButton)
        ui.showMapButton.connect("clicked(bool)", self.onShowMapButton)
        ui.showRegionMaskButton.connect("clicked(bool)", self.onShowRegionMaskButton)
        ui.teacherFolderButton.connect("clicked(bool)", self.onTeacherFolderButton)
        # the slider's own value is passed: no parameter read, so connection order does not matter
        ui.opacitySlider.connect("valueChanged(double)", self.logic.setOverlayOpacity)
        menu = qt.QMenu(ui.modelBrowseButton)
        for text, slot in ((_("Model file..."), self.onBrowseModelFile),
                           (_("nnU-Net model folder..."), self.onBrowseModelFolder)):
            menu.addAction(text).connect("triggered()", slot)
        ui.modelBrowseButton.setMenu(menu)
        ui.modelBrowseButton.setPopupMode(qt.QToolButton.InstantPopup)
        for field, combo in (("segmentModel", ui.modelComboBox), ("device", ui.deviceComboBox),
                             ("teacherPreset", ui.teacherPresetComboBox), ("method", ui.methodComboBox),
                             ("inspectClass", ui.classComboBox)):
            combo.connect("currentIndexChanged(int)", lambda index, field=field, combo=combo: self._comboChanged(field, combo))

    def _comboChanged(self, field, combo) -> None:
        if self._parameterNode is None or self._syncing:
            return
        value = combo.currentData
        setattr(self._parameterNode, field, "" if value is None else str(value))

    # -- lifecycle ------------------------------------------------------------------------------

    def cleanup(self) -> None:
        self.removeObservers()
        for kind in (TRAINING, SEGMENT):
            if self.logic.isRunning(kind):
                self.logic.cancel(kind)

    def enter(self) -> None:
        self.refreshPresets()
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        parameterNode = self.logic.getParameterNode()
        if not parameterNode.inputVolume:
            parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not parameterNode.segmentModel:
            last = next((s for s in self.recentModels.sources() if self.logic.isModelSource(s)), "")
            parameterNode.segmentModel = last
        self.setParameterNode(parameterNode)

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        self._described = {}
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    # -- parameter node -> panel ----------------------------------------------------------------

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        self._syncing = True
        try:
            self.refreshModels()
            for field, combo in (("device", self.ui.deviceComboBox), ("teacherPreset", self.ui.teacherPresetComboBox),
                                 ("method", self.ui.methodComboBox), ("inspectClass", self.ui.classComboBox)):
                self._selectData(combo, getattr(p, field))
        finally:
            self._syncing = False
        self._describeIfChanged("teacher", self._teacherSource(), self._describeTeacher)
        self._describeIfChanged("model", p.segmentModel, self._describeModel)
        self._describeIfChanged("data", str(chosenPath(p.dataFolder) or ""), self._describeData)
        self.updateButtons()

    def _describeIfChanged(self, what, value, describe) -> None:
        if self._described.get(what) != value:
            self._described[what] = value
            describe(value)

    def _describeTeacher(self, source) -> None:
        text, classes = _("Classes and voxel spacing of the selected teacher appear here."), []
        if source:
            try:
                text = self.logic.describeModel(source)
                if pathlib.Path(source).is_file():  # folders and presets are not loaded on the GUI thread
                    classes = self.logic.modelClasses(source)
            except ValueError as exc:
                text = _("Not a usable teacher: {error}").format(error=exc)
            text += self._untrustedNote(self.askAboutCode(source))
        self.ui.teacherInfoLabel.text = text
        self.refreshClasses(classes)

    def _describeModel(self, source) -> None:
        text = _("Choose a model: its classes appear here.")
        if source:
            try:
                text = self.logic.describeModel(source)
            except ValueError as exc:
                text = _("Not a usable model: {error}").format(error=exc)
            text += self._untrustedNote(self.askAboutCode(source))
        self.ui.modelInfoLabel.text = text

    # -- code named by model files --------------------------------------------------------------

    def confirmTrust(self, entryPoint, namedBy) -> bool:
        """Ask whether to trust ``entryPoint``, the code ``namedBy`` (a model card, a preset file)
        names; on Yes the logic trusts exactly this name for the Slicer session
        (:meth:`ReCoKDLogic.trustEntryPoint`). A modal ``slicer.util.confirmYesNoDisplay``: nothing is
        trusted without Yes (No, Escape and closing the dialog all answer No)."""
        self._askedEntryPoints.add(entryPoint)
        namedBy = str(namedBy or _("a model file"))
        package = str(entryPoint).split(":")[0].split(".")[0]
        text = _("{namedBy} names Python code that builds its network:\n\n{entryPoint}\n\nLoading the model "
                 "imports and runs that code, from the Python package '{package}' on this computer, with your "
                 "permissions. ReCoKD runs code a file names only when you trust it by name. Trust it only if you "
                 "trust where this file comes from.\n\nTrust {entryPoint} until Slicer closes?").format(
            namedBy=namedBy[:1].upper() + namedBy[1:], entryPoint=entryPoint, package=package)
        if not slicer.util.confirmYesNoDisplay(text, windowTitle=_("Run code named by a model?")):
            return False
        self.logic.trustEntryPoint(entryPoint)
        return True

    def askAboutCode(self, source) -> list:
        """Ask (:meth:`confirmTrust`) about each entry point ``source`` names that is not trusted yet,
        once per entry point: one the user declined is not asked about again while describing.
        Returns the entry points that stay untrusted."""
        untrusted = []
        for entryPoint, namedBy in self.logic.untrustedEntryPoints(source):
            if entryPoint in self._askedEntryPoints or not self.confirmTrust(entryPoint, namedBy):
                untrusted.append(entryPoint)
        return untrusted

    @staticmethod
    def _untrustedNote(entryPoints) -> str:
        if not entryPoints:
            return ""
        return "\n" + _("It names code you have not trusted, which will not run: {entryPoints}.").format(
            entryPoints=", ".join(entryPoints))

    def _runTrusting(self, action):
        """``action()``; when a model it loads in this process names code nobody trusted, ask
        (:meth:`confirmTrust`) and, on Yes, run it again at once (this click asked for it).

        Raises:
            ReCoKDInputError: the user did not trust the code (nothing of it ran).
        """
        while True:
            try:
                return action()
            except UntrustedCodeError as exc:
                if exc.entry_point in self.logic.trustedEntryPoints:
                    raise
                if not self.confirmTrust(exc.entry_point, exc.source):
                    raise ReCoKDInputError(_("Not run: {source} names code you did not trust ({entryPoint}).").format(
                        source=exc.source, entryPoint=exc.entry_point)) from None
                self._describeModelsAgain()

    def _describeModelsAgain(self) -> None:
        """The teacher's and the model's descriptions anew: their note on untrusted code may be gone."""
        for what in ("teacher", "model"):
            self._described.pop(what, None)
        self.onParameterNodeModified()

    def _describeData(self, folder) -> None:
        text = _("Cases, classes and voxel spacing of the selected data appear here.")
        if folder and pathlib.Path(folder).is_dir():
            try:
                text = self.logic.describeDataset(folder)
            except ValueError as exc:
                text = str(exc)
        self.ui.dataSummaryLabel.text = text

    # -- what can run, and why not --------------------------------------------------------------

    def _teacherSource(self) -> str:
        p = self._parameterNode
        return self.logic.teacherSource(p.teacherPath, p.teacherPreset) if p else ""

    def segmentProblems(self) -> list:
        p = self._parameterNode
        problems = [] if p.inputVolume else [_("Select a volume to segment.")]
        if not self.logic.isModelSource(p.segmentModel):
            problems.append(_("Choose a model (Browse...): a distilled student, a teacher file, an nnU-Net model "
                              "folder or a preset."))
        return problems

    def trainingDataProblems(self, labelled=True) -> list:
        """What is missing for training data: a folder, or a volume and its segmentation from the
        scene; without labels (``labelled=False``) a volume alone will do (:meth:`_trainingData`)."""
        p = self._parameterNode
        folder = chosenPath(p.dataFolder)
        hasFolder = bool(folder and folder.is_dir())
        problems = []
        if labelled and not hasFolder and not (p.trainingVolume and p.trainingSegmentation):
            problems.append(_("Select labelled data (a folder, or a volume and its segmentation)."))
        if not labelled and not hasFolder and not p.trainingVolume:
            problems.append(_("Select training images (a folder, or a volume; no segmentation needed)."))
        if chosenPath(p.outputFolder) is None:
            problems.append(_("Select an output folder."))
        return problems

    def distillProblems(self) -> list:
        problems = []
        if not self.logic.isModelSource(self._teacherSource()):
            problems.append(_("Select a teacher: a weights file, an nnU-Net model folder or a preset."))
        return problems + self.trainingDataProblems(labelled=not self._parameterNode.withoutLabels)

    def inspectProblems(self) -> list:
        p = self._parameterNode
        problems = [] if p.inputVolume else [_("Select a volume (Segment section).")]
        if not self.logic.isModelSource(self._teacherSource()):
            problems.append(_("Select a teacher."))
        student = chosenPath(p.studentPath)
        if not (student and student.is_file()):
            problems.append(_("Select the distilled student."))
        return problems

    def updateButtons(self) -> None:
        if self._parameterNode is None:
            return
        ui = self.ui
        self._setButton(ui.segmentButton, self.logic.isRunning(SEGMENT), self.segmentProblems(),
                        _("Segment"), _("Segment the volume with the model (in the background)"),
                        _("Stop segmenting"))
        self._setButton(ui.startButton, self.logic.isRunning(TRAINING), self.distillProblems(),
                        _("Start"), _("Distill a student from the teacher's predictions only (no labels)")
                        if self._parameterNode.withoutLabels else _("Distill a student from the teacher"),
                        _("Ask the process to save a checkpoint and stop"))
        training = self.logic.isRunning(TRAINING)
        problems = self.trainingDataProblems()
        ui.trainTeacherButton.enabled = not training and not problems
        ui.trainTeacherButton.toolTip = "\n".join(problems) if problems else (
            _("A training job is running") if training else _("Train the built-in 3D U-Net teacher on the labelled data"))
        problems = self.inspectProblems()
        for button in (ui.showMapButton, ui.showRegionMaskButton):
            button.enabled = not problems
            button.toolTip = "\n".join(problems)

    @staticmethod
    def _setButton(button, running, problems, text, tip, cancelTip) -> None:
        button.text = _("Cancel") if running else text
        button.enabled = running or not problems
        button.toolTip = cancelTip if running else ("\n".join(problems) or tip)

    # -- Segment --------------------------------------------------------------------------------

    def onBrowseModelFile(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.uiWidget, _("Model file"), "", MODEL_FILE_FILTER)
        if path:
            self._chooseModel(path)

    def onBrowseModelFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(
            self.uiWidget, _("nnU-Net v2 model folder (Trainer__Plans__Configuration)"))
        if folder:
            self._chooseModel(folder)

    def _chooseModel(self, source) -> None:
        if not self.logic.isModelSource(source):
            slicer.util.errorDisplay(_("{source} is not a model ReCoKD can use: choose a .pt or .ts model file or an "
                                       "nnU-Net v2 model folder.").format(source=source))
            return
        self.recentModels.remember(source)
        self._parameterNode.segmentModel = str(source)

    def onSegmentButton(self) -> None:
        if self.logic.isRunning(SEGMENT):
            self.ui.segmentStatusLabel.text = _("Stopping...")  # before: the job may end inside cancel()
            self.logic.cancel(SEGMENT)
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to segment."), waitCursor=True):
            if not self.logic.setupPythonRequirements(confirm=True):
                return
            self.refreshDevices()  # torch may just have been installed
            p = self._parameterNode
            self.ui.segmentProgressBar.value = 0
            self.ui.segmentStatusLabel.text = _("Segmenting {volume}...").format(volume=p.inputVolume.GetName())
            self.logic.segmentInBackground(p.inputVolume, p.segmentModel, p.roiNode, p.device,
                                           callback=self._onSegmentOutput, finished=self._onSegmentFinished)
            self.recentModels.remember(p.segmentModel)
        self.updateButtons()

    def _onSegmentOutput(self, progress: JobProgress, record) -> None:
        self._showProgress(self.ui.segmentProgressBar, progress)
        if record is not None and record.get("event") in ("start", "progress"):
            self.ui.segmentStatusLabel.text = progress.etaText()

    def _onSegmentFinished(self, job, node) -> None:
        failure = self._showJobError(job, _("Segment"))
        if job.cancelled:
            self.ui.segmentStatusLabel.text = _("Cancelled")
            self.ui.segmentProgressBar.value = 0
        elif node is not None:
            self._parameterNode.outputSegmentation = node
            self.ui.show3DButton.setSegmentationNode(node)
            seconds = float(node.GetAttribute("ReCoKD.Seconds") or 0)
            self.ui.segmentStatusLabel.text = _("{n} segments in {t}").format(
                n=node.GetSegmentation().GetNumberOfSegments(), t=formatDuration(seconds) or "< 1 s")
        else:
            self.ui.segmentStatusLabel.text = failure or _("Failed")
        self.updateButtons()

    # -- Distill and Train a teacher ------------------------------------------------------------

    def _trainingData(self, labelled=True) -> str:
        """The data folder; else the scene's volume and segmentation exported as a one-case dataset
        into the output folder, or without labels (``labelled=False``) the volume alone as one image
        (its segmentation is not used: the teacher's predictions are the targets)."""
        p = self._parameterNode
        folder = chosenPath(p.dataFolder)
        if folder and folder.is_dir():
            return str(folder)
        output = chosenPath(p.outputFolder)
        if not labelled and p.trainingVolume and output:
            return str(self.logic.exportSceneImage(p.trainingVolume, output / "scene_images"))
        if labelled and p.trainingVolume and p.trainingSegmentation and output:
            return str(self.logic.exportSceneCase(p.trainingVolume, p.trainingSegmentation, output / "scene_dataset"))
        raise ReCoKDInputError("\n".join(self.trainingDataProblems(labelled)))

    def onStartButton(self) -> None:
        if self.logic.isRunning(TRAINING):
            self.logic.cancel(TRAINING)
            self.ui.startButton.enabled = False  # until the process has stopped
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start distillation."), waitCursor=True):
            if not self.logic.setupPythonRequirements(confirm=True):
                return
            p = self._parameterNode
            self.ui.logTextEdit.clear()
            self.logic.distill(self._teacherSource(), self._trainingData(labelled=not p.withoutLabels),
                               chosenPath(p.outputFolder), p.method, int(p.studentReduction), p.steps, p.device,
                               p.resume, callback=self._onJobOutput, finished=self._onDistillFinished,
                               teacherOutputs=p.teacherOutputs, withoutLabels=p.withoutLabels,
                               studentNorm=p.studentNorm, studentStem=p.studentStem)
            self._showPlot()
        self.updateButtons()

    def onTrainTeacherButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start teacher training."), waitCursor=True):
            if not self.logic.setupPythonRequirements(confirm=True):
                return
            p = self._parameterNode
            self.ui.logTextEdit.clear()
            self.logic.trainTeacher(self._trainingData(), chosenPath(p.outputFolder), p.steps, p.device,
                                    callback=self._onJobOutput, finished=self._onTeacherFinished)
            self._showPlot()
        self.updateButtons()

    @staticmethod
    def _showProgress(bar, progress: JobProgress) -> None:
        fraction = progress.fraction()
        bar.maximum = 0 if fraction is None else 1000  # a busy indicator while unknown
        bar.value = int(1000 * (fraction or 0))

    def _onJobOutput(self, progress: JobProgress, record) -> None:
        for line in progress.takeNewLog():
            self.ui.logTextEdit.appendPlainText(line)
        self._showProgress(self.ui.progressBar, progress)
        self.ui.etaLabel.text = progress.etaText()
        if record is not None and record.get("event") in ("progress", "metrics"):
            self.logic.updatePlot(progress)

    def _showJobError(self, job, again=""):
        """Say why ``job`` failed. Returns None when it did not, else the text for its status label.

        A job refused because its model names code nobody trusted (the ``error`` event's
        ``entry_point``) asks whether to trust that name (:meth:`confirmTrust`, even after an earlier
        No: the user just tried to run it) instead of showing the error; a job is never restarted on
        its own: the text asks the user to press ``again`` (Start, Segment) once more."""
        progress = job.progress
        if not progress.error or job.cancelled:
            return None
        entryPoint = progress.untrustedEntryPoint
        if entryPoint:
            if self.confirmTrust(entryPoint, progress.untrustedSource):
                self._describeModelsAgain()
                return _("{entryPoint} is trusted now: press {button} again.").format(entryPoint=entryPoint,
                                                                                      button=again)
            return _("Not run: the model names code you did not trust ({entryPoint}).").format(entryPoint=entryPoint)
        slicer.util.errorDisplay(_("The background job failed."), detailedText=progress.error)
        return _("Failed")

    def _onDistillFinished(self, job) -> None:
        self._onJobOutput(job.progress, None)
        failure = self._showJobError(job, _("Start"))
        if not failure and job.progress.resultPath and not job.cancelled:
            student = job.progress.resultPath
            self.recentModels.remember(student)
            self._parameterNode.studentPath = pathlib.Path(student)
            self._parameterNode.segmentModel = student  # the new student segments next
        if failure and job.progress.untrustedEntryPoint:
            self.ui.logTextEdit.appendPlainText(failure)
        self.ui.etaLabel.text = _("Cancelled: continue with Resume") if job.cancelled else (
            failure if failure and job.progress.untrustedEntryPoint else job.progress.etaText())
        self.updateButtons()

    def _onTeacherFinished(self, job) -> None:
        self._onJobOutput(job.progress, None)
        if not self._showJobError(job) and job.progress.resultPath and not job.cancelled:
            self.recentModels.remember(job.progress.resultPath)
            self._parameterNode.teacherPreset = ""
            self._parameterNode.teacherPath = pathlib.Path(job.progress.resultPath)
        self.updateButtons()

    def _showPlot(self) -> None:
        chart = self.logic.updatePlot(JobProgress())
        viewNode = self.logic.plotViewNode()  # looked up in the current scene every time
        self.ui.lossPlotWidget.setMRMLPlotViewNode(viewNode)
        viewNode.SetPlotChartNodeID(chart.GetID())

    # -- Teacher --------------------------------------------------------------------------------

    def onTeacherFolderButton(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(
            self.uiWidget, _("nnU-Net v2 model folder (Trainer__Plans__Configuration)"))
        if folder:
            self._parameterNode.teacherPreset = ""
            self._parameterNode.teacherPath = pathlib.Path(folder)

    # -- Inspect --------------------------------------------------------------------------------

    def _inspectArguments(self):
        p = self._parameterNode
        return p.inputVolume, self._teacherSource(), str(chosenPath(p.studentPath) or ""), p.inspectLevel, p.inspectClass

    def onShowMapButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to compute the map."), waitCursor=True):
            volume, teacher, student, level, className = self._inspectArguments()
            self._runTrusting(lambda: self.logic.showAffinity(
                volume, teacher, student, level, self._parameterNode.inspectMap, className,
                self._parameterNode.overlayOpacity))

    def onShowRegionMaskButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to compute the region mask."), waitCursor=True):
            volume, teacher, student, level, className = self._inspectArguments()
            self._runTrusting(lambda: self.logic.showRegionMask(volume, teacher, student, level, className))
