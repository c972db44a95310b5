#!/usr/bin/env python
"""How well models read a mirrored chest X-ray: each QaTa val image mirrored left-right, its report's
'left' / 'right' swapped, the answer mirrored back and scored (both Dice conventions). This is the
second view the text-aware flip (``--flip``) averages in; the shipped QaTa models were trained with
``flip_prob: 0`` and so never saw a heart on the right::

    python benchmarks/mirrored_view.py tmc-qata-cpu ssa-qata-cpu ... [--data-root ../shared/data/qata]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from TextGuidedSegLib.data import read_dataset, read_grey, read_mask  # noqa: E402
from TextGuidedSegLib.engine import segment_volume  # noqa: E402
from TextGuidedSegLib.evaluation import IMAGE_IJK_TO_RAS  # noqa: E402
from TextGuidedSegLib.metrics import SegmentationScores  # noqa: E402
from TextGuidedSegLib.model_store import load_model  # noqa: E402
from TextGuidedSegLib.text import swap_left_right  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model names or directories")
    parser.add_argument("--data-root", default="../shared/data/qata")
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    cases = read_dataset("qata", args.data_root, args.split)
    for name in args.models:
        model = load_model(name)
        scores = SegmentationScores()
        for case in cases:
            image, truth = read_grey(case.image_path), read_mask(case.mask_path)
            [r] = segment_volume(image[:, ::-1], IMAGE_IJK_TO_RAS, [swap_left_right(case.text)], model, batch_size=1,
                                 device="cpu", prompt_laterality=case.laterality)
            scores.add(case.case_id, r.labels[0][:, ::-1].astype(bool), truth, distances=False)
        s = scores.summary()
        print(f"{name} mirrored only: Dice global {s['dice_global']:.4f} per-image {s['dice_per_image']:.4f}",
              flush=True)


if __name__ == "__main__":
    main()
