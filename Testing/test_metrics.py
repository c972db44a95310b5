"""Metrics: Dice / IoU by hand, per-image vs global pooling, HD95 / ASD and empty-mask rules."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from TextGuidedSegLib.metrics import SegmentationScores, dice_iou, surface_distances


def masks(*rows: str) -> np.ndarray:
    """``masks("10", "01")`` -> boolean array."""
    return np.array([[c == "1" for c in r] for r in rows])


# ----------------------------------------------------------------------------- Dice / IoU
@pytest.mark.parametrize("pred, gt, expected", [
    # identical
    (masks("11", "00"), masks("11", "00"), (1.0, 1.0, 2, 2, 2)),
    # one of two pixels overlaps: Dice 2*1/(2+2), IoU 1/3
    (masks("11", "00"), masks("10", "10"), (0.5, 1 / 3, 1, 2, 2)),
    # P inside G: Dice 2*1/(1+3), IoU 1/3
    (masks("10", "00"), masks("11", "10"), (0.5, 1 / 3, 1, 1, 3)),
    # disjoint
    (masks("10", "00"), masks("01", "00"), (0.0, 0.0, 0, 1, 1)),
    # 3 of 4 predicted, 4 true: Dice 6/7, IoU 3/4
    (masks("11", "10"), masks("11", "11"), (6 / 7, 3 / 4, 3, 3, 4)),
])
def test_dice_iou_hand_computed(pred, gt, expected):
    dice, iou, inter, ps, gs = dice_iou(pred, gt)
    assert (inter, ps, gs) == expected[2:]
    assert dice == pytest.approx(expected[0])
    assert iou == pytest.approx(expected[1])
    # the two are tied: IoU = Dice / (2 - Dice)
    assert iou == pytest.approx(dice / (2 - dice))


def test_dice_iou_empty_rules():
    empty = np.zeros((4, 4), bool)
    some = empty.copy()
    some[1, 1] = True
    assert dice_iou(empty, empty) == (1.0, 1.0, 0, 0, 0)  # both empty: a correct "nothing here"
    assert dice_iou(some, empty)[:2] == (0.0, 0.0)
    assert dice_iou(empty, some)[:2] == (0.0, 0.0)


def test_dice_iou_accepts_uint8_and_refuses_shape_mismatch():
    assert dice_iou(np.array([[0, 255]], np.uint8), np.array([[0, 1]], np.uint8))[0] == 1.0
    with pytest.raises(ValueError, match="shape"):
        dice_iou(np.zeros((2, 2)), np.zeros((2, 3)))


# ----------------------------------------------------------------------------- pooling conventions
def test_per_image_vs_global():
    scores = SegmentationScores()
    # image 1: a 1-pixel lesion found exactly -> Dice 1, IoU 1
    g1 = np.zeros((10, 10), bool)
    g1[0, 0] = True
    scores.add("small", g1.copy(), g1)
    # image 2: a 100-pixel lesion, half of it predicted -> Dice 2*50/150 = 2/3, IoU 50/100
    g2 = np.ones((10, 10), bool)
    p2 = np.zeros((10, 10), bool)
    p2[:5] = True
    scores.add("large", p2, g2)
    s = scores.summary()
    assert s["cases"] == 2
    assert s["dice_per_image"] == pytest.approx((1 + 2 / 3) / 2)     # 0.8333
    assert s["dice_global"] == pytest.approx(2 * 51 / (2 + 150))     # 0.6711
    assert s["iou_per_image"] == pytest.approx((1 + 0.5) / 2)        # 0.75
    assert s["iou_global"] == pytest.approx(51 / (152 - 51))          # 0.5050
    assert s["dice_per_image"] - s["dice_global"] > 0.15
    assert math.isnan(s["hd95_mean"]) and s["distance_cases"] == 0  # distances not requested
    assert [c.case_id for c in scores.cases] == ["small", "large"]


def test_summary_all_empty_and_no_cases():
    scores = SegmentationScores()
    z = np.zeros((3, 3), bool)
    scores.add("a", z, z)
    s = scores.summary()
    assert s["dice_global"] == 1.0 and s["dice_per_image"] == 1.0 and s["iou_global"] == 1.0
    with pytest.raises(ValueError, match="no cases"):
        SegmentationScores().summary()


# ----------------------------------------------------------------------------- surface distances
def squares(shift: int = 2) -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros((32, 32), bool)
    gt[10:20, 10:20] = True
    pred = np.zeros((32, 32), bool)
    pred[10:20, 10 + shift:20 + shift] = True
    return pred, gt


def reference_distances(pred, gt, sampling=(1.0, 1.0)):
    """Edge pixels (mask minus its erosion) and Euclidean distance transforms, with scipy."""
    def edge(m):
        return m ^ ndimage.binary_erosion(m)

    def directed(a, b):
        return ndimage.distance_transform_edt(~edge(b), sampling=sampling)[edge(a)]

    d_pg, d_gp = directed(pred, gt), directed(gt, pred)
    hd95 = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    asd = np.concatenate([d_pg, d_gp]).mean()
    return hd95, asd


def test_hd95_asd_two_squares_offset_by_two():
    pred, gt = squares(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        hd95, asd = surface_distances(pred, gt)
    # By hand: each 10x10 square has 36 edge pixels. From the shifted square's edge to the other's:
    # 16 lie on the shared top/bottom rows (0), 4 are 1 px away ((10,20), (19,20), (11,12), (18,12))
    # and 16 are 2 px away -> max 2, 95th percentile 2, mean (4*1 + 16*2) / 36 = 1. Symmetric.
    assert hd95 == pytest.approx(2.0)
    assert asd == pytest.approx(1.0)
    assert (hd95, asd) == pytest.approx(reference_distances(pred, gt))


def test_distances_with_spacing_and_identical_masks():
    pred, gt = squares(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        hd95, asd = surface_distances(pred, gt, spacing=(2.0, 1.0))
        same = surface_distances(gt, gt)
        far = surface_distances(*squares(6))
    ref = reference_distances(pred, gt, sampling=(2.0, 1.0))
    assert (hd95, asd) == pytest.approx(ref, rel=1e-5)
    assert asd > 1.0  # rows are now 2 mm apart: some edge distances grew
    assert same == (0.0, 0.0)
    assert far[0] == pytest.approx(6.0) and far[1] > asd


def test_empty_masks_give_nan_and_are_left_out_of_the_mean():
    pred, gt = squares(2)
    empty = np.zeros_like(gt)
    assert all(math.isnan(v) for v in surface_distances(empty, gt))
    assert all(math.isnan(v) for v in surface_distances(pred, empty))
    scores = SegmentationScores()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scores.add("shift2", pred, gt, distances=True)
        scores.add("missed", empty, gt, distances=True)
        scores.add("exact", gt, gt, distances=True)
    assert math.isnan(scores.cases[1].hd95) and math.isnan(scores.cases[1].asd)
    s = scores.summary()
    assert s["distance_cases"] == 2
    assert s["hd95_mean"] == pytest.approx((2.0 + 0.0) / 2)
    assert s["asd_mean"] == pytest.approx((1.0 + 0.0) / 2)
    # the missed case still counts (as 0) for Dice: per-image (0.8 + 0 + 1) / 3
    assert s["dice_per_image"] == pytest.approx((2 * 80 / 200 + 0 + 1) / 3)


# ----------------------------------------------------------------------------- uncertainty
def test_uncertainty_auroc_and_confident_dice():
    from TextGuidedSegLib.metrics import UncertaintyScores

    truth = np.zeros((10, 10), bool)
    truth[2:6, 2:6] = True
    pred = truth.copy()
    pred[6, 2:6] = True                      # 4 wrong pixels
    perfect = np.zeros((10, 10))
    perfect[6, 2:6] = 0.2                    # uncertainty exactly on the errors
    s = UncertaintyScores()
    s.add(pred, truth, perfect)
    out = s.summary()
    assert out["uncertainty_auroc"] == pytest.approx(1.0)
    assert out["dice_per_image_confident90"] == pytest.approx(1.0)  # the errors are among the 10 % dropped
    useless = UncertaintyScores()
    useless.add(pred, truth, np.full((10, 10), 0.1))  # one value everywhere: chance
    assert useless.summary()["uncertainty_auroc"] == pytest.approx(0.5)
    backwards = UncertaintyScores()
    backwards.add(pred, truth, 0.2 - perfect)
    assert backwards.summary()["uncertainty_auroc"] == pytest.approx(0.0)
