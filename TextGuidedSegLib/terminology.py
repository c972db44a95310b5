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

Brain structures (issue 20: "left hippocampus", "hippocampus, left side", "both thalami", "3rd
ventricle", ...) map to the Anatomical Structure types of the same DICOM master list, with the type
modifier Slicer gives paired structures: Left (SCT 7771000), Right (SCT 24028007), or Right and
left (SCT 51440002) for plurals and "both" / "bilateral" prompts. Words are matched whole ("left"
never inside "cleft"), the longest known phrase wins ("cerebellar white matter" over "white
matter"). Structures Slicer's lists have no entry for (inferior lateral ventricle / temporal horn,
cerebellar cortex, ventral diencephalon) get no terminology rather than a wider one that contains
them. Colours follow Slicer: a Left / Right modifier's colour where it has one, else the type's
own, else the colour its Left and Right modifiers share (Slicer's type list shows that one); the
types without any (Hippocampus, Nucleus accumbens, Third ventricle, Brain stem, Cerebellum) take
the fallback palette like unknown prompts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

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

#: Slicer's laterality type modifiers (the ``Modifier`` entries of paired types in the DICOM master list).
LEFT: Code = ("SCT", "7771000", "Left")
RIGHT: Code = ("SCT", "24028007", "Right")
RIGHT_AND_LEFT: Code = ("SCT", "51440002", "Right and left")

RGB = Tuple[int, int, int]


@dataclass(frozen=True)
class _Structure:
    """A brain structure of Slicer's DICOM master list (category Anatomical Structure).

    ``names`` / ``plurals``: lower-case phrases that name it (a plural means both sides);
    ``paired``: the type has the Right / Left / Right and left modifiers; ``rgb``: the type's own
    ``recommendedDisplayRGBValue``; ``side_rgb``: the one its Right and Left modifiers carry (the same
    for both sides in every entry here; "Right and left" carries none)."""
    type: Code
    names: Tuple[str, ...]
    plurals: Tuple[str, ...] = ()
    paired: bool = False
    rgb: Optional[RGB] = None
    side_rgb: Optional[RGB] = None


#: Slicer SegmentationCategoryTypeModifier-DICOM-Master.json, category Anatomical Structure (codes,
#: meanings and colours copied from it; the entries are in Testing/data/slicer_terminology_entries.json).
_BRAIN = [
    _Structure(("SCT", "5366008", "Hippocampus"), ("hippocampus", "hippocampal formation"),
               ("hippocampi", "hippocampuses", "hippocampal formations"), paired=True),
    _Structure(("SCT", "4958002", "Amygdala"),
               ("amygdala", "amygdaloid body", "amygdaloid complex", "amygdaloid nucleus"),
               ("amygdalae", "amygdalas", "amygdaloid bodies"), paired=True, side_rgb=(98, 153, 112)),
    _Structure(("SCT", "11000004", "Caudate nucleus"), ("caudate nucleus", "caudate"),
               ("caudate nuclei", "caudates"), paired=True, side_rgb=(30, 111, 85)),
    _Structure(("SCT", "89278009", "Putamen"), ("putamen",), ("putamina", "putamens"), paired=True,
               side_rgb=(210, 157, 166)),
    _Structure(("SCT", "14738005", "Globus pallidus"), ("globus pallidus", "pallidum", "pallidus"),
               ("globi pallidi", "pallida", "pallidums", "pallidi"), paired=True, side_rgb=(48, 129, 126)),
    _Structure(("SCT", "42695009", "Thalamus"), ("thalamus", "thalamus proper"), ("thalami", "thalamuses"),
               paired=True, rgb=(166, 113, 137), side_rgb=(122, 101, 38)),
    _Structure(("SCT", "427667007", "Nucleus accumbens"),
               ("nucleus accumbens", "accumbens", "accumbens area", "accumbens nucleus"),
               ("nuclei accumbens", "accumbens nuclei", "accumbens areas"), paired=True),
    _Structure(("SCT", "66720007", "Lateral ventricle"), ("lateral ventricle",), ("lateral ventricles",),
               paired=True, side_rgb=(88, 106, 215)),
    _Structure(("SCT", "49841001", "Third ventricle"), ("third ventricle",)),
    _Structure(("SCT", "35918002", "Fourth ventricle"), ("fourth ventricle",), rgb=(88, 106, 215)),
    _Structure(("SCT", "119238007", "Brain stem"), ("brain stem", "brainstem")),
    _Structure(("SCT", "113305005", "Cerebellum"), ("cerebellum",)),
    _Structure(("SCT", "33060004", "Cerebellar white matter"),
               ("cerebellar white matter", "cerebellum white matter", "white matter of cerebellum",
                "white matter of the cerebellum"), rgb=(194, 195, 164)),
    _Structure(("SCT", "68523003", "Cerebral White Matter"),
               ("cerebral white matter", "white matter of cerebrum", "white matter of the cerebrum"),
               paired=True, rgb=(250, 250, 225)),
    _Structure(("SCT", "40146001", "Cerebral cortex"), ("cerebral cortex",), ("cerebral cortices",),
               paired=True, rgb=(128, 174, 128)),
    _Structure(("SCT", "65216001", "Cerebrospinal Fluid"),
               ("cerebrospinal fluid", "cerebro spinal fluid", "csf"), paired=True, rgb=(85, 188, 255)),
    _Structure(("SCT", "389080008", "White Matter"), ("white matter",), rgb=(250, 250, 210)),
    _Structure(("SCT", "389081007", "Gray Matter"), ("gray matter", "grey matter"), rgb=(200, 200, 235)),
]

#: Brain structures with no entry in Slicer's lists: a prompt naming one gets no terminology (not
#: the wider structure that contains it: the temporal horn is not the whole lateral ventricle).
_NOT_CODED = ("inferior lateral ventricle", "inferior lateral ventricles", "inferior horn", "inferior horns",
              "temporal horn", "temporal horns", "cerebellar cortex", "cerebellum cortex", "cerebellar cortices",
              "ventral dc", "ventral diencephalon", "white matter hyperintensity",
              "white matter hyperintensities", "white matter hypointensity", "white matter hypointensities")

_ORDINALS = {"3rd": "third", "4th": "fourth"}
_BOTH_WORDS = {"both", "bilateral", "bilaterally"}


def _words(text: str) -> list[str]:
    """Lower-case whole words ('3rd' -> 'third'); hyphens and punctuation split words."""
    return [_ORDINALS.get(w, w) for w in re.findall(r"[a-z0-9]+", text.lower())]


def _phrase_table() -> dict:
    table = {}
    for s in _BRAIN:
        for phrase in s.names:
            table[tuple(phrase.split())] = (s, False)
        for phrase in s.plurals:
            table[tuple(phrase.split())] = (s, True)
    for phrase in _NOT_CODED:
        table[tuple(phrase.split())] = (None, False)
    return table


_PHRASES = _phrase_table()
_LONGEST = max(len(p) for p in _PHRASES)


def _brain_matches(words: Sequence[str]) -> list:
    """(structure or None for a not-coded one, plural) for each phrase found, longest first at each
    position, left to right, without overlaps."""
    found, i = [], 0
    while i < len(words):
        for n in range(min(_LONGEST, len(words) - i), 0, -1):
            hit = _PHRASES.get(tuple(words[i:i + n]))
            if hit is not None:
                found.append(hit)
                i += n
                break
        else:
            i += 1
    return found


def _side(words: Sequence[str], plural: bool) -> Optional[Code]:
    """The laterality modifier a prompt asks for: Right and left for plurals, 'both', 'bilateral',
    or 'left and right'; Left or Right for one side; None when it names no side."""
    left, right = "left" in words, "right" in words
    if plural or _BOTH_WORDS & set(words) or (left and right):
        return RIGHT_AND_LEFT
    return LEFT if left else RIGHT if right else None


def _rgb_for(structure: _Structure, modifier: Optional[Code]) -> Optional[RGB]:
    if modifier in (LEFT, RIGHT) and structure.side_rgb is not None:
        return structure.side_rgb
    return structure.rgb or structure.side_rgb


def brain_structure(prompt: str):
    """(structure, modifier, coded) for a prompt naming a brain structure, else None.

    ``coded`` is False when the prompt names a structure Slicer has no entry for; ``modifier`` is
    None for unpaired types (Third ventricle, Brain stem, ...) whatever side the prompt names."""
    words = _words(prompt)
    matches = _brain_matches(words)
    if not matches:
        return None
    if any(s is None for s, _ in matches):
        return None, None, False
    structure, plural = matches[0]
    modifier = _side(words, plural) if structure.paired else None
    return structure, modifier, True


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


def _terminology(category: Code, kind: Code, modifier: Optional[Code] = None) -> str:
    """A 7-field Slicer terminology entry, as vtkSlicerTerminologiesModuleLogic serialises it:
    context~category~type~typeModifier~anatomicContext~anatomicRegion~anatomicRegionModifier."""
    return "~".join([SEGMENTATION_CONTEXT, "^".join(category), "^".join(kind),
                     "^".join(modifier) if modifier else "^^", ANATOMIC_CONTEXT, "^^", "^^"])


_SIDE_WORDS = {LEFT: "left", RIGHT: "right", RIGHT_AND_LEFT: "bilateral"}


def _brain_name(prompt: str, modifier: Optional[Code]) -> str:
    """short_name, with the side put in front when the prompt gives it after the first clause:
    'hippocampus, left side' -> 'left hippocampus' (not 'hippocampus' for both sides)."""
    name = short_name(prompt)
    if modifier is None:
        return name
    first = set(_words(name))
    if first & ({"left", "right"} | _BOTH_WORDS) or any(plural for _, plural in _brain_matches(_words(name))):
        return name
    return f"{_SIDE_WORDS[modifier]} {name}"


def style_for(prompt: str, index: int = 0) -> SegmentStyle:
    """Name, colour and terminology for the ``index``-th prompt of a run.

    Lesion words first ("tumour of the left thalamus" is a tumour), then brain structures (with
    their side), then organs; anything else keeps its name, no terminology and a palette colour."""
    fallback = _FALLBACK_COLOURS[index % len(_FALLBACK_COLOURS)]
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    words |= {w[:-1] for w in words if w.endswith("s") and len(w) > 3}  # plurals: polyps, lesions, tumours
    for known in _KNOWN:
        if known.category == _MORPHOLOGICALLY_ALTERED and words & set(known.keywords):
            return SegmentStyle(short_name(prompt), known.color, _terminology(known.category, known.type))
    brain = brain_structure(prompt)
    if brain is not None:
        structure, modifier, coded = brain
        if not coded:
            return SegmentStyle(short_name(prompt), fallback, None)
        rgb = _rgb_for(structure, modifier)
        return SegmentStyle(_brain_name(prompt, modifier), _rgb(*rgb) if rgb else fallback,
                            _terminology(_ANATOMICAL_STRUCTURE, structure.type, modifier))
    for known in _KNOWN:
        if known.category != _MORPHOLOGICALLY_ALTERED and words & set(known.keywords):
            return SegmentStyle(short_name(prompt), known.color, _terminology(known.category, known.type))
    return SegmentStyle(short_name(prompt), fallback, None)


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
