"""Segmentation metrics, per image and pooled over a split.

Conventions (both always reported, always labelled):
- **per-image (mean) Dice / IoU**: score each image, then average over images.
- **global (pooled) Dice / IoU**: sum intersections and sizes over all images first, then one ratio.

Empty masks: when prediction and ground truth are both empty an image's Dice and IoU are 1 (a
correct "nothing here"); when exactly one is empty they are 0. HD95 and ASD are undefined when
either mask is empty: such images get NaN and are left out of the mean, and the count of images
that had a defined distance is reported beside it.

Laterality error rate: over the cases whose report names one side only, the fraction whose
prediction puts more than 10 % of its mass on the other half of the image (the dataset's own
left/right convention; an empty prediction is not a laterality error).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch


def dice_iou(pred: np.ndarray, target: np.ndarray) -> tuple[float, float, int, int, int]:
    """(dice, iou, |P and G|, |P|, |G|) for one pair of boolean masks."""
    p, g = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground truth shape {g.shape}")
    inter, ps, gs = int(np.logical_and(p, g).sum()), int(p.sum()), int(g.sum())
    if ps + gs == 0:
        return 1.0, 1.0, 0, 0, 0
    return 2 * inter / (ps + gs), inter / (ps + gs - inter), inter, ps, gs


def surface_distances(pred: np.ndarray, target: np.ndarray, spacing: tuple[float, ...] | None = None
                      ) -> tuple[float, float]:
    """(HD95, ASD) with MONAI; NaN when either mask is empty. ``spacing`` in mm per axis (default 1)."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    p, g = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if not p.any() or not g.any():
        return float("nan"), float("nan")
    pt = torch.from_numpy(p)[None, None]
    gt = torch.from_numpy(g)[None, None]
    kw = {"spacing": list(spacing)} if spacing is not None else {}
    with warnings.catch_warnings():  # MONAI 1.5+ deprecation notice raised from inside its own code
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = compute_hausdorff_distance(pt, gt, percentile=95, **kw)
        asd = compute_average_surface_distance(pt, gt, symmetric=True, **kw)
    return float(hd95.item()), float(asd.item())


