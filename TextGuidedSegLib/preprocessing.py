"""Intensity normalisation and resizing, written once for training and inference alike.

Normalisation is split in two so the engine can work one batch of slices at a time:
:func:`intensity_range` finds ``(lo, hi)`` once per volume (from a bounded sample of voxels
for large volumes) and :func:`apply_intensity_range` maps any part of the volume with them.
:func:`normalize_intensity` does both on a whole array with exact statistics.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .models.config import IntensityConfig

#: Voxels drawn to estimate percentiles of a larger array. The sampled percentile lies within
#: about 0.007 percentile points (one standard deviation, in rank) of the exact one at the
#: 0.5 / 99.5 percentiles; the tests hold it to 0.05 points.
PERCENTILE_SAMPLES = 1 << 20
_SAMPLE_SEED = 0  # fixed: the same volume always gets the same statistics


def sample_voxels(array: np.ndarray, max_samples: int | None = PERCENTILE_SAMPLES) -> np.ndarray:
    """Up to ``max_samples`` voxels of ``array`` as a flat float32 array (all of them when it is smaller).

    Stratified: the flat (C-order) array is cut into ``max_samples`` equal runs and one voxel is
    drawn at random from each run (fixed seed), so the sample covers the whole volume evenly and
    the same volume always gives the same sample. Works on views of any strides without copying
    the array; index arrays are made a chunk of runs at a time, so the work memory is the sample
    plus about 2 MB.
    """
    return _sample(np.asarray(array), max_samples).astype(np.float32)


def _sample(a: np.ndarray, max_samples: int | None) -> np.ndarray:
    """:func:`sample_voxels` in the array's own dtype (flat; the array itself when small enough)."""
    n = a.size
    if max_samples is None or n <= max_samples:
        return a.reshape(-1)
    m = int(max_samples)
    out = np.empty(m, dtype=a.dtype)
    flat = a.reshape(-1) if a.flags.c_contiguous else None
    rng = np.random.default_rng(_SAMPLE_SEED)
    chunk = 1 << 16
    for r0 in range(0, m, chunk):
        bounds = (np.arange(r0, min(r0 + chunk, m) + 1, dtype=np.int64) * n) // m  # run r: bounds[r]..bounds[r + 1]
        idx = bounds[:-1] + rng.integers(0, np.diff(bounds))
        out[r0:r0 + len(idx)] = flat[idx] if flat is not None else a[np.unravel_index(idx, a.shape)]
    return out


def percentiles(values: np.ndarray, q: Sequence[float]) -> list[float]:
    """``np.percentile(values.astype(np.float32), q)`` (linear interpolation) for a list ``q``.

    8- and 16-bit integer and bool values (CT, most MR, X-ray pictures) are counted with
    ``np.bincount`` instead of partitioned: the same order statistics, interpolated exactly as
    numpy does, several times faster. Other dtypes go to ``np.percentile``.
    """
    v = np.asarray(values).reshape(-1)
    if v.dtype == bool:
        v = v.view(np.uint8)
    if not (np.issubdtype(v.dtype, np.integer) and v.dtype.itemsize <= 2):
        return [float(x) for x in np.percentile(v.astype(np.float32), list(q))]
    n = v.size
    base = int(v.min())
    counts = np.bincount(v.astype(np.int32) - base if base or v.dtype.kind == "i" else v)
    cumulative = np.cumsum(counts)
    # numpy's "linear" method: virtual index (n - 1) * q, its neighbours, and numpy's _lerp
    virtual = (n - 1) * np.true_divide(np.asarray(q, dtype=np.float64), 100)
    previous = np.floor(virtual)
    above = virtual >= n - 1
    previous[above] = n - 1
    gamma = virtual - np.where(above, -1.0, previous)  # numpy subtracts its index -1 there (no effect: a == b)
    lower = previous.astype(np.int64)
    upper = np.minimum(lower + 1, n - 1)
    a = (base + np.searchsorted(cumulative, lower, side="right")).astype(np.float32)
    b = (base + np.searchsorted(cumulative, upper, side="right")).astype(np.float32)
    diff = b - a
    result = np.add(a, diff * gamma)
    np.subtract(b, diff * (1 - gamma), out=result, where=gamma >= 0.5)
    return [float(x) for x in result]


def intensity_range(array: np.ndarray, cfg: IntensityConfig,
                    max_samples: int | None = PERCENTILE_SAMPLES) -> tuple[float, float]:
    """``(lo, hi)`` raw values that map to 0 and 1.

    ``percentile``: the ``cfg.lower`` / ``cfg.upper`` percentiles (linear interpolation) of the
    voxels as float32, from :func:`sample_voxels` when the array holds more than ``max_samples``
    voxels (``None``: always exact), see :func:`percentiles`. ``minmax``: the exact min and max.
    ``window``: from the config.
    """
    if cfg.mode == "window":
        return float(cfg.center - cfg.width / 2), float(cfg.center + cfg.width / 2)
    a = np.asarray(array)
    if cfg.mode == "percentile":
        lo, hi = percentiles(_sample(a, max_samples), [cfg.lower, cfg.upper])
        return lo, hi
    # min / max of the native values (no float copy); float32 rounding is monotonic, so this
    # equals the min / max of the float32 voxels
    return float(np.float32(a.min())), float(np.float32(a.max()))


def apply_intensity_range(array: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``clip((array - lo) / (hi - lo), 0, 1)`` as a new float32 array (all zeros when ``hi <= lo``).

    Three passes over a new float32 array (convert-and-subtract, divide, clip), the same
    arithmetic as on a float32 copy of the input; ``array`` may be a view of any strides and is
    never modified. No float64 array is made.
    """
    a = np.asarray(array)
    out = np.empty(a.shape, dtype=np.float32)
    if hi <= lo:
        out.fill(0.0)
        return out
    np.subtract(a, np.float32(lo), out=out, dtype=np.float32)  # both sides as float32, like (float32(a) - lo)
    np.divide(out, hi - lo, out=out)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def normalize_intensity(array: np.ndarray, cfg: IntensityConfig) -> np.ndarray:
    """Map raw values to float32 in [0, 1] as the model's config says.

    Non-finite voxels (NaN, +-Inf) are refused by the callers before this point; the statistics
    here are exact, taken over the whole array (one volume, or one 2D image).
    """
    return apply_intensity_range(array, *intensity_range(array, cfg, max_samples=None))


def resize_images(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``[N, C, H, W]`` images (bilinear, antialiased when shrinking)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def resize_probabilities(p: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``[N, 1, H, W]`` probabilities back to the slice size (linear, as the design says)."""
    if tuple(p.shape[-2:]) == tuple(size):
        return p
    return F.interpolate(p, size=size, mode="bilinear", align_corners=False)


def resize_masks(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize binary ``[N, 1, H, W]`` masks: area-weighted, then >= 0.5 (keeps thin structures fair)."""
    if tuple(m.shape[-2:]) == tuple(size):
        return m.bool()
    return resize_images(m.float(), size) >= 0.5
