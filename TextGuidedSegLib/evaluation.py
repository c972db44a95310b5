"""Score a model on a dataset split through the same engine users run.

2D datasets (:func:`evaluate_cases`): every case goes through :func:`segment_volume` as a one-slice
volume with the reader's laterality convention, at the image's native size, threshold 0.5; ground
truth is > 127. Predictions can be written as ``<case id>.png`` (0 / 255, native size) so anyone can re-score them.

Volume datasets (:func:`evaluate_volumes`): one prompt per label, a multi-label answer, 3D Dice,
HD95 and ASD in mm per volume and label, mean and sd over volumes; predictions written as
``<case id>.nii.gz`` label maps on each case's own grid.
"""

from __future__ import annotations

import csv
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .checkpoint import LoadedModel
from .ensemble import Ensemble
from .data import SegmentationCase, read_grey, read_mask
from .engine import segment_volume
from .guidance import side_columns
from .metrics import SegmentationScores, UncertaintyScores, dice_iou, surface_distances
from .text.hybrid import parse_report

logger = logging.getLogger(__name__)

# A 2D image file has no orientation: its columns run to the patient's left and rows down, as stored
# (SimpleITK's identity direction in LPS, i.e. IJK->RAS = diag(-1, -1, 1)).
IMAGE_IJK_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def evaluate_cases(model: LoadedModel | Ensemble, cases: Sequence[SegmentationCase], *,
                   save_predictions: str | Path | None = None,
                   per_case_csv: str | Path | None = None, distances: bool = True, device: str | None = None,
                   threshold: float = 0.5, samples: int | None = None, seed: int = 0, use_text: bool = True,
                   flip: bool = False, progress: Callable[[int, int], None] | None = None,
                   cancel: threading.Event | None = None) -> dict[str, float]:
    """Both Dice conventions, IoU, HD95, ASD (pixels), slices/s over ``cases``, and the laterality
    error rate over the cases whose text names one side only (see :mod:`TextGuidedSegLib.metrics`).
    Models that sample masks (``samples`` > 1) are also scored on how well their uncertainty
    flags their errors (:class:`TextGuidedSegLib.metrics.UncertaintyScores`).
    ``use_text=False`` runs a text-free model (ProLearn) with no prompt; the cases' reports still
    decide which cases count for the laterality error rate. ``model`` may be an
    :class:`~TextGuidedSegLib.ensemble.Ensemble` (its uncertainty, the members' disagreement, is then
    scored like sampled masks'); ``flip`` is the engine's text-aware test-time flip.
    ``seconds_per_case``: engine time per image (reading and scoring not counted)."""
    if not cases:
        raise ValueError("no cases to evaluate")
    pred_dir = Path(save_predictions) if save_predictions else None
    if pred_dir is not None:
        pred_dir.mkdir(parents=True, exist_ok=True)
    scores = SegmentationScores()
    uncertainty = UncertaintyScores()
    engine_seconds = 0.0
    rows = []
    for n, case in enumerate(cases, 1):
        image = read_grey(case.image_path)
        truth = read_mask(case.mask_path)
        start = time.perf_counter()
        result = segment_volume(image, IMAGE_IJK_TO_RAS, [case.text] if case.text and use_text else None, model,
                                batch_size=1, threshold=threshold, device=device,
                                prompt_laterality=case.laterality, samples=samples, seed=seed, flip=flip,
                                cancel=cancel)[0]
        engine_seconds += time.perf_counter() - start
        pred = result.labels[0].astype(bool)
        if pred.shape != truth.shape:
            raise ValueError(f"case {case.case_id}: image {pred.shape} and mask {truth.shape} differ in size")
        side = parse_report(case.text).unilateral_side if case.text else None
        named_column = side_columns(case.laterality)[side] if side else None
        score = scores.add(case.case_id, pred, truth, distances=distances, named_column=named_column)
        if result.uncertainty is not None:
            uncertainty.add(pred, truth, result.uncertainty[0])
        rows.append({"case_id": case.case_id, "dice": score.dice, "iou": score.iou, "hd95": score.hd95,
                     "asd": score.asd, "wrong_side": score.wrong_side, "pred_pixels": score.pred_size, "true_pixels": score.target_size,
                     "text": case.text})
        if pred_dir is not None:
            Image.fromarray((pred * 255).astype(np.uint8)).save(pred_dir / f"{case.case_id}.png")
        if progress is not None:
            progress(n, len(cases))
    summary = scores.summary()
    if uncertainty.kept_dice:
        summary.update(uncertainty.summary())
    summary["slices_per_second"] = len(cases) / engine_seconds if engine_seconds > 0 else float("nan")
    summary["seconds_per_case"] = engine_seconds / len(cases)
    if per_case_csv:
        with open(per_case_csv, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return summary


# ----------------------------------------------------------------------------- volumes (MSD / nnU-Net)
def multi_label_map(probabilities: Sequence[np.ndarray], values: Sequence[int], threshold: float = 0.5) -> np.ndarray:
    """One label map from one probability volume per label: at each voxel the label with the highest
    probability wins, if that probability is >= ``threshold`` (else background 0)."""
    if len(probabilities) != len(values) or not probabilities:
        raise ValueError("need one probability volume per label value")
    stack = np.stack([np.asarray(p, dtype=np.float32) for p in probabilities])
    best = stack.argmax(0)
    out = np.asarray(values, dtype=np.int64)[best]
    out[stack.max(0) < threshold] = 0
    return out.astype(np.uint8 if max(values) < 256 else np.uint16)


def spacing_kji(ijk_to_ras: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the array axes (k, j, i)."""
    s = np.linalg.norm(np.asarray(ijk_to_ras, dtype=float)[:3, :3], axis=0)  # i, j, k
    return float(s[2]), float(s[1]), float(s[0])


def summarise_volume_scores(rows: Sequence[dict], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per name: mean and sample sd (ddof 1) over volumes of Dice, HD95 and ASD (mm), and pooled Dice.

    Dice: a volume where prediction and ground truth are both empty counts 1 (the hippocampus
    crops always hold both labels). HD95 / ASD: volumes where either mask is empty are left out
    and ``distance_cases`` counts the others."""
    out: dict[str, dict[str, float]] = {}
    for name in names:
        dice = np.array([r[f"{name}_dice"] for r in rows], dtype=float)
        hd = np.array([r[f"{name}_hd95"] for r in rows], dtype=float)
        asd = np.array([r[f"{name}_asd"] for r in rows], dtype=float)
        inter = sum(r[f"{name}_intersection"] for r in rows)
        sizes = sum(r[f"{name}_pred_voxels"] + r[f"{name}_true_voxels"] for r in rows)
        ok = ~np.isnan(hd)

        def sd(a: np.ndarray) -> float:
            return float(a.std(ddof=1)) if a.size > 1 else 0.0

        out[name] = {"dice_mean": float(dice.mean()), "dice_sd": sd(dice),
                     "dice_global": 1.0 if sizes == 0 else 2 * inter / sizes,
                     "hd95_mean": float(hd[ok].mean()) if ok.any() else float("nan"), "hd95_sd": sd(hd[ok]),
                     "asd_mean": float(asd[ok].mean()) if ok.any() else float("nan"), "asd_sd": sd(asd[ok]),
                     "cases": int(dice.size), "distance_cases": int(ok.sum())}
    return out


def evaluate_volumes(model: LoadedModel | Ensemble, dataset, *, save_predictions: str | Path | None = None,
                     per_case_csv: str | Path | None = None, distances: bool = True, device: str | None = None,
                     threshold: float = 0.5, axis: str | int = "auto", unions: bool = True, flip: bool = False,
                     progress: Callable[[int, int], None] | None = None,
                     cancel: threading.Event | None = None) -> dict:
    """Score a model on the volumes of an :class:`TextGuidedSegLib.data.msd.MSDDataset` split.

    Each volume is segmented by :func:`segment_volume` once per label, with that label's canonical
    prompt; the multi-label answer takes, voxel by voxel, the label whose probability is highest
    and >= ``threshold`` (:func:`multi_label_map`). Per volume and per label: Dice, HD95 and ASD
    in mm (MONAI, from the volume's spacing); then mean and sd over volumes
    (:func:`summarise_volume_scores`). Union targets of the prompt table (e.g. "hippocampus" =
    anterior + posterior) are scored too, from their own prompt, against the union of their labels.
    ``flip``: the engine's text-aware test-time flip. ``save_predictions``: ``DIR/<case id>.nii.gz``, the
    label map with the dataset's label values on the case's own grid (origin, spacing, direction of
    the image file).
    """
    from .data.msd import read_case
    from .io import write_labelmap

    cases = list(dataset.cases)
    if not cases:
        raise ValueError("no cases to evaluate")
    per_label = dataset.prompts.per_label()
    union_targets = [t for t in dataset.prompts.targets if len(t.labels) > 1] if unions else []
    names = [t.name for t in per_label]
    pred_dir = Path(save_predictions) if save_predictions else None
    if pred_dir is not None:
        pred_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    engine_seconds, n_slices = 0.0, 0
    for n, case in enumerate(cases, 1):
        volume, ijk_to_ras, truth = read_case(case)
        if truth is None:
            raise ValueError(f"case {case.case_id} has no label map in labelsTr: it cannot be scored")
        start = time.perf_counter()
        results = segment_volume(volume, ijk_to_ras, [t.prompt for t in per_label + union_targets], model,
                                 axis=axis, threshold=threshold, device=device, return_probability=True,
                                 flip=flip, cancel=cancel)
        engine_seconds += time.perf_counter() - start
        n_slices += sum(r.slices for r in results)
        labels = multi_label_map([r.probability for r in results[: len(per_label)]],
                                 [t.labels[0] for t in per_label], threshold)
        if pred_dir is not None:
            write_labelmap(pred_dir / f"{case.case_id}.nii.gz", labels, ijk_to_ras)
        spacing = spacing_kji(ijk_to_ras)
        row: dict = {"case_id": case.case_id}
        scored = [(t.name, labels == t.labels[0], np.isin(truth, t.labels)) for t in per_label]
        scored += [(t.name, r.labels.astype(bool), np.isin(truth, t.labels))
                   for t, r in zip(union_targets, results[len(per_label):])]
        for name, pred, gt in scored:
            dice, _, inter, ps, gs = dice_iou(pred, gt)
            hd95, asd = surface_distances(pred, gt, spacing) if distances else (float("nan"), float("nan"))
            row.update({f"{name}_dice": dice, f"{name}_hd95": hd95, f"{name}_asd": asd,
                        f"{name}_intersection": inter, f"{name}_pred_voxels": ps, f"{name}_true_voxels": gs})
        rows.append(row)
        if progress is not None:
            progress(n, len(cases))
    if per_case_csv:
        with open(per_case_csv, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return {"cases": len(cases),
            "labels": {t.name: {"values": list(t.labels), "prompt": t.prompt} for t in per_label},
            "unions": {t.name: {"values": list(t.labels), "prompt": t.prompt} for t in union_targets},
            "scores": summarise_volume_scores(rows, names + [t.name for t in union_targets]),
            "per_case": rows, "threshold": threshold,
            "slices_per_second": n_slices / engine_seconds if engine_seconds > 0 else float("nan")}


def format_volume_summary(summary: dict) -> list[str]:
    """Printable lines: one per label (and union), mean +- sd over volumes."""
    lines = []
    for group, title in (("labels", "label"), ("unions", "union")):
        for name, info in summary[group].items():
            s = summary["scores"][name]
            lines.append(f"  {title} {'+'.join(str(v) for v in info['values'])} {name!r} (prompt {info['prompt']!r}): "
                         f"Dice {s['dice_mean']:.4f} +- {s['dice_sd']:.4f} (pooled {s['dice_global']:.4f}); "
                         f"HD95 {s['hd95_mean']:.2f} +- {s['hd95_sd']:.2f} mm; ASD {s['asd_mean']:.2f} +- "
                         f"{s['asd_sd']:.2f} mm ({s['distance_cases']} of {s['cases']} volumes with both masks)")
    return lines
