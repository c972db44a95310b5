"""Drive the module's Widget without Qt: its own Apply / poll / finish code runs, with plain-Python
stand-ins for the four Qt objects it touches on that path (progress bar, Apply button, status label,
timer), on a real MRML scene from slicer-core.

Used by ``test_slicer_logic.py`` (the child-process protocol: results, cancel, crashes, kills, errors,
scene close) and ``benchmarks/benchmark_gui_worker.py`` (Apply -> segments time and the longest
main-thread stall, with an event loop that holds the GIL between polls as Slicer's does).
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
                  device="cpu", axis="auto", laterality="patient", writeProbability=False, samples=8, flip=False)
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


@dataclass
class EventLoopRun:
    """What :func:`run_event_loop` measured: wall time until the job ended, and the longest single call
    into the widget (a poll, or the final write of the nodes): how long the GUI was blocked at most."""

    seconds: float
    longest_poll: float
    polls: int


def run_event_loop(widget, *, gil_held_between_polls: float | None = None, timeout: float = 120.0,
                   on_poll=None) -> EventLoopRun:
    """Run the widget's timer until its job ends, the way Qt would: call ``_pollWorker`` whenever the
    timer is active, and between calls let the "event loop" wait holding the GIL, by default the
    widget's ``POLL_INTERVAL_MS`` (a busy GUI: longer). ``on_poll(widget)`` runs after each poll
    (tests use it to cancel or kill the child mid-run)."""
    wait = widget.POLL_INTERVAL_MS / 1000.0 if gil_held_between_polls is None else gil_held_between_polls
    if sys.platform == "win32" and wait > 0:
        raise RuntimeError("the GIL-holding event loop emulation needs libc usleep (Linux, macOS)")
    start = time.perf_counter()
    longest, polls = 0.0, 0
    while widget._timer.active:
        if time.perf_counter() - start > timeout:
            if widget._job is not None:
                widget._job.run.cleanup()
            raise TimeoutError(f"the widget's job did not finish within {timeout:.0f} s")
        _hold_gil_for(wait)
        t0 = time.perf_counter()
        widget._pollWorker()
        longest = max(longest, time.perf_counter() - t0)
        polls += 1
        if on_poll is not None:
            on_poll(widget)
    return EventLoopRun(time.perf_counter() - start, longest, polls)