def wrong_side_fraction(pred: np.ndarray, named_column: int) -> float:
    """Fraction of the predicted mask on the half a one-sided report does *not* name.

    ``named_column`` is the image half the report names (0 = left columns, 1 = right), split at
    the middle column (an odd middle column counts half to each side). 0 for an empty prediction.
    """
    p = np.asarray(pred, dtype=float)
    total = p.sum()
    if total == 0:
        return 0.0
    w = p.shape[-1]
    per_col = p.reshape(-1, w).sum(0)
    left = per_col[: w // 2].sum() + (0.5 * per_col[w // 2] if w % 2 else 0.0)
    wrong = total - left if named_column == 0 else left
    return float(wrong / total)


LATERALITY_ERROR_FRACTION = 0.10  # a one-sided case is a laterality error above 10 % wrong-side mass


@dataclass
class CaseScore:
    case_id: str
    dice: float
    iou: float
    intersection: int
    pred_size: int
    target_size: int
    hd95: float = float("nan")
    asd: float = float("nan")
    wrong_side: float | None = None  # wrong-side mass fraction, for one-sided reports only


@dataclass
class SegmentationScores:
    """Accumulates cases; :meth:`summary` gives both conventions."""

    cases: list[CaseScore] = field(default_factory=list)

    def add(self, case_id: str, pred: np.ndarray, target: np.ndarray, *, distances: bool = False,
            spacing: tuple[float, ...] | None = None, named_column: int | None = None) -> CaseScore:
        """Score one case; ``named_column`` (0 / 1) is the image half a one-sided report names."""
        dice, iou, inter, ps, gs = dice_iou(pred, target)
        score = CaseScore(case_id, dice, iou, inter, ps, gs)
        if named_column is not None:
            score.wrong_side = wrong_side_fraction(pred, named_column)
        if distances:
            score.hd95, score.asd = surface_distances(pred, target, spacing)
        self.cases.append(score)
        return score

    def summary(self) -> dict[str, float]:
        if not self.cases:
            raise ValueError("no cases were scored")
        inter = sum(c.intersection for c in self.cases)
        ps = sum(c.pred_size for c in self.cases)
        gs = sum(c.target_size for c in self.cases)
        hd = np.array([c.hd95 for c in self.cases], dtype=float)
        asd = np.array([c.asd for c in self.cases], dtype=float)
        defined = ~np.isnan(hd)
        sided = [c.wrong_side for c in self.cases if c.wrong_side is not None]
        laterality = {}
        if sided:
            laterality = {"laterality_cases": len(sided),
                          "laterality_error_rate": float(np.mean([w > LATERALITY_ERROR_FRACTION for w in sided]))}
        return {
            "cases": len(self.cases),
            "dice_per_image": float(np.mean([c.dice for c in self.cases])),
            "dice_global": 1.0 if ps + gs == 0 else 2 * inter / (ps + gs),
            "iou_per_image": float(np.mean([c.iou for c in self.cases])),
            "iou_global": 1.0 if ps + gs == 0 else inter / (ps + gs - inter),
            "hd95_mean": float(hd[defined].mean()) if defined.any() else float("nan"),
            "asd_mean": float(asd[defined].mean()) if defined.any() else float("nan"),
            "distance_cases": int(defined.sum()),
            **laterality,
        }


@dataclass
class UncertaintyScores:
    """How well a per-pixel uncertainty map points at the pixels the mask gets wrong.

    - ``uncertainty_auroc``: AUROC of uncertainty as a detector of misclassified pixels, pooled
      over every pixel of the split (histogram on a log scale, 4,000 bins + exact zero; ties
      count one half). 0.5 = no better than chance.
    - ``dice_*_confident90``: both Dice conventions after leaving out, in every image, the 10 %
      of its pixels with the highest uncertainty (from prediction and ground truth alike), beside
      the Dice of all pixels: the gain a reader gets by checking the flagged pixels.
    """

    bins: int = 4000
    drop_fraction: float = 0.10
    errors: np.ndarray = field(default_factory=lambda: np.zeros(4001))
    correct: np.ndarray = field(default_factory=lambda: np.zeros(4001))
    kept_dice: list[float] = field(default_factory=list)
    kept_inter: int = 0
    kept_sizes: int = 0

    def _bin(self, u: np.ndarray) -> np.ndarray:
        # bin 0 = exactly zero; then log10 from 1e-12 to 1 over the remaining bins
        logu = np.log10(np.clip(u, 1e-12, 1.0))
        idx = 1 + np.minimum(self.bins - 1, ((logu + 12.0) / 12.0 * self.bins).astype(np.int64))
        return np.where(u > 0, idx, 0)

    def add(self, pred: np.ndarray, target: np.ndarray, uncertainty: np.ndarray) -> None:
        p, g = np.asarray(pred, bool).ravel(), np.asarray(target, bool).ravel()
        u = np.asarray(uncertainty, np.float64).ravel()
        if not (p.shape == g.shape == u.shape):
            raise ValueError(f"prediction, ground truth and uncertainty differ in size: {p.shape}, {g.shape}, {u.shape}")
        wrong = p != g
        b = self._bin(u)
        self.errors += np.bincount(b[wrong], minlength=self.bins + 1)
        self.correct += np.bincount(b[~wrong], minlength=self.bins + 1)
        keep = np.ones(u.size, bool)
        keep[np.argsort(-u, kind="stable")[: int(round(self.drop_fraction * u.size))]] = False
        dice, _, inter, ps, gs = dice_iou(p[keep], g[keep])
        self.kept_dice.append(dice)
        self.kept_inter += inter
        self.kept_sizes += ps + gs

    def summary(self) -> dict[str, float]:
        n_err, n_ok = self.errors.sum(), self.correct.sum()
        auroc = float("nan")
        if n_err > 0 and n_ok > 0:
            below = np.concatenate([[0.0], np.cumsum(self.correct)[:-1]])
            auroc = float((self.errors * (below + 0.5 * self.correct)).sum() / (n_err * n_ok))
        return {"uncertainty_auroc": auroc,
                "dice_per_image_confident90": float(np.mean(self.kept_dice)) if self.kept_dice else float("nan"),
                "dice_global_confident90": 2 * self.kept_inter / self.kept_sizes if self.kept_sizes else 1.0}
