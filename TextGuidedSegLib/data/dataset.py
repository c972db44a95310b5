"""In-memory torch dataset: every case read, normalised and resized once (CPU training is I/O-free)."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..models.config import IntensityConfig
from ..preprocessing import normalize_intensity, resize_images, resize_masks
from .cases import SegmentationCase, read_grey, read_mask, read_rgb

logger = logging.getLogger(__name__)


class PreloadedDataset(Dataset):
    """Images at ``image_size`` (float16, [0, 1]), masks at ``image_size`` (uint8) and, when
    ``keep_native_masks``, the masks at native size for scoring. Items are dicts with ``image``
    [C, S, S], ``mask`` [1, S, S], ``text``, ``index``."""

    def __init__(self, cases: Sequence[SegmentationCase], image_size: int, intensity: IntensityConfig,
                 in_channels: int = 1, transforms: Callable | None = None, keep_native_masks: bool = False) -> None:
        self.cases = list(cases)
        if not self.cases:
            raise ValueError("dataset is empty: no cases were found for this split")
        self.transforms = transforms
        size = (image_size, image_size)
        images, masks, self.native_masks = [], [], []
        for case in self.cases:
            raw = read_grey(case.image_path) if in_channels == 1 else read_rgb(case.image_path).transpose(2, 0, 1)
            img = normalize_intensity(raw, intensity)
            img_t = torch.from_numpy(img if img.ndim == 3 else img[None])[None]
            images.append(resize_images(img_t, size)[0].half())
            mask = read_mask(case.mask_path)
            masks.append(resize_masks(torch.from_numpy(mask)[None, None], size)[0].to(torch.uint8))
            if keep_native_masks:
                self.native_masks.append(mask)
        self.images = torch.stack(images)
        self.masks = torch.stack(masks)
        logger.info("loaded %d cases at %dx%d", len(self.cases), image_size, image_size)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict:
        sample = {"image": self.images[i].float(), "mask": self.masks[i].float(),
                  "text": self.cases[i].text, "index": i}
        if self.transforms is not None:
            sample = self.transforms(sample)
            sample["image"] = _plain(sample["image"]).float()
            sample["mask"] = (_plain(sample["mask"]) > 0.5).float()
        return sample


def _plain(x) -> torch.Tensor:
    """MONAI returns MetaTensors; training wants plain tensors (cheaper collation, no metadata)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(np.asarray(x))


def collate(batch: list[dict]) -> dict:
    return {"image": torch.stack([torch.as_tensor(b["image"]) for b in batch]),
            "mask": torch.stack([torch.as_tensor(b["mask"]) for b in batch]),
            "text": [b["text"] for b in batch],
            "index": torch.tensor([b["index"] for b in batch])}
