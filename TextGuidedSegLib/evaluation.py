"""Score a model on a dataset split through the same engine users run.

Every case goes through :func:`segment_volume` as a one-slice volume with the reader's laterality
convention, at the image's native size, threshold 0.5; ground truth is > 127. Predictions can be
written as ``<case id>.png`` (0 / 255, native size) so anyone can re-score them.
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
from .data import SegmentationCase, read_grey, read_mask
from .engine import segment_volume
from .guidance import side_columns
from .metrics import SegmentationScores, UncertaintyScores
from .text.hybrid import parse_report

logger = logging.getLogger(__name__)

# A 2D image file has no orientation: its columns run to the patient's left and rows down, as stored
# (SimpleITK's identity direction in LPS, i.e. IJK->RAS = diag(-1, -1, 1)).
IMAGE_IJK_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def evaluate_cases(model: LoadedModel, cases: Sequence[SegmentationCase], *, save_predictions: str | Path | None = None,
                   per_case_csv: str | Path | None = None, distances: bool = True, device: str | None = None,
                   threshold: float = 0.5, samples: int | None = None, seed: int = 0, use_text: bool = True,
                   progress: Callable[[int, int], None] | None = None,
                   cancel: threading.Event | None = None) -> dict[str, float]:
    """Both Dice conventions, IoU, HD95, ASD (pixels), slices/s over ``cases``, and the laterality
    error rate over the cases whose text names one side only (see :mod:`TextGuidedSegLib.metrics`).
    Models that sample masks (``samples`` > 1) are also scored on how well their uncertainty
    flags their errors (:class:`TextGuidedSegLib.metrics.UncertaintyScores`).
    ``use_text=False`` runs a text-free model (ProLearn) with no prompt; the cases' reports still
    decide which cases count for the laterality error rate."""
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
                                prompt_laterality=case.laterality, samples=samples, seed=seed, cancel=cancel)[0]
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
    if per_case_csv:
        with open(per_case_csv, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return summary
