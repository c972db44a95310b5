"""Segment names, colours and Slicer terminology for prompts.

A prompt becomes a segment: its name is a short form of the prompt, and when the prompt names a
known structure the segment gets that structure's colour and a DICOM / SNOMED CT terminology
entry (the format Slicer's segment editor uses), so it looks like a hand-made segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# (keywords, display name, colour 0..1, SNOMED CT category, SNOMED CT type)
_CATEGORY_ANATOMY = ("123037004", "Anatomical Structure")
_CATEGORY_MORPH = ("49755003", "Morphologically Altered Structure")
_KNOWN = [
    (("infection", "infected", "opacity", "opacities", "consolidation", "pneumonia", "covid"),
     "infection", (0.85, 0.33, 0.10), _CATEGORY_MORPH, ("40733004", "Infectious disease")),
    (("polyp",), "polyp", (0.89, 0.69, 0.25), _CATEGORY_MORPH, ("68496003", "Polyp")),
    (("tumour", "tumor", "mass", "neoplasm", "cancer"),
     "tumor", (0.78, 0.18, 0.18), _CATEGORY_MORPH, ("108369006", "Neoplasm")),
    (("lesion",), "lesion", (0.86, 0.24, 0.36), _CATEGORY_MORPH, ("52988006", "Lesion")),
    (("lung", "lungs", "pulmonary"), "lung", (0.77, 0.89, 0.93), _CATEGORY_ANATOMY, ("39607008", "Lung")),
    (("liver", "hepatic"), "liver", (0.87, 0.51, 0.40), _CATEGORY_ANATOMY, ("10200004", "Liver")),
    (("spleen", "splenic"), "spleen", (0.62, 0.36, 0.40), _CATEGORY_ANATOMY, ("78961009", "Spleen")),
    (("kidney", "renal"), "kidney", (0.72, 0.45, 0.35), _CATEGORY_ANATOMY, ("64033007", "Kidney")),
    (("prostate",), "prostate", (0.90, 0.72, 0.55), _CATEGORY_ANATOMY, ("41216001", "Prostate")),
    (("brain", "cerebral"), "brain", (0.98, 0.84, 0.80), _CATEGORY_ANATOMY, ("12738006", "Brain")),
]
# Lesion words are checked before organ words: "infection of the lung" is an infection.
_FALLBACK_COLOURS = [(0.50, 0.68, 0.50), (0.95, 0.84, 0.57), (0.69, 0.48, 0.77), (0.44, 0.72, 0.82)]


@dataclass(frozen=True)
class SegmentStyle:
    name: str
    color: tuple[float, float, float]
    terminology: str | None


def short_name(prompt: str, max_chars: int = 40) -> str:
    """The first clause of the prompt, cut at a word boundary: 'bilateral pulmonary infection, two ...'
    -> 'bilateral pulmonary infection'. Empty prompts (text-free models) are called 'segmentation'."""
    text = " ".join(prompt.split()).strip(" .")
    if not text:
        return "segmentation"
    first = re.split(r"[,;:.]", text)[0].strip() or text
    if len(first) <= max_chars:
        return first
    cut = first[:max_chars].rsplit(" ", 1)[0]
    return (cut or first[:max_chars]) + "…"


def _terminology(category: tuple[str, str], kind: tuple[str, str]) -> str:
    return (f"SCT^{category[0]}^{category[1]}~SCT^{kind[0]}^{kind[1]}~^^~"
            "Anatomic codes - DICOM master list~^^~^^|")


def style_for(prompt: str, index: int = 0) -> SegmentStyle:
    """Name, colour and terminology for the ``index``-th prompt of a run."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    words |= {w[:-1] for w in words if w.endswith("s") and len(w) > 3}  # plurals: polyps, lesions, tumours
    for keywords, _, colour, category, kind in _KNOWN:
        if words & set(keywords):
            return SegmentStyle(short_name(prompt), colour, _terminology(category, kind))
    return SegmentStyle(short_name(prompt), _FALLBACK_COLOURS[index % len(_FALLBACK_COLOURS)], None)


def unique_names(names: list[str], taken: set[str] | None = None) -> list[str]:
    """Make names unique against each other and ``taken`` (existing segments): 'x', 'x (2)', ..."""
    taken = set(taken or ())
    out = []
    for n in names:
        candidate, k = n, 2
        while candidate in taken:
            candidate = f"{n} ({k})"
            k += 1
        taken.add(candidate)
        out.append(candidate)
    return out
