"""Score a brain model on a real MR with an atlas: per-structure Dice, laterality, flip consistency.

The check of `brain-mr-cpu` (trained on generated images only) on a real T1: Colin27 (``ch2``) with
the AAL atlas on the same grid, which names hippocampus, amygdala, caudate, putamen, pallidum and
thalamus on each side.

1. An MSD-layout folder is written (``--dataset-dir``): the volume as case ``<name>``, and a copy
   whose voxel array is mirrored along i *with its geometry mirrored too* (same anatomy in
   physical space, opposite array order) as ``<name>_flipped``; AAL values become the FreeSurfer
   values of the brain prompts (``Hippocampus_L`` -> 17, ...).
2. ``evaluate_volumes`` (what ``textguidedseg evaluate --dataset msd --prompt-table brain-aal``
   runs) segments both with one prompt per structure and side ("left hippocampus", ...), writes
   the label maps (``--save-predictions``) and gives Dice per structure.
3. Laterality: for each one-sided structure, the share of its predicted voxels on the correct side
   of the midline (RAS x; the midline is the mean x of the atlas's labelled voxels, printed).
4. Flip consistency: the flipped case's label map, mirrored back, against the original's.

    python Training/evaluate_brain_atlas.py --model runs/brain_mr_cpu/model \\
        --image ../shared/data/volumes/colin27_aal/ch2.nii.gz --atlas ../shared/data/volumes/colin27_aal/aal.nii.gz \\
        --names ../shared/data/volumes/colin27_aal/aal.nii.txt --save-predictions preds/colin27
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from TextGuidedSegLib.model_store import load_model  # noqa: E402
from TextGuidedSegLib.data.msd import read_msd_dataset  # noqa: E402
from TextGuidedSegLib.data.synthseg import ATLAS_STRUCTURES, atlas_to_freesurfer, read_atlas_names  # noqa: E402
from TextGuidedSegLib.evaluation import evaluate_volumes  # noqa: E402
from TextGuidedSegLib.io import read_volume, write_labelmap, write_volume  # noqa: E402
from TextGuidedSegLib.metrics import dice_iou  # noqa: E402


def mirror_i(array: np.ndarray, ijk_to_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same physical volume with the voxel order reversed along i (array axis 2)."""
    m = np.array(ijk_to_ras, dtype=float)
    n = array.shape[2]
    m[:3, 3] = m[:3, 3] + m[:3, 0] * (n - 1)  # the new first voxel is the old last one
    m[:3, 0] = -m[:3, 0]
    return np.ascontiguousarray(array[:, :, ::-1]), m


