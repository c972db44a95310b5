"""Augmentation as MONAI dictionary transforms on ``{"image", "mask", "text"}`` samples.

A horizontal flip changes which side is "left": :class:`RandFlipWithTextd` flips the image and the
mask *and* swaps 'left'/'right' in the text. 90-degree rotations are not offered, because they turn
"upper" into "left" and no text rewrite can follow them for oblique wording.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.transforms import (Compose, MapTransform, RandAdjustContrastd, RandAffined, RandGaussianNoised,
                              Randomizable)

from ..text import swap_left_right


class RandFlipWithTextd(Randomizable, MapTransform):
    """With probability ``prob``: flip ``image`` and ``mask`` left-right and swap left/right in ``text``."""

    def __init__(self, prob: float = 0.5, keys: tuple[str, ...] = ("image", "mask"), text_key: str = "text") -> None:
        MapTransform.__init__(self, keys)
        self.prob = prob
        self.text_key = text_key
        self._do = False

    def randomize(self, data: Any = None) -> None:
        self._do = self.R.rand() < self.prob

    def __call__(self, data: dict) -> dict:
        self.randomize()
        if not self._do:
            return data
        d = dict(data)
        for key in self.keys:
            d[key] = torch.flip(torch.as_tensor(d[key]), dims=(-1,))
        d[self.text_key] = swap_left_right(d[self.text_key])
        return d


@dataclass
class AugmentConfig:
    """Augmentation strengths (0 disables each). Rotation in degrees, translate as a fraction of size."""

    rotate_deg: float = 10.0
    scale: float = 0.1
    translate: float = 0.05
    affine_prob: float = 0.5
    flip_prob: float = 0.0
    contrast_prob: float = 0.3
    noise_prob: float = 0.0


def build_train_transforms(cfg: AugmentConfig, image_size: int) -> Compose:
    ts: list = []
    if cfg.affine_prob > 0:
        ts.append(RandAffined(keys=("image", "mask"), prob=cfg.affine_prob,
                              rotate_range=(math.radians(cfg.rotate_deg),), scale_range=(cfg.scale, cfg.scale),
                              translate_range=(cfg.translate * image_size,) * 2, mode=("bilinear", "nearest"),
                              padding_mode="zeros"))
    if cfg.flip_prob > 0:
        ts.append(RandFlipWithTextd(prob=cfg.flip_prob))
    if cfg.contrast_prob > 0:
        ts.append(RandAdjustContrastd(keys="image", prob=cfg.contrast_prob, gamma=(0.7, 1.5)))
    if cfg.noise_prob > 0:
        ts.append(RandGaussianNoised(keys="image", prob=cfg.noise_prob, std=0.02))
    return Compose(ts)


def seed_transforms(transforms: Compose, seed: int) -> None:
    """Seed every random transform (per epoch, so a resumed run replays the same augmentations)."""
    transforms.set_random_state(seed=int(np.uint32(seed)))
