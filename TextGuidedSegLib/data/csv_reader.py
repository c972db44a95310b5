"""A generic CSV: columns ``image``, ``mask``, ``text`` (+ optional ``case_id``, ``split``).

Relative paths are resolved against the CSV's folder. The ``split`` column, when present, selects
rows; ``laterality`` (image / patient) is a parameter because a CSV cannot declare it.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .cases import SegmentationCase, check_split


def read_csv(path: str | Path, split: str | None = None, laterality: str = "image") -> list[SegmentationCase]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file {path} not found")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = {"image", "mask", "text"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)} (need image, mask, text)")
    if split is not None:
        if "split" not in rows[0]:
            raise ValueError(f"{path} has no 'split' column, so split={split!r} cannot be selected")
        check_split(split, sorted({r["split"] for r in rows}), path)
        rows = [r for r in rows if r["split"] == split]
    base = path.parent
    return [SegmentationCase(r.get("case_id") or Path(r["image"]).stem, base / r["image"],
                             base / r["mask"] if r["mask"] else None, r["text"], laterality) for r in rows]