def write_atlas_dataset(folder: Path, name: str, image_path: Path, atlas_path: Path, names_path: Path) -> dict:
    """MSD layout with ``<name>`` and ``<name>_flipped``; returns the FreeSurfer label names."""
    image, atlas = read_volume(image_path), read_volume(atlas_path)
    if image.array.shape != atlas.array.shape or not np.allclose(image.ijk_to_ras, atlas.ijk_to_ras, atol=1e-3):
        raise SystemExit(f"{atlas_path} is not on the grid of {image_path}")
    labels = atlas_to_freesurfer(np.rint(atlas.array).astype(np.int32), read_atlas_names(names_path))
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    cases = {name: (image.array, labels, image.ijk_to_ras)}
    flipped_image, flipped_geometry = mirror_i(image.array, image.ijk_to_ras)
    cases[f"{name}_flipped"] = (flipped_image, mirror_i(labels, image.ijk_to_ras)[0], flipped_geometry)
    for case, (img, lab, geometry) in cases.items():
        write_volume(folder / "imagesTr" / f"{case}.nii.gz", img, geometry)
        write_labelmap(folder / "labelsTr" / f"{case}.nii.gz", lab, geometry)
    label_names = {"0": "background"}
    for structure, (left, right) in ATLAS_STRUCTURES.items():
        label_names[str(left)] = f"left_{structure.lower()}"
        label_names[str(right)] = f"right_{structure.lower()}"
    meta = {"name": f"{name}-aal", "modality": {"0": "MRI"}, "labels": label_names,
            "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases]}
    (folder / "dataset.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    (folder / "split.json").write_text(json.dumps({"val": list(cases)}), encoding="utf-8")
    return {int(k): v for k, v in label_names.items() if k != "0"}


def laterality(label_map: np.ndarray, ijk_to_ras: np.ndarray, value: int, left: bool, midline_x: float) -> float:
    """Share of the voxels labelled ``value`` whose RAS x lies on the structure's side (RAS: +x is the
    patient's right, so the left lies at x < midline)."""
    k, j, i = np.nonzero(label_map == value)
    if len(i) == 0:
        return float("nan")
    x = ijk_to_ras[0, 0] * i + ijk_to_ras[0, 1] * j + ijk_to_ras[0, 2] * k + ijk_to_ras[0, 3]
    return float(np.mean(x < midline_x) if left else np.mean(x > midline_x))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model name or directory")
    p.add_argument("--image", required=True, help="real MR volume (e.g. colin27 ch2.nii.gz)")
    p.add_argument("--atlas", required=True, help="atlas label map on the image's grid (e.g. aal.nii.gz)")
    p.add_argument("--names", required=True, help="atlas names, '<value> <name>' per line (aal.nii.txt)")
    p.add_argument("--name", default="colin27", help="case name")
    p.add_argument("--dataset-dir", default=None, help="where to write the MSD-layout copy (default: a temp folder)")
    p.add_argument("--save-predictions", default=None, help="write each case's label map here (NIfTI)")
    p.add_argument("--json", default=None, help="write all figures here")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    model = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dataset_dir or tmp)
        names = write_atlas_dataset(folder, args.name, Path(args.image), Path(args.atlas), Path(args.names))
        dataset = read_msd_dataset(folder, "val", prompt_table="brain-aal")
        pred_dir = Path(args.save_predictions or Path(tmp) / "predictions")
        summary = evaluate_volumes(model, dataset, save_predictions=pred_dir, device=args.device, distances=True)
        maps = {c: read_volume(pred_dir / f"{c}.nii.gz") for c in (args.name, f"{args.name}_flipped")}
        truth = read_volume(folder / "labelsTr" / f"{args.name}.nii.gz")
    original, flipped = maps[args.name], maps[f"{args.name}_flipped"]
    geometry = truth.ijk_to_ras
    kk, jj, ii = np.nonzero(truth.array > 0)
    midline = float(np.mean(geometry[0, 0] * ii + geometry[0, 1] * jj + geometry[0, 2] * kk + geometry[0, 3]))
    back = mirror_i(np.rint(flipped.array).astype(np.int16), flipped.ijk_to_ras)[0]
    pred = np.rint(original.array).astype(np.int16)
    rows = []
    for value, label in sorted(names.items(), key=lambda kv: kv[1]):
        case_rows = {r["case_id"]: r for r in summary["per_case"]}
        left = label.startswith("left_")
        rows.append({
            "structure": label, "value": value,
            "prompt": summary["labels"][label]["prompt"],
            "dice": case_rows[args.name][f"{label}_dice"],
            "dice_flipped_copy": case_rows[f"{args.name}_flipped"][f"{label}_dice"],
            "hd95_mm": case_rows[args.name][f"{label}_hd95"],
            "correct_side": laterality(pred, original.ijk_to_ras, value, left, midline),
            "flip_agreement_dice": dice_iou(pred == value, back == value)[0],
            "pred_voxels": int((pred == value).sum()), "true_voxels": int((truth.array == value).sum())})
    pairs = {}
    for r in rows:
        pairs.setdefault(r["structure"].split("_", 1)[1], []).append(r["dice"])
    result = {"model": model.name, "image": args.image, "midline_x_mm": midline, "rows": rows,
              "mean_dice": float(np.mean([r["dice"] for r in rows])),
              "pair_dice": {k: float(np.mean(v)) for k, v in pairs.items()},
              "min_correct_side": float(np.nanmin([r["correct_side"] for r in rows])),
              "identical_voxels_flip": float(np.mean(back == pred)),
              "slices_per_second": summary["slices_per_second"]}
    print(f"model {model.name} on {args.image} (atlas {args.atlas}); midline x = {midline:.1f} mm")
    print("| structure | prompt | Dice | Dice, flipped copy | HD95 mm | voxels on the correct side | "
          "flipped copy vs original (Dice) | predicted / atlas voxels |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['structure']} | {r['prompt']} | {r['dice']:.3f} | {r['dice_flipped_copy']:.3f} | "
              f"{r['hd95_mm']:.1f} | {100 * r['correct_side']:.1f} % | {r['flip_agreement_dice']:.3f} | "
              f"{r['pred_voxels']} / {r['true_voxels']} |")
    print(f"mean Dice over the 12 structures (6 pairs): {result['mean_dice']:.3f}; per pair: "
          + ", ".join(f"{k} {v:.3f}" for k, v in result["pair_dice"].items()))
    print(f"lowest share on the correct side: {100 * result['min_correct_side']:.1f} %; "
          f"voxels identical between the flipped copy (mirrored back) and the original: "
          f"{100 * result['identical_voxels_flip']:.3f} %")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
