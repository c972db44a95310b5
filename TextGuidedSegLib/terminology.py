"""Segment names, colours and Slicer terminology for prompts.

A prompt becomes a segment: its name is a short form of the prompt, and when the prompt names a
known structure the segment gets that structure's colour and a DICOM / SNOMED CT terminology
entry (the format Slicer's segment editor uses), so it looks like a hand-made segment.

Every entry is one 3D Slicer ships (checked against ``Modules/Loadable/Terminologies/Resources/``
of Slicer's source; the excerpt we rely on is ``Testing/data/slicer_terminology_entries.json``).
All come from the "DICOM master list" context, which Slicer (5.8 included) loads by default next
to the "3D Slicer General Anatomy list": that list has our organs but neither Neoplasm nor
Inflammation, so one context for everything keeps every segment matched in the Segment Editor.
Slicer's lesion types (category Morphologically Altered Structure) include no Infectious disease,
Polyp or Lesion: the closest ones stand in (Inflammation, Mass, Mass; "mass" itself is Mass).
Colours are Slicer's ``recommendedDisplayRGBValue`` where it has one (for Lung and Kidney it sits
on the Right / Left modifiers, the same for both sides); Neoplasm and Inflammation have none and
keep ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Tuple

#: Terminology context of every entry written here (``SegmentationCategoryTypeContextName`` of
#: Slicer's ``SegmentationCategoryTypeModifier-DICOM-Master.term.json``).
SEGMENTATION_CONTEXT = "Segmentation category and type - DICOM master list"
#: Anatomic context named in every entry (``AnatomicContextName`` of Slicer's
#: ``AnatomicRegionAndModifier-DICOM-Master.term.json``); the region itself is left empty.
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

Code = Tuple[str, str, str]  # (coding scheme designator, code value, code meaning), as in Slicer's files


def _rgb(r: int, g: int, b: int) -> Tuple[float, float, float]:
    """Slicer's recommendedDisplayRGBValue (0..255) as a 0..1 colour."""
    return (r / 255.0, g / 255.0, b / 255.0)


_ANATOMICAL_STRUCTURE: Code = ("SCT", "123037004", "Anatomical Structure")
_MORPHOLOGICALLY_ALTERED: Code = ("SCT", "49755003", "Morphologically Altered Structure")
_MASS: Code = ("SCT", "4147007", "Mass")


@dataclass(frozen=True)
class _Known:
    keywords: Tuple[str, ...]
    category: Code
    type: Code
    color: Tuple[float, float, float]


_KNOWN = [
    # No infection type in Slicer's lists: Inflammation is the closest (pneumonia, COVID opacities).
    _Known(("infection", "infected", "opacity", "opacities", "consolidation", "pneumonia", "covid"),
           _MORPHOLOGICALLY_ALTERED, ("SCT", "23583003", "Inflammation"), (0.85, 0.33, 0.10)),
    # No Polyp type in Slicer's lists: a polyp is a mass growing from a mucosa.
    _Known(("polyp",), _MORPHOLOGICALLY_ALTERED, _MASS, _rgb(144, 238, 144)),
    _Known(("tumour", "tumor", "neoplasm", "cancer"),
           _MORPHOLOGICALLY_ALTERED, ("SCT", "108369006", "Neoplasm"), (0.78, 0.18, 0.18)),
    # No generic Lesion type in Slicer's lists: Mass is its most general lesion type.
    _Known(("lesion", "mass"), _MORPHOLOGICALLY_ALTERED, _MASS, _rgb(144, 238, 144)),
    _Known(("lung", "lungs", "pulmonary"), _ANATOMICAL_STRUCTURE, ("SCT", "39607008", "Lung"), _rgb(197, 165, 145)),
    _Known(("liver", "hepatic"), _ANATOMICAL_STRUCTURE, ("SCT", "10200004", "Liver"), _rgb(221, 130, 101)),
    _Known(("spleen", "splenic"), _ANATOMICAL_STRUCTURE, ("SCT", "78961009", "Spleen"), _rgb(157, 108, 162)),
    _Known(("kidney", "renal"), _ANATOMICAL_STRUCTURE, ("SCT", "64033007", "Kidney"), _rgb(185, 102, 83)),
    _Known(("prostate",), _ANATOMICAL_STRUCTURE, ("SCT", "41216001", "Prostate"), _rgb(230, 158, 140)),
    _Known(("brain", "cerebral"), _ANATOMICAL_STRUCTURE, ("SCT", "12738006", "Brain"), _rgb(250, 250, 225)),
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


def _terminology(category: Code, kind: Code) -> str:
    """A 7-field Slicer terminology entry, as vtkSlicerTerminologiesModuleLogic serialises it:
    context~category~type~typeModifier~anatomicContext~anatomicRegion~anatomicRegionModifier."""
    return "~".join([SEGMENTATION_CONTEXT, "^".join(category), "^".join(kind), "^^",
                     ANATOMIC_CONTEXT, "^^", "^^"])


def style_for(prompt: str, index: int = 0) -> SegmentStyle:
    """Name, colour and terminology for the ``index``-th prompt of a run."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    words |= {w[:-1] for w in words if w.endswith("s") and len(w) > 3}  # plurals: polyps, lesions, tumours
    for known in _KNOWN:
        if words & set(known.keywords):
            return SegmentStyle(short_name(prompt), known.color, _terminology(known.category, known.type))
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
