#!/usr/bin/env python
"""How fast the Slicer panel's worker thread segments while the main thread runs the event loop.

In Slicer the main thread keeps the GIL while Qt's event loop waits (PythonQt does not release it),
so a Python worker thread only runs while the main thread runs Python code or sleeps. This script
runs the module's real Widget code (Apply -> worker thread -> ``_pollWorker`` -> nodes, via
``Testing/widget_harness.py``, slicer-core MRML, no Qt) under an emulated event loop that blocks
holding the GIL between polls, and compares with running the same load + inference directly on one
thread. Prints a table; asserts nothing::

    python benchmarks/benchmark_gui_worker.py [--model NAME_OR_DIR] [--volume PATH] [--prompt TEXT] [--repeats 2]
        [--skip-earlier]

Rows: the widget as shipped (poll on every event-loop pass, each poll sleeps GIL_YIELD_SECONDS) with
an idle GUI and with a GUI busy 20 ms per pass; and the earlier design (a 100 ms timer, no yield).
"Longest poll" bounds how long the GUI waits for the panel.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "Testing"))
sys.path.insert(0, str(REPO / "TextGuidedSeg"))

import slicer  # noqa: E402  (PyPI slicer-core)
import torch  # noqa: E402

import TextGuidedSeg  # noqa: E402
from TextGuidedSegLib.io import read_volume, sample_path  # noqa: E402
from TextGuidedSegLib.model_store import DEFAULT_MODEL  # noqa: E402
from widget_harness import headless_widget, run_event_loop  # noqa: E402


def _widget_run(volume_node, model: str, prompt: str, *, hold: float, yield_seconds: float) -> tuple[float, float]:
    """(seconds from Apply to nodes written, longest single poll in seconds)."""
    widget = headless_widget(TextGuidedSeg, volume_node, model, prompt, device="cpu")
    widget.GIL_YIELD_SECONDS = yield_seconds
    longest = [0.0]
    poll = widget._pollWorker

    def timed_poll() -> None:
        t0 = time.perf_counter()
        poll()
        longest[0] = max(longest[0], time.perf_counter() - t0)

    widget._pollWorker = timed_poll
    t0 = time.perf_counter()
    widget.onApplyButton()
    run_event_loop(widget, gil_held_between_polls=hold, timeout=1800)
    seconds = time.perf_counter() - t0
    if not widget.ui.statusLabel.text.startswith("Done in"):
        raise RuntimeError(f"the widget's run did not succeed: {widget.ui.statusLabel.text}")
    return seconds, longest[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--volume", default=None, help="default: the shipped brain1 sample volume")
    parser.add_argument("--prompt", default="tumor")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-earlier", action="store_true",
                        help="leave out the earlier design's row (minutes on volumes of 100+ slices)")
    args = parser.parse_args()

    volume_path = Path(args.volume) if args.volume else sample_path("brain1_image.nrrd")
    volume = read_volume(volume_path)
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene  # the widget looks its nodes up in the application's scene
    logic = TextGuidedSeg.TextGuidedSegLogic()
    volume_node = logic.addVolumeFromArray(scene, volume.array, volume.ijk_to_ras, volume_path.name)

    def direct() -> float:
        t0 = time.perf_counter()
        model = logic.loadModel(args.model, "cpu")
        logic.run_inference(volume.array, volume.ijk_to_ras, [args.prompt], model, device="cpu")
        return time.perf_counter() - t0

    direct()  # warm-up (file cache, first-call kernels)
    rows = [("direct, one thread (no GUI)", min(direct() for _ in range(args.repeats)), None)]
    shipped = TextGuidedSeg.TextGuidedSegWidget.GIL_YIELD_SECONDS
    runs_to_time = [(f"widget as shipped, idle GUI (yield {shipped * 1000:.0f} ms per poll)", 0.0, shipped),
                    ("widget as shipped, GUI busy 20 ms per event-loop pass", 0.020, shipped)]
    if not args.skip_earlier:
        runs_to_time.append(("earlier widget: 100 ms timer, no yield", 0.100, 0.0))
    for label, hold, yield_seconds in runs_to_time:
        runs = [_widget_run(volume_node, args.model, args.prompt, hold=hold, yield_seconds=yield_seconds)
                for _ in range(args.repeats)]
        rows.append((label, min(r[0] for r in runs), max(r[1] for r in runs)))

    print(f"model {args.model}; {volume_path.name}, {' x '.join(map(str, volume.array.shape))} voxels (k, j, i), prompt '{args.prompt}'; CPU, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.repeats}")
    print(f"{'run':62s} {'seconds':>8s} {'vs direct':>9s} {'longest poll':>12s}")
    reference = rows[0][1]
    for label, seconds, longest in rows:
        poll = "" if longest is None else f"{longest * 1000:9.1f} ms"
        print(f"{label:62s} {seconds:8.2f} {seconds / reference:8.2f}x {poll:>12s}")


if __name__ == "__main__":
    main()
