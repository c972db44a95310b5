#!/usr/bin/env python
"""A table of ``textguidedseg evaluate --json`` summaries, and paired bootstrap intervals of Dice differences.

``evaluate --per-case-csv`` writes each case's Dice and pixel counts; two runs on the same split are
compared case by case: the difference of global Dice (pooled pixels) and of per-image Dice (mean), with
a 95 % interval from resampling the cases (the same resample for both runs), and how many cases one run
scores more than 0.01 higher than the other::

    python benchmarks/compare_evaluations.py --runs DIR/NAME ... [--reference DIR/NAME] [--boot 2000]

``DIR/NAME`` stands for ``DIR/NAME.json`` (the summary) and ``DIR/NAME.csv`` (the cases). Every run is
compared with ``--reference`` when given.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def _stem(path: str) -> Path:
    """``DIR/NAME``, ``DIR/NAME.json`` or ``DIR/NAME.csv`` -> ``DIR/NAME``."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".json", ".csv") else p


def read_cases(stem: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Case ids, per-image Dice, intersections and pixel sums (prediction + truth) of one run."""
    with open(stem.with_suffix(".csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    dice = np.array([float(r["dice"]) for r in rows])
    sizes = np.array([int(r["pred_pixels"]) + int(r["true_pixels"]) for r in rows])
    inter = np.round(dice * sizes / 2)  # Dice = 2 |P & T| / (|P| + |T|)
    return [r["case_id"] for r in rows], dice, inter, sizes


def row(name: str, summary: dict) -> str:
    lat = summary.get("laterality_error_rate")
    lat_text = (f"{lat:.4f} ({round(lat * summary['laterality_cases'])} of {summary['laterality_cases']})"
                if lat is not None else "")
    return (f"| `{summary['model']}` | {'yes' if summary.get('flip') else 'no'} | {summary['dice_global']:.4f} | "
            f"{summary['dice_per_image']:.4f} | {summary['iou_global']:.4f} / {summary['iou_per_image']:.4f} | "
            f"{summary['hd95_mean']:.2f} / {summary['asd_mean']:.2f} | {lat_text} | "
            f"{1000 * summary['seconds_per_case']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="DIR/NAME of each run (NAME.json + NAME.csv)")
    parser.add_argument("--reference", default=None, help="DIR/NAME of the run the others are compared with")
    parser.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.runs = [_stem(r) for r in args.runs]
    args.reference = _stem(args.reference) if args.reference else None

    print("| model | flip | Dice global | Dice per-image | IoU global / per-image | HD95 / ASD (px) | "
          "laterality error rate | ms per image |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for run in args.runs:
        print(row(Path(run).name, json.loads(run.with_suffix(".json").read_text(encoding="utf-8"))))
    if not args.reference:
        return
    ids, d_ref, i_ref, s_ref = read_cases(args.reference)
    rng = np.random.default_rng(args.seed)
    picks = rng.integers(0, len(ids), size=(args.boot, len(ids)))

    def global_dice(inter: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        return 2 * inter.sum(-1) / sizes.sum(-1)

    print(f"\npaired bootstrap over {len(ids)} cases ({args.boot} resamples): "
          f"{args.reference.name} minus each run, Dice points [95 % interval]")
    for run in args.runs:
        if run == args.reference:
            continue
        run_ids, d, i, s = read_cases(run)
        if run_ids != ids:
            raise SystemExit(f"{run} scores other cases than {args.reference}")
        dg = global_dice(i_ref[picks], s_ref[picks]) - global_dice(i[picks], s[picks])
        dp = d_ref[picks].mean(-1) - d[picks].mean(-1)
        print(f"  - {Path(run).name}: global {100 * (global_dice(i_ref, s_ref) - global_dice(i, s)):+.2f} "
              f"[{100 * np.percentile(dg, 2.5):+.2f}, {100 * np.percentile(dg, 97.5):+.2f}], per-image "
              f"{100 * (d_ref.mean() - d.mean()):+.2f} [{100 * np.percentile(dp, 2.5):+.2f}, "
              f"{100 * np.percentile(dp, 97.5):+.2f}]; cases higher / lower by > 0.01: "
              f"{int((d_ref - d > 0.01).sum())} / {int((d - d_ref > 0.01).sum())}")


if __name__ == "__main__":
    main()
