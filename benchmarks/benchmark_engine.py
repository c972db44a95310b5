#!/usr/bin/env python
"""Engine throughput vs the raw batched forward pass of the same model, and peak memory.

Prints a table; asserts nothing. The ratio (engine slices/s / raw forward slices/s) shows what
normalisation, resizing, layout and stitching cost on top of the network. Raw and engine runs
alternate, and the ratio is given both from the best run of each and as the median over
neighbouring pairs, so a machine shared with other work shows up as spread rather than bias.
Peak memory is the peak resident set size of one ``segment_volume`` call, measured in a fresh
child process that only loads the model and the volume (so the figure is not inflated by this
process's timing runs)::

    python benchmarks/benchmark_engine.py                           # the shipped brain1 sample
    python benchmarks/benchmark_engine.py --synthetic 512x512x300   # CT-like int16, columns x rows x slices
    python benchmarks/benchmark_engine.py --volume /path/to/volume.nii.gz [--model NAME_OR_DIR]
        [--prompt liver] [--device auto] [--batch-size auto] [--repeats 3] [--probability]

``--synthetic IxJxK`` resamples the shipped brain1 sample (256 x 256 x 13 MR) to ``I x J`` in plane
and walks back and forth through its slices (4 output slices per input slice) to make ``K`` slices,
then maps its intensities onto Hounsfield-like values (air -1000, soft tissue -50..80, the
brightest voxels 700..1800, Gaussian noise of 8 HU), stored as int16 like a CT.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from TextGuidedSegLib.engine import auto_batch_size, segment_volume, select_device  # noqa: E402
from TextGuidedSegLib.io import read_volume, sample_path  # noqa: E402
from TextGuidedSegLib.model_store import load_model  # noqa: E402

# brain1 MR intensity -> Hounsfield-like value (piecewise linear)
_MR_POINTS = (0.0, 60.0, 250.0, 900.0, 1600.0, 3057.0)
_HU_POINTS = (-1000.0, -950.0, -50.0, 80.0, 700.0, 1800.0)


def parse_size(text: str) -> tuple[int, int, int]:
    """``"512x512x300"`` -> (columns i, rows j, slices k)."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected COLUMNSxROWSxSLICES such as 512x512x300, got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def synthetic_ct(size: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like int16 ``(k, j, i)`` volume of ``size`` = (i, j, k) made from the brain1 sample.

    Built one slice at a time, so the only large array is the int16 result.
    """
    src = read_volume(sample_path("brain1_image.nrrd"))
    ni, nj, nk = size
    planes = torch.from_numpy(src.array.astype(np.float32))[:, None]  # [13, 1, 256, 256]
    planes = F.interpolate(planes, size=(nj, ni), mode="bilinear", align_corners=False)[:, 0].numpy()
    n_src = planes.shape[0]
    period = max(1, 2 * (n_src - 1))
    rng = np.random.default_rng(seed)
    out = np.empty((nk, nj, ni), dtype=np.int16)
    for k in range(nk):
        pos = (k / 4.0) % period if n_src > 1 else 0.0
        pos = period - pos if pos > n_src - 1 else pos  # back and forth through the source slices
        lo = int(np.floor(pos))
        hi = min(lo + 1, n_src - 1)
        w = np.float32(pos - lo)
        mr = planes[lo] * (1 - w) + planes[hi] * w
        hu = np.interp(mr, _MR_POINTS, _HU_POINTS).astype(np.float32)
        hu += rng.normal(0.0, 8.0, size=hu.shape).astype(np.float32)
        out[k] = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    spacing = (0.7, 0.7, 1.0)
    ijk_to_ras = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS-identity direction, like a CT
    return out, ijk_to_ras


def load_input(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    if args.synthetic is not None:
        array, m = synthetic_ct(args.synthetic)
        return array, m, "synthetic CT-like from brain1 %dx%dx%d" % args.synthetic
    vol = read_volume(args.volume or sample_path("brain1_image.nrrd"))
    return vol.array, vol.ijk_to_ras, str(vol.source)


def _vm_hwm_mib() -> float | None:
    """Peak RSS since the last reset (Linux ``VmHWM``), MiB; None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _vm_rss_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_child(args: argparse.Namespace) -> None:
    """Child mode: one ``segment_volume`` call on a saved volume; prints its memory as JSON."""
    device = select_device(args.device)
    model = load_model(args.model, device=device)
    volume = np.load(args.rss_child)
    m = np.load(args.rss_child + ".ijk_to_ras.npy")
    bs = "auto" if args.batch_size == "auto" else int(args.batch_size)
    # load the text encoder and cache the prompt on a tiny volume first: its one-off cost is not the call's
    segment_volume(volume[:1, :16, :16], m, [args.prompt], model, batch_size=bs, device=device)
    before = _vm_rss_mib()
    reset = False
    try:  # Linux: "5" resets VmHWM (peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        pass
    segment_volume(volume, m, [args.prompt], model, batch_size=bs, device=device,
                   return_probability=args.probability)
    peak = _vm_hwm_mib() if reset else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"before_mib": before, "peak_mib": peak, "hwm_reset": reset}))


