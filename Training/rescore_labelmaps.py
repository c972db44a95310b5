#!/usr/bin/env python
"""Score saved label maps against an MSD / nnU-Net dataset's labelsTr without TextGuidedSeg.

An independent check of ``textguidedseg evaluate --dataset msd --save-predictions DIR``: reads
``DIR/<case id>.nii.gz`` and ``ROOT/labelsTr/<case id>.nii.gz`` with SimpleITK, checks that both
lie on the same grid, and computes per label and volume Dice, HD95 and ASD in mm with numpy and
scipy (surface voxels = mask minus its 6-connected erosion; Euclidean distance maps with the
voxel spacing; HD95 = the larger of the two directed 95th percentiles; ASD = mean of all
surface-to-surface distances, both directions), then mean and sample sd (ddof 1) over volumes::

    python Training/rescore_labelmaps.py --data-root ../shared/data/volumes/msd_hippocampus \\
        --predictions preds/ [--split val]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure


def scores(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float, float]:
    """Dice, HD95 (mm), ASD (mm); distances NaN when either mask is empty, Dice 1 when both are."""
    if not pred.any() and not truth.any():
        return 1.0, float("nan"), float("nan")
    dice = 2.0 * np.logical_and(pred, truth).sum() / (pred.sum() + truth.sum())
    if not pred.any() or not truth.any():
        return float(dice), float("nan"), float("nan")
    structure = generate_binary_structure(3, 1)
    sp = pred & ~binary_erosion(pred, structure)
    st = truth & ~binary_erosion(truth, structure)
    to_truth = distance_transform_edt(~st, sampling=spacing)[sp]
    to_pred = distance_transform_edt(~sp, sampling=spacing)[st]
    hd95 = max(np.percentile(to_truth, 95), np.percentile(to_pred, 95))
    asd = (to_truth.sum() + to_pred.sum()) / (to_truth.size + to_pred.size)
    return float(dice), float(hd95), float(asd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", required=True, help="dataset folder (dataset.json, labelsTr/)")
    parser.add_argument("--predictions", required=True, help="folder of <case id>.nii.gz label maps")
    parser.add_argument("--split", default=None, help="only the cases of this split.json split (default: all files)")
    args = parser.parse_args()
    root, preds = Path(args.data_root), Path(args.predictions)
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    labels = {int(k): v for k, v in meta["labels"].items() if int(k) != 0}
    files = sorted(preds.glob("*.nii.gz"))
    if args.split:
        keep = set(json.loads((root / "split.json").read_text(encoding="utf-8"))[args.split])
        files = [f for f in files if f.name[: -len(".nii.gz")] in keep]
    table: dict[int, list[tuple[float, float, float]]] = {v: [] for v in labels}
    for f in files:
        pred_im = sitk.ReadImage(str(f))
        truth_im = sitk.ReadImage(str(root / "labelsTr" / f.name))
        for what in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
            a, b = getattr(pred_im, what)(), getattr(truth_im, what)()
            if not np.allclose(a, b, atol=1e-4):
                raise SystemExit(f"{f.name}: {what[3:].lower()} differs from the ground truth's: {a} vs {b}")
        pred = sitk.GetArrayFromImage(pred_im)
        truth = np.rint(sitk.GetArrayFromImage(truth_im))
        spacing = pred_im.GetSpacing()[::-1]  # array order (k, j, i)
        for v in labels:
            table[v].append(scores(pred == v, truth == v, spacing))
    print(f"{len(files)} label maps in {preds} against {root / 'labelsTr'}; mean +- sd (ddof 1) over volumes")
    for v, name in labels.items():
        a = np.array(table[v], dtype=float)
        ok = ~np.isnan(a[:, 1])
        print(f"  label {v} {name}: Dice {a[:, 0].mean():.4f} +- {a[:, 0].std(ddof=1):.4f}; "
              f"HD95 {a[ok, 1].mean():.2f} +- {a[ok, 1].std(ddof=1):.2f} mm; "
              f"ASD {a[ok, 2].mean():.2f} +- {a[ok, 2].std(ddof=1):.2f} mm ({int(ok.sum())} volumes with both masks)")


if __name__ == "__main__":
    main()
