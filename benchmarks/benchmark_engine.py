#!/usr/bin/env python
"""Engine throughput vs the raw batched forward pass of the same model, and peak memory.

Prints a table; asserts nothing. The ratio (engine slices/s / raw forward slices/s) shows what
normalisation, resizing, layout and stitching cost on top of the network::

    python benchmarks/benchmark_engine.py [--model NAME_OR_DIR] [--volume PATH] [--device auto] [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from TextGuidedSegLib.engine import auto_batch_size, segment_volume, select_device  # noqa: E402
from TextGuidedSegLib.io import read_volume, sample_path  # noqa: E402
from TextGuidedSegLib.model_store import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--volume", default=None, help="default: the shipped brain1 sample volume")
    parser.add_argument("--prompt", default="tumor")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = select_device(args.device)
    model = load_model(args.model, device=device)
    vol = read_volume(args.volume or sample_path("brain1_image.nrrd"))
    bs = auto_batch_size(model, device) if args.batch_size == "auto" else int(args.batch_size)
    n = vol.array.shape[0]
    size = model.config.image_size

    segment_volume(vol.array, vol.ijk_to_ras, [args.prompt], model, batch_size=bs, device=device)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        segment_volume(vol.array, vol.ijk_to_ras, [args.prompt], model, batch_size=bs, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        engine_times.append(time.perf_counter() - t0)

    text = model.text_encoder.encode([args.prompt]).to(device)
    x = torch.rand(bs, model.config.in_channels, size, size, device=device)
    raw_times = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for s0 in range(0, n, bs):
                b = min(bs, n - s0)
                model.model(x[:b], text.index([0] * b))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            raw_times.append(time.perf_counter() - t0)

    engine_sps = n / min(engine_times)
    raw_sps = n / min(raw_times)
    peak_gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model {model.name} ({model.config.model_type}, {size} px), volume {vol.array.shape} "
          f"({vol.source}), device {device}, batch {bs}, {torch.get_num_threads()} CPU threads")
    print(f"{'':28s}{'slices/s':>10s}")
    print(f"{'raw batched forward':28s}{raw_sps:10.1f}")
    print(f"{'engine (segment_volume)':28s}{engine_sps:10.1f}")
    print(f"{'ratio engine / raw':28s}{engine_sps / raw_sps:10.2f}")
    print(f"peak process RSS: {peak_rss:.0f} MiB; peak GPU memory: {peak_gpu:.0f} MiB")


if __name__ == "__main__":
    main()
