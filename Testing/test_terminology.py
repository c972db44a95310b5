"""Segment names, colours and terminology derived from prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from TextGuidedSegLib import io, terminology
from TextGuidedSegLib.terminology import short_name, style_for, unique_names

INFECTION_COLOUR = (0.85, 0.33, 0.10)
TUMOR_COLOUR = (0.78, 0.18, 0.18)
MASS_COLOUR = (144 / 255, 238 / 255, 144 / 255)  # Slicer's recommendedDisplayRGBValue for Mass

#: Excerpt of Slicer's .term.json files (only the entries we use; see "slicer_source" in it).
SLICER_TERMS = json.loads((Path(__file__).parent / "data" / "slicer_terminology_entries.json").read_text())
CONTEXTS = {c["SegmentationCategoryTypeContextName"]: c for c in SLICER_TERMS["terminology_contexts"]}
ANATOMIC_CONTEXTS = {c["AnatomicContextName"] for c in SLICER_TERMS["anatomic_contexts"]}
#: One prompt for each keyword group of terminology._KNOWN, in table order.
KNOWN_PROMPTS = ["lung infection", "polyp", "tumor", "lesion", "left lung", "liver", "spleen", "kidney",
                 "prostate", "brain"]


def _code(entry: dict) -> tuple:
    return (entry["CodingSchemeDesignator"], entry["CodeValue"], entry["CodeMeaning"])


def _slicer_entry(terminology_string: str) -> tuple:
    """(context, category entry, type entry) of Slicer's files for a 7-field terminology string;
    fails when any part is not in the excerpt exactly (scheme, value and meaning)."""
    fields = terminology_string.split("~")
    assert len(fields) == 7, terminology_string
    context_name, category, kind, type_modifier, anatomic_context, region, region_modifier = fields
    assert context_name in CONTEXTS, f"{context_name!r} is not a terminology context Slicer ships"
    categories = {_code(c): c for c in CONTEXTS[context_name]["SegmentationCodes"]["Category"]}
    category_code = tuple(category.split("^"))
    assert category_code in categories, f"category {category!r} not in {context_name!r}"
    types = {_code(t): t for t in categories[category_code]["Type"]}
    type_code = tuple(kind.split("^"))
    assert type_code in types, f"type {kind!r} not in category {category!r} of {context_name!r}"
    assert type_modifier == "^^"
    assert anatomic_context in ANATOMIC_CONTEXTS
    assert region == region_modifier == "^^"
    return CONTEXTS[context_name], categories[category_code], types[type_code]


def _slicer_colour(type_entry: dict):
    """Slicer's colour for a type (0..1): its own, else the one its modifiers share; None if neither."""
    rgb = type_entry.get("recommendedDisplayRGBValue")
    if rgb is None:
        shared = {tuple(m["recommendedDisplayRGBValue"]) for m in type_entry.get("Modifier", [])
                  if "recommendedDisplayRGBValue" in m}
        rgb = shared.pop() if len(shared) == 1 else None
    return None if rgb is None else tuple(c / 255 for c in rgb)


@pytest.mark.parametrize("prompt, expected", [
    ("bilateral pulmonary infection, two infected areas, all left lung and all right lung",
     "bilateral pulmonary infection"),
    ("Unilateral pulmonary infection; one infected area", "Unilateral pulmonary infection"),
    ("  left    lung.  ", "left lung"),
    ("polyp", "polyp"),
    ("a" * 40, "a" * 40),  # exactly max_chars: kept whole
    ("", "segmentation"),
    ("   \n\t ", "segmentation"),
    (" ... ", "segmentation"),
])
def test_short_name(prompt, expected):
    assert short_name(prompt) == expected


def test_short_name_long_clause_cut_at_word_boundary():
    prompt = "extensive ground glass opacification throughout the lower zones of both lungs"
    name = short_name(prompt)
    assert name == "extensive ground glass opacification…"
    assert name.endswith("…") and len(name) <= 41
    assert prompt.startswith(name[:-1]) and prompt[len(name) - 1] == " "
    assert short_name(prompt, max_chars=20) == "extensive ground…"


