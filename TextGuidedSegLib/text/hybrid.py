"""Hybrid text: split a report into locational, descriptive and diagnostic expressions.

SSA reads a report as three kinds of expression rather than one sentence, because each says
something different about the mask: *where* ("lower left lung", "top right of the image"), *how
much / what it looks like* ("two infected areas", "one medium yellow round polyp") and *what*
("bilateral pulmonary infection", "polyp"). The parser is rule based; it covers the QaTa-COV19
report grammar and the Kvasir-SEG (medvlsm) prompts exactly, and falls back to the whole sentence
for free text it cannot split. The location clauses are also parsed into directions
(:class:`LocationClause`) from which :mod:`TextGuidedSegLib.guidance` draws a guidance mask.

Sides are kept as *words*: whether "left" means the image's or the patient's left is the
model's and the dataset's convention, decided where the guidance mask is drawn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

_WORDS = re.compile(r"[a-z]+")
SIDE_WORDS = {"left": "left", "right": "right"}
VERTICAL_WORDS = {"upper": "upper", "superior": "upper", "top": "upper", "apical": "upper", "apex": "upper",
                  "middle": "middle", "mid": "middle", "central": "middle", "center": "middle",
                  "centre": "middle", "lower": "lower", "inferior": "lower", "bottom": "lower",
                  "basal": "lower", "base": "lower"}
DEPTH_WORDS = {"anterior": "anterior", "front": "anterior", "ventral": "anterior",
               "posterior": "posterior", "back": "posterior", "dorsal": "posterior"}
ALL_WORDS = {"all", "whole", "entire", "diffuse"}
LOCATION_WORDS = set(SIDE_WORDS) | set(VERTICAL_WORDS) | set(DEPTH_WORDS)
COUNT_WORDS = {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "single",
               "multiple", "several", "many", "few", "a"}
DESCRIPTIVE_WORDS = COUNT_WORDS | {
    "small", "medium", "large", "tiny", "big", "round", "oval", "circle", "circular", "triangular",
    "irregular", "flat", "white", "yellow", "brown", "orange", "pink", "red", "tan", "grey", "gray", "dark",
    "bright", "area", "areas", "patchy", "focal", "extensive"}
FINDING_WORDS = {"infection", "infections", "pneumonia", "opacity", "opacities", "consolidation", "lesion",
                 "lesions", "polyp", "polyps", "tumor", "tumour", "tumors", "tumours", "nodule", "nodules",
                 "mass", "effusion", "infiltrate", "infiltrates", "covid", "haemorrhage", "hemorrhage",
                 "edema", "oedema", "cyst", "metastasis", "metastases", "fracture", "stone", "lung", "lungs",
                 "liver", "spleen", "kidney", "pancreas", "hippocampus", "brain"}
# "in the left lower lung", "located in right of the image": where a location starts inside a phrase
_LOCATION_START = re.compile(
    r"\b(?:located\s+)?(?:in|at|on|within|of|involving)\s+(?:the\s+)?(?=(?:all|whole|entire|both|"
    + "|".join(sorted(LOCATION_WORDS)) + r")\b)")


@dataclass(frozen=True)
class LocationClause:
    """One place a report names: which side(s), which vertical zone(s), which depth.

    Empty sets mean "not said" (the whole extent along that axis): "all lung" covers everything.
    """

    sides: frozenset[str] = frozenset()
    vertical: frozenset[str] = frozenset()
    depth: frozenset[str] = frozenset()


@dataclass(frozen=True)
class HybridText:
    """A report split into expressions (``""`` when the report has none of that kind)."""

    sentence: str
    locational: str = ""
    descriptive: str = ""
    diagnostic: str = ""
    clauses: tuple[LocationClause, ...] = field(default_factory=tuple)
    bilateral: bool = False

    @property
    def expressions(self) -> tuple[str, str, str, str]:
        """(sentence, locational, descriptive, diagnostic): the order every model reads them in."""
        return (self.sentence, self.locational, self.descriptive, self.diagnostic)

    @property
    def sides(self) -> frozenset[str]:
        """Every side named by a clause ('left', 'right'); empty when no side is named."""
        return frozenset().union(*(c.sides for c in self.clauses)) if self.clauses else frozenset()

    @property
    def unilateral_side(self) -> str | None:
        """'left' or 'right' when the report names exactly one side and does not say bilateral."""
        sides = self.sides
        if len(sides) != 1 or self.bilateral or any(not c.sides for c in self.clauses):
            return None
        return next(iter(sides))


def _words(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


def _kind(phrase: str) -> str:
    """'descriptive' (counts, size, colour, shape) or 'diagnostic' (the finding) for a non-location phrase."""
    words = set(_words(phrase))
    if words & COUNT_WORDS or (words & DESCRIPTIVE_WORDS and not words & FINDING_WORDS):
        return "descriptive"
    return "diagnostic"


def parse_clause(text: str) -> LocationClause:
    """Directions of one location clause: 'upper middle left lung' -> left, {upper, middle}."""
    words = _words(text)
    sides = frozenset(SIDE_WORDS[w] for w in words if w in SIDE_WORDS)
    vertical = frozenset(VERTICAL_WORDS[w] for w in words if w in VERTICAL_WORDS)
    depth = frozenset(DEPTH_WORDS[w] for w in words if w in DEPTH_WORDS)
    if "both" in words or "bilateral" in words:
        sides = frozenset({"left", "right"})
    return LocationClause(sides, vertical, depth)


def _split_location(phrase: str) -> tuple[str, str]:
    """('pulmonary infection', 'left lower lung') from 'pulmonary infection in the left lower lung'."""
    m = _LOCATION_START.search(phrase.lower())
    if m is None or m.start() == 0:
        return "", phrase
    return phrase[:m.start()].strip(), phrase[m.end():].strip()


@lru_cache(maxsize=4096)
def parse_report(text: str) -> HybridText:
    """Split ``text`` into expressions and location clauses (cached: reports repeat a lot)."""
    sentence = " ".join(text.split())
    parts: dict[str, list[str]] = {"locational": [], "descriptive": [], "diagnostic": []}
    for phrase in re.split(r"[,;.]", sentence):
        phrase = phrase.strip()
        if not phrase:
            continue
        words = set(_words(phrase))
        if words & LOCATION_WORDS:
            before, location = _split_location(phrase)
            if before:
                parts[_kind(before)].append(before)
                parts["locational"].append(location)
                continue
            if not (words & FINDING_WORDS - {"lung", "lungs"}) or not (words & DESCRIPTIVE_WORDS):
                parts["locational"].append(phrase)
                continue
        parts[_kind(phrase)].append(phrase)
    if not parts["diagnostic"]:
        # "one medium yellow round polyp": the finding noun alone is the diagnostic expression
        nouns = [w for w in _words(sentence) if w in FINDING_WORDS and w not in {"lung", "lungs"}]
        if nouns:
            parts["diagnostic"].append(" ".join(dict.fromkeys(nouns)))
    locational = ", ".join(parts["locational"])
    clauses = tuple(parse_clause(c) for c in re.split(r"\band\b|&|,", locational) if _words(c))
    bilateral = bool({"bilateral", "both"} & set(_words(sentence)))
    return HybridText(sentence, locational, ", ".join(parts["descriptive"]), ", ".join(parts["diagnostic"]),
                      clauses, bilateral)
