"""QaTa-COV19 with LViT per-image reports (``images/``, ``masks/``, ``reports/``, ``split.json``).

Laterality: in these reports "left lung" is the image's left half as stored (measured on 1,487
one-sided train+val cases, see shared/data/README.md), so the reader declares ``image``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .cases import SegmentationCase, check_split

LATERALITY = "image"


def read_qata(root: str | Path, split: str) -> list[SegmentationCase]:
    """Cases of ``split`` under ``root`` (train / val here; test under the evaluators' root)."""
    root = Path(root)
    split_file = root / "split.json"
    if not split_file.is_file():
        raise FileNotFoundError(f"{split_file} not found: is {root} a QaTa-COV19 folder "
                                "(images/, masks/, reports/, split.json)?")
    splits = json.loads(split_file.read_text(encoding="utf-8"))
    check_split(split, sorted(splits), root)
    cases = []
    for cid in dict.fromkeys(splits[split]):  # de-duplicate, keep order
        report = root / "reports" / f"{cid}.txt"
        if not report.is_file():
            raise FileNotFoundError(f"QaTa case {cid}: report {report} is missing")
        cases.append(SegmentationCase(cid, root / "images" / f"{cid}.png", root / "masks" / f"{cid}.png",
                                      report.read_text(encoding="utf-8").strip(), LATERALITY))
    return cases