def test_short_name_single_long_word_is_cut_hard():
    assert short_name("x" * 60) == "x" * 40 + "…"


def test_style_infection():
    s = style_for("bilateral pulmonary infection, two infected areas, lower left lung")
    assert s.name == "bilateral pulmonary infection"
    assert s.color == INFECTION_COLOUR
    assert s.terminology == ("Segmentation category and type - DICOM master list"
                             "~SCT^49755003^Morphologically Altered Structure~SCT^23583003^Inflammation~^^"
                             "~Anatomic codes - DICOM master list~^^~^^")
    # lesion words win over organ words, whatever the order in the prompt
    assert style_for("lung with covid opacities").color == INFECTION_COLOUR


def test_style_polyp_and_organ():
    s = style_for("one medium white oval polyp, located in center of the image")
    assert s.color == pytest.approx(MASS_COLOUR) and "~SCT^4147007^Mass~" in s.terminology
    liver = style_for("Liver")
    assert "~SCT^10200004^Liver~" in liver.terminology
    assert "~SCT^123037004^Anatomical Structure~" in liver.terminology
    assert liver.color == pytest.approx((221 / 255, 130 / 255, 101 / 255))
    assert style_for("a tumour").color == TUMOR_COLOUR and "^Neoplasm~" in style_for("a tumour").terminology
    assert "^Mass~" in style_for("mass in the liver").terminology
    # whole words only: 'massive' is not 'mass'
    assert style_for("massive effusion").terminology is None


def test_style_unknown_words_fall_back_by_index():
    styles = [style_for("something unusual", i) for i in range(5)]
    assert all(s.terminology is None for s in styles)
    assert all(s.name == "something unusual" for s in styles)
    colours = [s.color for s in styles]
    assert len(set(colours[:4])) == 4, "consecutive unknown prompts get different colours"
    assert colours[4] == colours[0]  # the palette cycles
    assert all(0 <= c <= 1 for colour in colours for c in colour)


def test_known_prompts_cover_the_table():
    styles = [style_for(p) for p in KNOWN_PROMPTS]
    assert [s.terminology for s in styles] == [
        terminology._terminology(k.category, k.type) for k in terminology._KNOWN]


@pytest.mark.parametrize("known", terminology._KNOWN, ids=lambda k: k.keywords[0])
def test_every_code_is_one_slicer_ships(known):
    """Context, category and type of every entry exist in Slicer's files, word for word."""
    entry = terminology._terminology(known.category, known.type)
    context, category, kind = _slicer_entry(entry)
    assert context["SegmentationCategoryTypeContextName"] == terminology.SEGMENTATION_CONTEXT
    assert entry.split("~")[4] == terminology.ANATOMIC_CONTEXT
    # the colour is Slicer's where Slicer has one; only types without a Slicer colour keep ours
    slicer_colour = _slicer_colour(kind)
    if slicer_colour is not None:
        assert known.color == pytest.approx(slicer_colour, abs=1e-12)
    else:
        assert _code(kind) in {("SCT", "108369006", "Neoplasm"), ("SCT", "23583003", "Inflammation")}
    assert all(0 <= c <= 1 for c in known.color)


def test_the_substitutes_are_needed():
    """Infectious disease, Polyp and Lesion are in no shipped context; the Segment Editor's default
    list has neither Neoplasm nor Inflammation, hence one context (the DICOM master list) for all."""
    for context_name, categories in SLICER_TERMS["complete_categories"].items():
        for category in CONTEXTS[context_name]["SegmentationCodes"]["Category"]:
            if category["CodeMeaning"] in categories:
                values = {t["CodeValue"] for t in category["Type"]}
                assert not values & {"40733004", "68496003", "52988006"}, context_name
    general = CONTEXTS["Segmentation category and type - 3D Slicer General Anatomy list"]
    general_types = {t["CodeValue"] for c in general["SegmentationCodes"]["Category"] for t in c["Type"]}
    assert "108369006" not in general_types and "23583003" not in general_types


