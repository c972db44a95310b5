"""Intensity normalisation and resizing, written once for training and inference alike."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .models.config import IntensityConfig


def normalize_intensity(array: np.ndarray, cfg: IntensityConfig) -> np.ndarray:
    """Map raw values to float32 in [0, 1] as the model's config says.

    Non-finite voxels (NaN, +-Inf) are refused by the callers before this point; the statistics
    here are taken over the whole array (one volume, or one 2D image).
    """
    a = np.asarray(array, dtype=np.float32)
    if cfg.mode == "window":
        lo, hi = cfg.center - cfg.width / 2, cfg.center + cfg.width / 2
    elif cfg.mode == "percentile":
        lo, hi = (float(v) for v in np.percentile(a, [cfg.lower, cfg.upper]))
    else:
        lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


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
