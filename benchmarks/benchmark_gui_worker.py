#!/usr/bin/env python
"""What running the Slicer panel's inference in a child process costs: Apply -> segments written,
against a direct engine call, and the longest time the GUI's main thread is blocked.

The panel's first Apply starts ``python -m TextGuidedSegLib.worker`` (``PythonSlicer`` in Slicer) and
pays a Python start, ``import torch`` and loading the model on top of the inference; the child then
stays loaded, so later runs pay only the transfer of the volume and the results. This script runs
the module's real Widget code (Apply -> child process -> ``_pollWorker`` -> nodes, via
``Testing/widget_harness.py``, slicer-core MRML, no Qt) under an emulated event loop that waits
holding the GIL between polls, as Slicer's does, and compares it with the engine called directly
(model already loaded in this process, and cold in a fresh process). Prints a table; asserts nothing::

    python benchmarks/benchmark_gui_worker.py [--model NAME_OR_DIR] [--volume PATH] [--prompt TEXT] [--repeats 2]

"Longest main-thread call" is the longest single call into the widget (Apply, which checks the input
against the model's domain and writes the volume for the child, a poll, or the last poll, which
reads the results and writes the nodes): the longest the GUI stops answering during a run. The
default model is a chest X-ray model, so on MR volumes the panel asks before running; the script
answers yes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
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
from widget_harness import headless_widget, run_event_loop  # noqa: E402

COLD_DIRECT = """
import sys, time
t0 = time.perf_counter()
from TextGuidedSegLib.engine import segment_volume
from TextGuidedSegLib.io import read_volume
from TextGuidedSegLib.model_store import load_model
vol = read_volume(sys.argv[1])
t1 = time.perf_counter()
segment_volume(vol.array, vol.ijk_to_ras, [sys.argv[3]], load_model(sys.argv[2] or None, "cpu"), device="cpu")
print(time.perf_counter() - t0, time.perf_counter() - t1)
"""


def _widget_run(widget, *, hold: float | None) -> tuple[float, float]:
    """One Apply: (seconds from Apply to nodes written, longest single main-thread call in seconds)."""
    t0 = time.perf_counter()
    widget.onApplyButton()
    apply_seconds = time.perf_counter() - t0
    run = run_event_loop(widget, gil_held_between_polls=hold, timeout=1800)
    seconds = time.perf_counter() - t0
    if not widget.ui.statusLabel.text.startswith("Done in"):
        raise RuntimeError(f"the widget's run did not succeed: {widget.ui.statusLabel.text}")
    return seconds, max(apply_seconds, run.longest_poll)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tmc-qata-cpu")  # the model of the figures quoted in the README
    parser.add_argument("--volume", default=None, help="default: the shipped brain1 sample volume")
    parser.add_argument("--prompt", default="tumor")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    volume_path = Path(args.volume) if args.volume else sample_path("brain1_image.nrrd")
    volume = read_volume(volume_path)
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene  # the widget looks its nodes up in the application's scene
    # the chest X-ray default model's domain check refuses MR volumes: answer the panel's question with "yes"
    # (its cost stays in the timings: it runs inside Apply, on the main thread)
    slicer.util.confirmOkCancelDisplay = lambda *args, **kwargs: True
    logic = TextGuidedSeg.TextGuidedSegLogic()
    volume_node = logic.addVolumeFromArray(scene, volume.array, volume.ijk_to_ras, volume_path.name)

    def direct() -> float:
        t0 = time.perf_counter()
        model = logic.loadModel(args.model, "cpu")
        logic.run_inference(volume.array, volume.ijk_to_ras, [args.prompt], model, device="cpu")
        return time.perf_counter() - t0

    def cold() -> tuple[float, float]:
        out = subprocess.run([sys.executable, "-c", COLD_DIRECT, str(volume_path), args.model, args.prompt],
                             capture_output=True, text=True, check=True, cwd=str(REPO))
        total, after_imports = (float(x) for x in out.stdout.split())
        return total, after_imports

    direct()  # warm-up (file cache, first-call kernels)
    reference = min(direct() for _ in range(args.repeats))
    cold_runs = [cold() for _ in range(args.repeats)]
    rows = [("direct engine call, model loaded in this process", reference, None),
            ("direct, fresh Python process (imports + load + engine)", min(c[0] for c in cold_runs), None)]
    first, later, busy = [], [], []
    for _ in range(args.repeats):
        widget = headless_widget(TextGuidedSeg, volume_node, args.model, args.prompt, device="cpu")
        first.append(_widget_run(widget, hold=None))  # starts the child
        later.append(_widget_run(widget, hold=None))  # the same child, torch and the model loaded
        busy.append(_widget_run(widget, hold=0.020))
        widget.logic.stopWorker()
    for label, runs in (("panel, first Apply (starts the child), idle GUI", first),
                        ("panel, next Apply (child loaded), idle GUI", later),
                        ("panel, next Apply, GUI busy 20 ms per event-loop pass", busy)):
        rows.append((label, min(r[0] for r in runs), max(r[1] for r in runs)))

    print(f"model {args.model}; {volume_path.name}, {' x '.join(map(str, volume.array.shape))} voxels (k, j, i), "
          f"prompt '{args.prompt}'; CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"best of {args.repeats}")
    print(f"{'run':58s} {'seconds':>8s} {'vs direct':>9s} {'longest main-thread call':>25s}")
    for label, seconds, longest in rows:
        stall = "" if longest is None else f"{longest * 1000:.0f} ms"
        print(f"{label:58s} {seconds:8.2f} {seconds / reference:8.2f}x {stall:>25s}")


if __name__ == "__main__":
    main()