def test_every_terminology_is_a_valid_slicer_entry(tmp_path):
    """style_for's entries survive a .seg.nrrd written by io and read back (ours and slicerio's reader)."""
    import slicerio

    prompts = KNOWN_PROMPTS + ["mass", "unknown thing"]
    styles = [style_for(p, i) for i, p in enumerate(prompts)]
    mask = np.zeros((1, 4, 4), dtype=bool)
    specs = [io.SegmentSpec(name=s.name, mask=mask, color=s.color, prompt=p, terminology=s.terminology)
             for p, s in zip(prompts, styles)]
    path = io.write_segmentation(tmp_path / "t.seg.nrrd", specs, np.eye(4))
    segments, _ = io.read_segmentation(path)
    raw = slicerio.read_segmentation(str(path))["segments"]
    for s, back, entry in zip(styles, segments, raw):
        np.testing.assert_allclose(back.color, s.color)
        if s.terminology is None:
            assert back.terminology is None and "terminology" not in entry
            continue
        assert back.terminology == s.terminology
        _, category, kind = _slicer_entry(back.terminology)
        term = entry["terminology"]
        assert term["contextName"] == terminology.SEGMENTATION_CONTEXT
        assert term["anatomicContextName"] == terminology.ANATOMIC_CONTEXT
        assert tuple(term["category"]) == _code(category) and tuple(term["type"]) == _code(kind)
        assert "typeModifier" not in term and "anatomicRegion" not in term


def test_slicer_reads_the_entries(tmp_path):
    """Slicer's own terminology logic (PyPI slicer-core) loads the excerpt as terminology files,
    parses every entry and finds its category and type; its serialiser writes the same string."""
    slicer = pytest.importorskip("slicer", reason="PyPI slicer-core is needed for Slicer's terminology logic")
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    for i, context in enumerate(SLICER_TERMS["terminology_contexts"]):
        path = tmp_path / f"context{i}.term.json"
        path.write_text(json.dumps(context))
        assert logic.LoadTerminologyFromFile(str(path)) == context["SegmentationCategoryTypeContextName"]
    for known in terminology._KNOWN:
        text = terminology._terminology(known.category, known.type)
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(text, entry)
        assert logic.SerializeTerminologyEntry(entry) == text
        context_name = entry.GetTerminologyContextName()
        found = []
        category = slicer.vtkSlicerTerminologyCategory()
        for c in range(logic.GetNumberOfCategoriesInTerminology(context_name)):
            assert logic.GetNthCategoryInTerminology(context_name, c, category)
            if (category.GetCodingSchemeDesignator(), category.GetCodeValue()) != known.category[:2]:
                continue
            assert category.GetCodeMeaning() == known.category[2]
            kind = slicer.vtkSlicerTerminologyType()
            for t in range(logic.GetNumberOfTypesInTerminologyCategory(context_name, category)):
                assert logic.GetNthTypeInTerminologyCategory(context_name, category, t, kind)
                if (kind.GetCodingSchemeDesignator(), kind.GetCodeValue()) == known.type[:2]:
                    found.append(kind.GetCodeMeaning())
        assert found[:1] == [known.type[2]], text


def test_unique_names():
    assert unique_names(["lung", "lung", "lung"]) == ["lung", "lung (2)", "lung (3)"]
    assert unique_names(["lung", "liver"], taken={"lung", "lung (2)"}) == ["lung (3)", "liver"]
    assert unique_names([], taken={"x"}) == []
    taken = {"a"}
    assert unique_names(["a"], taken=taken) == ["a (2)"]
    assert taken == {"a"}, "the caller's set is not modified"