def measure_peak_rss(args: argparse.Namespace, array: np.ndarray, ijk_to_ras: np.ndarray) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "volume.npy")
        np.save(path, np.ascontiguousarray(array))
        np.save(path + ".ijk_to_ras.npy", ijk_to_ras)
        cmd = [sys.executable, __file__, "--rss-child", path, "--prompt", args.prompt, "--device", args.device,
               "--batch-size", str(args.batch_size)]
        if args.model:
            cmd += ["--model", args.model]
        if args.probability:
            cmd.append("--probability")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--volume", default=None, help="a volume file (default: the shipped brain1 sample volume)")
    src.add_argument("--synthetic", type=parse_size, default=None, metavar="IxJxK",
                     help="a CT-like int16 volume of I columns, J rows and K slices, e.g. 512x512x300")
    parser.add_argument("--prompt", default="tumor")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probability", action="store_true", help="also return the probability volume")
    parser.add_argument("--no-rss", action="store_true", help="skip the child process that measures peak memory")
    parser.add_argument("--rss-only", action="store_true", help="only the peak memory, no timing")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args)
        return

    device = select_device(args.device)
    array, ijk_to_ras, source = load_input(args)
    if args.rss_only:
        print(f"volume {array.shape} {array.dtype} ({source}), return_probability={args.probability}")
        print_peak_rss(measure_peak_rss(args, array, ijk_to_ras), array)
        return
    model = load_model(args.model, device=device)
    bs = auto_batch_size(model, device) if args.batch_size == "auto" else int(args.batch_size)
    n = array.shape[0]
    size = model.config.image_size
    kw = dict(batch_size=bs, device=device, return_probability=args.probability)

    text = model.text_encoder.encode([args.prompt]).to(device)
    x = torch.rand(bs, model.config.in_channels, size, size, device=device)

    def raw_forward() -> None:
        with torch.inference_mode():
            for s0 in range(0, n, bs):
                b = min(bs, n - s0)
                model.model(x[:b], text.index([0] * b))

    def engine() -> None:
        segment_volume(array, ijk_to_ras, [args.prompt], model, **kw)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    engine()  # warm-up
    raw_forward()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine_times, raw_times = [], []
    for _ in range(args.repeats):  # interleaved, so a busy neighbour slows both alike
        raw_times.append(timed(raw_forward))
        engine_times.append(timed(engine))

    engine_sps = n / min(engine_times)
    raw_sps = n / min(raw_times)
    peak_gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    print(f"model {model.name} ({model.config.model_type}, {size} px), volume {array.shape} {array.dtype} "
          f"({source}), device {device}, batch {bs}, {torch.get_num_threads()} CPU threads, "
          f"return_probability={args.probability}")
    print(f"{'':28s}{'slices/s':>10s}{'best s':>9s}{'all runs (s)':>28s}")
    print(f"{'raw batched forward':28s}{raw_sps:10.1f}{min(raw_times):9.2f}    "
          + " ".join(f"{t:.2f}" for t in raw_times))
    print(f"{'engine (segment_volume)':28s}{engine_sps:10.1f}{min(engine_times):9.2f}    "
          + " ".join(f"{t:.2f}" for t in engine_times))
    print(f"{'ratio engine / raw':28s}{engine_sps / raw_sps:10.2f}    (best run of each)")
    paired = sorted(r / e for r, e in zip(raw_times, engine_times))
    print(f"{'ratio, median of pairs':28s}{float(np.median(paired)):10.2f}    "
          f"(each engine run against the raw run just before it: {' '.join(f'{v:.2f}' for v in paired)})")
    if not args.no_rss:
        print_peak_rss(measure_peak_rss(args, array, ijk_to_ras), array)
    print(f"peak GPU memory: {peak_gpu:.0f} MiB")


def print_peak_rss(mem: dict, array: np.ndarray) -> None:
    float_mib = array.size * 4 / 2**20
    how = "VmHWM reset before the call" if mem["hwm_reset"] else "ru_maxrss of the child"
    print(f"peak RSS of one segment_volume call (fresh process, {how}): {mem['peak_mib']:.0f} MiB "
          f"(model + volume loaded before the call: {mem['before_mib']:.0f} MiB, so the call added "
          f"{mem['peak_mib'] - mem['before_mib']:.0f} MiB; the volume as float32 would be {float_mib:.0f} MiB, "
          f"peak / float32 volume = {mem['peak_mib'] / float_mib:.2f})")


if __name__ == "__main__":
    main()
