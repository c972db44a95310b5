"""One case = image file + mask file + text, whatever the dataset layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class SegmentationCase:
    """A 2D training / evaluation case. ``laterality`` says what 'left' means in ``text``."""

    case_id: str
    image_path: Path
    mask_path: Path | None
    text: str
    laterality: str = "image"


def read_grey(path: str | Path) -> np.ndarray:
    """An image file as a 2D uint8 array (RGB is converted to luminance, as the readers declare)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)


def read_rgb(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as a boolean array; ground truth is foreground where the value is > 127."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127


def check_split(split: str, available: list[str], root: Path) -> None:
    if split not in available:
        raise ValueError(f"split {split!r} not found under {root}; available: {', '.join(available) or 'none'}")
