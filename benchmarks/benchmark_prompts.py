"""Many prompts on one volume: time of N prompts in one call against one prompt, in one run.

A user asks for 10-20 brain structures at once. The engine answers all prompts of a call batch by
batch; a model whose image part reads no text (SSA with ``text_fusion: late``) runs it once per
slice for all prompts. Calls alternate (1 prompt, N prompts in one call, N separate calls) and the
best of ``--repeats`` is kept for each, so the ratios come from the same run.

    python benchmarks/benchmark_prompts.py --model brain-mr-cpu \\
        --volume ../shared/data/volumes/colin27_aal/ch2.nii.gz --prompts 17
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from TextGuidedSegLib.model_store import load_model  # noqa: E402
from TextGuidedSegLib.engine import segment_volume  # noqa: E402
from TextGuidedSegLib.io import read_volume  # noqa: E402

BRAIN_PROMPTS_17 = [f"{side} {s}" for s in ("hippocampus", "amygdala", "caudate nucleus", "putamen", "pallidum",
                                            "thalamus", "lateral ventricle") for side in ("left", "right")] + \
                   ["brainstem", "third ventricle", "fourth ventricle"]


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="brain-mr-cpu")
    p.add_argument("--volume", default=str(REPO.parent / "shared/data/volumes/colin27_aal/ch2.nii.gz"))
    p.add_argument("--prompts", type=int, default=17, help="how many of the 17 brain prompts to ask at once")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-separate", action="store_true", help="do not time N separate one-prompt calls")
    args = p.parse_args(argv)
    if not 1 < args.prompts <= len(BRAIN_PROMPTS_17):
        raise SystemExit(f"--prompts must be 2..{len(BRAIN_PROMPTS_17)}")
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    vol = read_volume(args.volume)
    prompts = BRAIN_PROMPTS_17[: args.prompts]
    shares = bool(getattr(model.model, "shares_image_features", False))
    print(f"model {model.name} ({model.config.model_type}, {model.config.image_size} px, image features shared "
          f"across prompts: {shares}), volume {vol.array.shape} {vol.array.dtype}, {args.threads} CPU threads, "
          f"best of {args.repeats}")
    segment_volume(vol.array, vol.ijk_to_ras, prompts[:1], model)  # warm-up: text encoder, caches
    one = best_time(lambda: segment_volume(vol.array, vol.ijk_to_ras, prompts[:1], model), args.repeats)
    many = best_time(lambda: segment_volume(vol.array, vol.ijk_to_ras, prompts, model), args.repeats)
    print(f"1 prompt                         {one:8.2f} s")
    print(f"{args.prompts} prompts in one call            {many:8.2f} s   ratio {many / one:.2f}")
    if not args.skip_separate:
        separate = best_time(lambda: [segment_volume(vol.array, vol.ijk_to_ras, [q], model) for q in prompts],
                             max(1, args.repeats // 2))
        print(f"{args.prompts} prompts, one call each         {separate:8.2f} s   ratio {separate / one:.2f}")


if __name__ == "__main__":
    main()
