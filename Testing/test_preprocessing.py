"""Intensity statistics from a bounded voxel sample, and normalisation that works one batch at a time."""

from __future__ import annotations

import numpy as np
import pytest

from TextGuidedSegLib.models.config import IntensityConfig
from TextGuidedSegLib.preprocessing import (PERCENTILE_SAMPLES, apply_intensity_range, intensity_range,
                                            normalize_intensity, percentiles, sample_voxels)

PERCENTILE_TOLERANCE = 0.05  # percentile points (rank), the tolerance preprocessing.py states


def ct_like(shape, seed=0) -> np.ndarray:
    """int16 with a CT's mixture: air, fat, soft tissue, a bone tail, and a smooth field so the
    values depend on position (a sample that missed a region would show it)."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(4, size=shape, p=[0.35, 0.15, 0.45, 0.05])
    centre = np.array([-1000.0, -90.0, 45.0, 700.0])[kind]
    spread = np.array([5.0, 20.0, 15.0, 300.0])[kind]
    field = np.linspace(-30, 30, shape[0])[:, None, None]
    return np.clip(centre + spread * rng.standard_normal(shape) + field, -1024, 3071).astype(np.int16)


def exact_percentile(array, q) -> float:
    return float(np.percentile(array.astype(np.float32), [q])[0])  # a list, as the library asks: same interpolation


@pytest.mark.parametrize("make", [
    lambda: ct_like((24, 256, 256)),
    lambda: np.random.default_rng(1).gamma(2.0, 40.0, size=(30, 181, 217)).astype(np.float32),  # MR-like
    lambda: np.random.default_rng(2).integers(0, 256, size=(1, 1500, 1400)).astype(np.uint8),  # a big 2D image
], ids=["ct-int16", "mr-float32", "xray-uint8"])
def test_sampled_percentiles_within_tolerance_of_exact(make):
    vol = make()
    assert vol.size > PERCENTILE_SAMPLES, "the volume must be large enough to be sampled"
    cfg = IntensityConfig(mode="percentile", lower=0.5, upper=99.5)
    lo, hi = intensity_range(vol, cfg)
    exact_lo, exact_hi = intensity_range(vol, cfg, max_samples=None)
    assert (exact_lo, exact_hi) == (exact_percentile(vol, 0.5), exact_percentile(vol, 99.5))
    for value, q in ((lo, 0.5), (hi, 99.5)):
        assert exact_percentile(vol, q - PERCENTILE_TOLERANCE) <= value <= exact_percentile(vol, q + PERCENTILE_TOLERANCE)
    # in intensity terms: well under 1% of the window the model sees
    assert abs(lo - exact_lo) <= 0.005 * (exact_hi - exact_lo)
    assert abs(hi - exact_hi) <= 0.005 * (exact_hi - exact_lo)


def test_small_arrays_use_every_voxel():
    vol = ct_like((5, 64, 64))
    cfg = IntensityConfig()
    assert intensity_range(vol, cfg) == intensity_range(vol, cfg, max_samples=None)
    np.testing.assert_array_equal(sample_voxels(vol), vol.reshape(-1).astype(np.float32))


def test_sample_is_bounded_deterministic_and_independent_of_strides():
    vol = ct_like((20, 200, 300))
    s = sample_voxels(vol, max_samples=10_000)
    assert s.shape == (10_000,) and s.dtype == np.float32
    np.testing.assert_array_equal(s, sample_voxels(vol, max_samples=10_000))
    # a flipped / transposed view samples the same voxels as its contiguous copy
    view = vol.transpose(2, 0, 1)[::-1, :, ::-1]
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(sample_voxels(view, max_samples=10_000),
                                  sample_voxels(np.ascontiguousarray(view), max_samples=10_000))
    # stratified: each of the 10,000 runs of the flat array gives one voxel
    flat_index = np.arange(vol.size).reshape(vol.shape)
    picked = sample_voxels(flat_index.astype(np.float32), max_samples=10_000).astype(np.int64)
    runs = picked * 10_000 // vol.size
    np.testing.assert_array_equal(runs, np.arange(10_000))


def test_minmax_and_window_ranges_are_exact():
    vol = ct_like((24, 256, 256))
    assert intensity_range(vol, IntensityConfig(mode="minmax")) == (float(vol.min()), float(vol.max()))
    assert intensity_range(vol, IntensityConfig(mode="window", center=40.0, width=400.0)) == (-160.0, 240.0)


def test_normalize_intensity_is_the_full_volume_formula():
    rng = np.random.default_rng(4)
    vol = rng.normal(100.0, 30.0, size=(6, 40, 50))  # float64 input
    cfg = IntensityConfig(lower=2.0, upper=98.0)
    a = vol.astype(np.float32)
    lo, hi = (float(v) for v in np.percentile(a, [2.0, 98.0]))
    expected = np.clip((a - lo) / (hi - lo), 0.0, 1.0)
    out = normalize_intensity(vol, cfg)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


def test_apply_range_per_batch_equals_whole_volume_and_leaves_input_alone():
    vol = np.random.default_rng(5).normal(size=(9, 30, 20)).astype(np.float32)
    before = vol.copy()
    lo, hi = -1.0, 1.5
    whole = apply_intensity_range(vol, lo, hi)
    batches = np.concatenate([apply_intensity_range(vol[s:s + 4], lo, hi) for s in range(0, 9, 4)])
    np.testing.assert_array_equal(whole, batches)
    np.testing.assert_array_equal(vol, before)  # float32 input is copied, never normalised in place
    assert whole.dtype == np.float32 and 0.0 <= whole.min() and whole.max() <= 1.0
    for dtype in (np.int16, np.uint8, np.float64, bool):
        assert apply_intensity_range(vol.astype(dtype), lo, hi).dtype == np.float32
    flat = apply_intensity_range(vol, 2.0, 2.0)
    assert flat.dtype == np.float32 and not flat.any()


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.uint16, np.int8, bool, np.float32, np.float64, np.int32])
def test_histogram_percentiles_equal_numpy_exactly(dtype):
    """Integer volumes take their percentiles from a histogram: bit for bit what np.percentile gives."""
    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 10, 999, 20_000, 300_001):
        for qs in ([0.5, 99.5], [0.0, 100.0], [2.0, 98.0], [13.37, 50.0], [99.9, 100.0]):
            if dtype is bool:
                v = rng.random(n) < 0.3
            elif np.issubdtype(dtype, np.integer):
                info = np.iinfo(dtype)
                lo = int(rng.integers(info.min, max(info.min + 1, min(info.max, 1000))))
                v = rng.integers(lo, min(info.max, lo + 5000) + 1, size=n).astype(dtype)
            else:
                v = rng.normal(0, 100, size=n).astype(dtype)
            expected = [float(x) for x in np.percentile(v.astype(np.float32), qs)]
            assert percentiles(v, qs) == expected, (n, qs)
