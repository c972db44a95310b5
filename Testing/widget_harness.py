"""Drive the module's Widget without Qt: its own Apply / poll / finish code runs, with plain-Python
stand-ins for the four Qt objects it touches on that path (progress bar, Apply button, status label,
timer), on a real MRML scene from slicer-core.

Used by ``test_slicer_logic.py`` (the worker-thread protocol: results, cancel, errors, scene
close) and ``benchmarks/benchmark_gui_worker.py`` (how fast the worker runs when the main thread
holds the GIL the way Slicer's Qt event loop does).
"""

from __future__ import annotations

import ctypes
import sys
import time
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace
from typing import Any


@dataclass
class FakeProgressBar:
    format: str = ""
    value: int = 0
    maximum: int = 100
    visible: bool = True
    #: every (value, maximum) shown while visible: the progress the user saw
    history: list = field(default_factory=list)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name == "value" and hasattr(self, "history") and self.visible:
            self.history.append((value, self.maximum))

    def show(self) -> None:
        self.visible = True

    def hide(self) -> None:
        self.visible = False


@dataclass
class FakeButton:
    text: str = "Apply"
    toolTip: str = ""
    enabled: bool = True


@dataclass
class FakeLabel:
    text: str = ""
    history: list = field(default_factory=list)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name == "text" and hasattr(self, "history"):
            self.history.append(value)


@dataclass
class FakeTimer:
    active: bool = False

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False


class FakeParameterNode(SimpleNamespace):
    """The fields of ``TextGuidedSegParameterNode`` (a plain object: parameterNodeWrapper needs the app)."""

    def disconnectGui(self, tag: Any) -> None:
        pass


def headless_widget(module: ModuleType, volumeNode, model: str, prompts: str, **parameters: Any):
    """A ``TextGuidedSegWidget`` ready for ``onApplyButton()``.

    The widget finds its nodes again through ``slicer.mrmlScene`` (the application's scene), which
    slicer-core does not have: the caller sets ``slicer.mrmlScene`` to the scene of ``volumeNode``.
    """
    widget = module.TextGuidedSegWidget()
    widget.ui = SimpleNamespace(progressBar=FakeProgressBar(visible=False), applyButton=FakeButton(),
                                statusLabel=FakeLabel())
    widget.logic = module.TextGuidedSegLogic()
    widget.logic.logCallback = widget._setStatus
    widget._timer = FakeTimer()
    fields = dict(inputVolume=volumeNode, outputSegmentation=None, modelName=model, prompts=prompts, threshold=0.5,
                  device="cpu", axis="auto", laterality="patient", writeProbability=False, samples=8)
    fields.update(parameters)
    widget._parameterNode = FakeParameterNode(**fields)
    # outside the application VTKObservationMixin is a stand-in without observers
    widget.removeObserver = lambda *args: None
    widget.addObserver = lambda *args: None
    return widget


def _hold_gil_for(seconds: float) -> None:
    """Block the calling thread WITHOUT releasing the GIL, as the Qt event loop does in Slicer while it
    waits for events (PythonQt does not release the GIL): libc usleep called through ``ctypes.PyDLL``,
    whose calls keep the GIL (``ctypes.CDLL`` would release it)."""
    if seconds > 0:
        ctypes.PyDLL(None).usleep(int(seconds * 1e6))


def run_event_loop(widget, *, gil_held_between_polls: float, timeout: float = 120.0) -> float:
    """Run the widget's timer until its job ends, the way Qt would: call ``_pollWorker`` whenever the
    timer is active, and between calls let the "event loop" wait ``gil_held_between_polls`` seconds
    holding the GIL (0: the widget's 0 ms timer on an idle GUI). Returns the seconds it took."""
    if sys.platform == "win32" and gil_held_between_polls > 0:
        raise RuntimeError("the GIL-holding event loop emulation needs libc usleep (Linux, macOS)")
    start = time.perf_counter()
    while widget._timer.active:
        if time.perf_counter() - start > timeout:
            if widget._job is not None:
                widget._job.cancel.set()
            raise TimeoutError(f"the widget's job did not finish within {timeout:.0f} s")
        _hold_gil_for(gil_held_between_polls)
        widget._pollWorker()
    return time.perf_counter() - start
