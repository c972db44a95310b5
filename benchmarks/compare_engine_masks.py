#!/usr/bin/env python
"""Masks of the engine at an earlier commit vs the working tree's engine, on the same volumes.

The earlier ``TextGuidedSegLib/engine.py`` is read with ``git show REV:...`` into a temporary
module of the package (it imports the current preprocessing / orientation / models, so only the
engine differs). Prints, per volume, the intensity range each engine used, the Dice between the
two label maps, the number of voxels that differ and the largest probability difference::

    python benchmarks/compare_engine_masks.py [--old-rev b43d714] [--prompt PROMPT] [--model NAME_OR_DIR]
        [--synthetic 512x512x300 ...] [--volume PATH ...]

Without ``--volume`` / ``--synthetic`` it compares the shipped brain1 sample, a 512 x 512 x 300
CT-like synthetic volume (see ``benchmark_engine.py``) and the colin27 brain MR when present.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from benchmark_engine import parse_size, synthetic_ct  # noqa: E402
from TextGuidedSegLib.engine import segment_volume  # noqa: E402
from TextGuidedSegLib.io import read_volume, sample_path  # noqa: E402
from TextGuidedSegLib.model_store import load_model  # noqa: E402
from TextGuidedSegLib.preprocessing import intensity_range  # noqa: E402

#: the last engine before issue #21 (whole-volume normalisation with exact percentiles)
DEFAULT_OLD_REV = "b43d714"
COLIN27 = REPO.parent / "shared" / "data" / "volumes" / "colin27_aal" / "ch2.nii.gz"


def load_old_engine(rev: str, tmp: str):
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:TextGuidedSegLib/engine.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tmp) / "engine_reference.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("TextGuidedSegLib._engine_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(a, b).sum()) / denom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old-rev", default=DEFAULT_OLD_REV)
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt", default=None, help="default: 'liver' on the CT-like volume, 'tumor' elsewhere")
    parser.add_argument("--volume", action="append", default=[])
    parser.add_argument("--synthetic", action="append", type=parse_size, default=[], metavar="IxJxK")
    args = parser.parse_args()

    model = load_model(args.model, device="cpu")
    def from_file(path):
        vol = read_volume(path)
        return vol.array, vol.ijk_to_ras

    cases = [(str(p), "tumor", lambda p=p: from_file(p)) for p in args.volume]
    cases += [("synthetic CT %dx%dx%d" % s, "liver", lambda s=s: synthetic_ct(s)) for s in args.synthetic]
    if not cases:
        cases = [("brain1 sample", "tumor", lambda: from_file(sample_path("brain1_image.nrrd"))),
                 ("synthetic CT 512x512x300", "liver", lambda: synthetic_ct((512, 512, 300)))]
        if COLIN27.is_file():
            cases.append(("colin27 ch2 MR", "tumor", lambda: from_file(COLIN27)))

    with tempfile.TemporaryDirectory() as tmp:
        old = load_old_engine(args.old_rev, tmp)
        print(f"model {model.name}; old = engine.py at {args.old_rev}, new = working tree")
        print(f"{'volume':26s}{'prompt':>8s}{'shape':>18s}{'exact lo..hi':>22s}{'sampled lo..hi':>22s}"
              f"{'voxels old':>12s}{'voxels new':>12s}{'Dice':>10s}{'differ':>9s}{'max |dp|':>10s}")
        for name, default_prompt, load in cases:
            prompt = args.prompt or default_prompt
            array, m = load()
            cfg = model.config.intensity
            exact = intensity_range(array, cfg, max_samples=None)
            sampled = intensity_range(array, cfg)
            r_old = old.segment_volume(array, m, [prompt], model, device="cpu", return_probability=True)[0]
            r_new = segment_volume(array, m, [prompt], model, device="cpu", return_probability=True)[0]
            differ = int(np.count_nonzero(r_old.labels != r_new.labels))
            dp = float(np.max(np.abs(r_old.probability - r_new.probability)))
            print(f"{name:26s}{prompt:>8s}{str(array.shape):>18s}{exact[0]:>10.1f}..{exact[1]:<10.1f}"
                  f"{sampled[0]:>10.1f}..{sampled[1]:<10.1f}{int(r_old.labels.sum()):12d}{int(r_new.labels.sum()):12d}"
                  f"{dice(r_old.labels, r_new.labels):10.6f}{differ:9d}{dp:10.2e}")
            del r_old, r_new


if __name__ == "__main__":
    main()
