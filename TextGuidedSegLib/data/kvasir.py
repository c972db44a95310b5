"""Kvasir-SEG with medvlsm prompts (``images/``, ``masks/``, ``anns/<split>.json``).

``prompt`` picks one of the medvlsm prompt keys ``p1``..``p9`` (``p7``..``p9`` are lists: their
first variant is used). ``p6`` adds the location ("located in right of the image"), which refers
to the image as stored, so the reader declares laterality ``image``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .cases import SegmentationCase, check_split

LATERALITY = "image"


def read_kvasir(root: str | Path, split: str, prompt: str = "p6") -> list[SegmentationCase]:
    root = Path(root)
    anns = root / "anns"
    if not anns.is_dir():
        raise FileNotFoundError(f"{anns} not found: is {root} a Kvasir-SEG folder (images/, masks/, anns/)?")
    check_split(split, sorted(p.stem for p in anns.glob("*.json")), root)
    cases = []
    for entry in json.loads((anns / f"{split}.json").read_text(encoding="utf-8")):
        prompts = entry["prompts"]
        if prompt not in prompts:
            raise KeyError(f"prompt key {prompt!r} not in Kvasir annotations; available: {sorted(prompts)}")
        text = prompts[prompt]
        if isinstance(text, list):
            text = text[0]
        if not text.strip():
            raise ValueError(f"prompt key {prompt!r} is empty in Kvasir annotations; choose p1..p9")
        cases.append(SegmentationCase(entry["segment_id"], root / "images" / entry["img_name"],
                                      root / "masks" / entry["mask_name"], text, LATERALITY))
    return cases
