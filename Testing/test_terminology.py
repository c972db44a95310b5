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

LEFT, RIGHT, BOTH = ("SCT", "7771000", "Left"), ("SCT", "24028007", "Right"), ("SCT", "51440002", "Right and left")
#: Brain prompts of issue 20 -> (type code value, type meaning, modifier, Slicer colour 0..255 or None).
BRAIN_CASES = {
    "left hippocampus": ("5366008", "Hippocampus", LEFT, None),
    "hippocampus, left side": ("5366008", "Hippocampus", LEFT, None),
    "right hippocampus": ("5366008", "Hippocampus", RIGHT, None),
    "hippocampi": ("5366008", "Hippocampus", BOTH, None),
    "left hippocampal formation": ("5366008", "Hippocampus", LEFT, None),
    "right amygdala": ("4958002", "Amygdala", RIGHT, (98, 153, 112)),
    "both amygdalae": ("4958002", "Amygdala", BOTH, (98, 153, 112)),
    "left caudate nucleus": ("11000004", "Caudate nucleus", LEFT, (30, 111, 85)),
    "right caudate": ("11000004", "Caudate nucleus", RIGHT, (30, 111, 85)),
    "right putamen": ("89278009", "Putamen", RIGHT, (210, 157, 166)),
    "both putamina": ("89278009", "Putamen", BOTH, (210, 157, 166)),
    "left pallidum": ("14738005", "Globus pallidus", LEFT, (48, 129, 126)),
    "right globus pallidus": ("14738005", "Globus pallidus", RIGHT, (48, 129, 126)),
    "left thalamus": ("42695009", "Thalamus", LEFT, (122, 101, 38)),
    "both thalami": ("42695009", "Thalamus", BOTH, (166, 113, 137)),  # no colour on 'Right and left': the type's
    "thalamus": ("42695009", "Thalamus", None, (166, 113, 137)),
    "left accumbens area": ("427667007", "Nucleus accumbens", LEFT, None),
    "right nucleus accumbens": ("427667007", "Nucleus accumbens", RIGHT, None),
    "the right lateral ventricle": ("66720007", "Lateral ventricle", RIGHT, (88, 106, 215)),
    "lateral ventricles": ("66720007", "Lateral ventricle", BOTH, (88, 106, 215)),  # the sides' shared colour
    "3rd ventricle": ("49841001", "Third ventricle", None, None),
    "third ventricle": ("49841001", "Third ventricle", None, None),
    "4th ventricle": ("35918002", "Fourth ventricle", None, (88, 106, 215)),
    "brain stem": ("119238007", "Brain stem", None, None),
    "brainstem": ("119238007", "Brain stem", None, None),
    "brain-stem": ("119238007", "Brain stem", None, None),
    "cerebellum": ("113305005", "Cerebellum", None, None),
    "left cerebellum white matter": ("33060004", "Cerebellar white matter", None, (194, 195, 164)),  # unpaired
    "left cerebral white matter": ("68523003", "Cerebral White Matter", LEFT, (250, 250, 225)),
    "right cerebral cortex": ("40146001", "Cerebral cortex", RIGHT, (128, 174, 128)),
    "CSF": ("65216001", "Cerebrospinal Fluid", None, (85, 188, 255)),
    "cerebrospinal fluid": ("65216001", "Cerebrospinal Fluid", None, (85, 188, 255)),
    "white matter": ("389080008", "White Matter", None, (250, 250, 210)),
}
BRAIN_PROMPTS = list(BRAIN_CASES)
#: 17 structures asked at once (issue 20: "a user asks for 10-20 structures at once").
SEVENTEEN = ["left hippocampus", "right hippocampus", "left amygdala", "right amygdala", "left caudate",
             "right caudate", "left putamen", "right putamen", "left pallidum", "right pallidum", "left thalamus",
             "right thalamus", "left lateral ventricle", "right lateral ventricle", "3rd ventricle", "4th ventricle",
             "brainstem"]


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
    if type_modifier != "^^":  # a modifier must be one of the type's own (Slicer matches scheme + value)
        modifiers = {_code(m) for m in types[type_code].get("Modifier", [])}
        assert tuple(type_modifier.split("^")) in modifiers, f"modifier {type_modifier!r} not in type {kind!r}"
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

    prompts = KNOWN_PROMPTS + BRAIN_PROMPTS + ["mass", "unknown thing", "left inferior lateral ventricle"]
    styles = [style_for(p, i) for i, p in enumerate(prompts)]
    mask = np.zeros((1, 4, 4), dtype=bool)
    specs = [io.SegmentSpec(name=n, mask=mask, color=s.color, prompt=p, terminology=s.terminology)
             for p, s, n in zip(prompts, styles, unique_names([s.name for s in styles]))]
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
        assert "anatomicRegion" not in term
        modifier = back.terminology.split("~")[3]
        if modifier == "^^":
            assert "typeModifier" not in term
        else:
            assert "^".join(term["typeModifier"]) == modifier


def test_slicer_reads_the_entries(tmp_path):
    """Slicer's own terminology logic (PyPI slicer-core) loads the excerpt as terminology files,
    parses every entry and finds its category and type; its serialiser writes the same string."""
    slicer = pytest.importorskip("slicer", reason="PyPI slicer-core is needed for Slicer's terminology logic")
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    for i, context in enumerate(SLICER_TERMS["terminology_contexts"]):
        path = tmp_path / f"context{i}.term.json"
        path.write_text(json.dumps(context))
        assert logic.LoadTerminologyFromFile(str(path)) == context["SegmentationCategoryTypeContextName"]
    entries = [(terminology._terminology(k.category, k.type), k.category, k.type, None) for k in terminology._KNOWN]
    entries += [(style_for(p).terminology, terminology._ANATOMICAL_STRUCTURE, b[0].type, b[1])
                for p in BRAIN_PROMPTS for b in [terminology.brain_structure(p)]]
    for text, known_category, known_type, known_modifier in entries:
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(text, entry)
        assert logic.SerializeTerminologyEntry(entry) == text
        context_name = entry.GetTerminologyContextName()
        found, modifiers = [], []
        category = slicer.vtkSlicerTerminologyCategory()
        for c in range(logic.GetNumberOfCategoriesInTerminology(context_name)):
            assert logic.GetNthCategoryInTerminology(context_name, c, category)
            if (category.GetCodingSchemeDesignator(), category.GetCodeValue()) != known_category[:2]:
                continue
            assert category.GetCodeMeaning() == known_category[2]
            kind = slicer.vtkSlicerTerminologyType()
            for t in range(logic.GetNumberOfTypesInTerminologyCategory(context_name, category)):
                assert logic.GetNthTypeInTerminologyCategory(context_name, category, t, kind)
                if (kind.GetCodingSchemeDesignator(), kind.GetCodeValue()) == known_type[:2]:
                    found.append(kind.GetCodeMeaning())
                    modifier = slicer.vtkSlicerTerminologyType()
                    for m in range(logic.GetNumberOfTypeModifiersInTerminologyType(context_name, category, kind)):
                        assert logic.GetNthTypeModifierInTerminologyType(context_name, category, kind, m, modifier)
                        modifiers.append((modifier.GetCodingSchemeDesignator(), modifier.GetCodeValue(),
                                          modifier.GetCodeMeaning()))
        assert found[:1] == [known_type[2]], text
        if known_modifier is not None:
            assert known_modifier in modifiers, text


def test_unique_names():
    assert unique_names(["lung", "lung", "lung"]) == ["lung", "lung (2)", "lung (3)"]
    assert unique_names(["lung", "liver"], taken={"lung", "lung (2)"}) == ["lung (3)", "liver"]
    assert unique_names([], taken={"x"}) == []
    taken = {"a"}
    assert unique_names(["a"], taken=taken) == ["a (2)"]
    assert taken == {"a"}, "the caller's set is not modified"


# --------------------------------------------------------------------------------------------
# brain structures (issue 20)
# --------------------------------------------------------------------------------------------


def _master_type(code_value: str) -> dict:
    """The Anatomical Structure type of the DICOM master list excerpt with this code value."""
    context = CONTEXTS[terminology.SEGMENTATION_CONTEXT]
    anatomy = [c for c in context["SegmentationCodes"]["Category"] if c["CodeValue"] == "123037004"][0]
    found = [t for t in anatomy["Type"] if t["CodeValue"] == code_value]
    assert len(found) == 1, code_value
    return found[0]


def _expected_rgb(type_entry: dict, modifier) -> tuple | None:
    """Slicer's colour for a type and modifier, read from the excerpt: the modifier's own (Slicer's
    segment editor), else the type's, else the one its modifiers share (Slicer's type list)."""
    if modifier is not None:
        for m in type_entry.get("Modifier", []):
            if _code(m) == modifier and "recommendedDisplayRGBValue" in m:
                return tuple(m["recommendedDisplayRGBValue"])
    if "recommendedDisplayRGBValue" in type_entry:
        return tuple(type_entry["recommendedDisplayRGBValue"])
    shared = {tuple(m["recommendedDisplayRGBValue"]) for m in type_entry.get("Modifier", [])
              if "recommendedDisplayRGBValue" in m}
    return shared.pop() if len(shared) == 1 else None


@pytest.mark.parametrize("prompt", BRAIN_PROMPTS)
def test_brain_prompt_maps_to_slicer_entry(prompt):
    value, meaning, modifier, rgb = BRAIN_CASES[prompt]
    s = style_for(prompt, 2)
    fields = s.terminology.split("~")
    assert fields[1] == "SCT^123037004^Anatomical Structure"
    assert fields[2] == f"SCT^{value}^{meaning}"
    assert fields[3] == ("^".join(modifier) if modifier else "^^")
    _slicer_entry(s.terminology)  # context, category, type and modifier exist in Slicer's file
    assert rgb == _expected_rgb(_master_type(value), modifier)  # the table above agrees with Slicer's file
    expected = (tuple(c / 255 for c in rgb) if rgb is not None
                else terminology._FALLBACK_COLOURS[2 % len(terminology._FALLBACK_COLOURS)])
    assert s.color == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("structure", terminology._BRAIN, ids=lambda s: s.type[2])
def test_brain_table_is_slicer_file(structure):
    """Every brain type, its modifiers and colours are those of Slicer's DICOM master list."""
    entry = _master_type(structure.type[1])
    assert _code(entry) == structure.type
    assert tuple(entry.get("recommendedDisplayRGBValue", ())) == (structure.rgb or ())
    modifiers = {_code(m): m for m in entry.get("Modifier", [])}
    if structure.paired:
        assert set(modifiers) == {terminology.LEFT, terminology.RIGHT, terminology.RIGHT_AND_LEFT}
        for side in (terminology.LEFT, terminology.RIGHT):
            assert tuple(modifiers[side].get("recommendedDisplayRGBValue", ())) == (structure.side_rgb or ())
        assert "recommendedDisplayRGBValue" not in modifiers[terminology.RIGHT_AND_LEFT]
    else:
        assert not modifiers and structure.side_rgb is None
    for modifier in ([None, terminology.LEFT, terminology.RIGHT, terminology.RIGHT_AND_LEFT] if structure.paired
                     else [None]):
        expected = _expected_rgb(entry, modifier)
        assert terminology._rgb_for(structure, modifier) == expected


def test_laterality_words_are_whole_words():
    # 'left' inside 'cleft', 'right' inside 'bright' / 'brightest' is no side
    assert style_for("hippocampus near the cleft").terminology.split("~")[3] == "^^"
    assert style_for("brightest part of the hippocampus").terminology.split("~")[3] == "^^"
    assert style_for("cleft lip").terminology is None
    # the heart's left ventricle is no brain structure; 'lateral' is needed
    assert style_for("left ventricle").terminology is None
    # a side given to an unpaired type is kept in the name, not coded (Slicer has no modifier there)
    third = style_for("left third ventricle")
    assert third.terminology.split("~")[2:4] == ["SCT^49841001^Third ventricle", "^^"]
    assert style_for("left and right hippocampus").terminology.split("~")[3] == "^".join(BOTH)
    assert style_for("bilateral hippocampus").terminology.split("~")[3] == "^".join(BOTH)
    assert style_for("hippocampus on both sides").terminology.split("~")[3] == "^".join(BOTH)


def test_side_after_the_first_clause_goes_into_the_name():
    assert style_for("hippocampus, left side").name == "left hippocampus"
    assert style_for("hippocampus, right side").name == "right hippocampus"
    assert style_for("hippocampus, both sides").name == "bilateral hippocampus"
    assert style_for("left hippocampus").name == "left hippocampus"  # side already there
    assert style_for("hippocampi, both").name == "hippocampi"  # a plural says it already
    assert style_for("3rd ventricle, left").name == "3rd ventricle"  # no side coded, none added


def test_lesion_words_win_over_brain_structures():
    s = style_for("tumour in the left thalamus")
    assert "^Neoplasm~" in s.terminology and s.terminology.split("~")[3] == "^^"
    assert "^Mass~" in style_for("mass near the right putamen").terminology
    # organ words keep their old meaning; 'brain' and 'cerebral' alone are still the whole brain
    assert "^Brain~" in style_for("brain").terminology
    assert "^Brain~" in style_for("cerebral aqueduct").terminology
    assert "^Cerebral cortex~" in style_for("cerebral cortex").terminology


@pytest.mark.parametrize("prompt", ["left inferior lateral ventricle", "temporal horn of the right lateral ventricle",
                                    "left cerebellum cortex", "right cerebellar cortex", "left ventral DC",
                                    "white matter hyperintensities", "left claustrum", "something unusual"])
def test_structures_slicer_has_no_entry_for_fall_back(prompt):
    """No terminology (not the wider structure: the temporal horn is not the whole lateral ventricle),
    the prompt as name, the palette colour of its index."""
    styles = [style_for(prompt, i) for i in range(len(terminology._FALLBACK_COLOURS))]
    assert all(s.terminology is None for s in styles)
    assert all(s.name == short_name(prompt) for s in styles)
    assert [s.color for s in styles] == terminology._FALLBACK_COLOURS


def test_seventeen_prompts_seventeen_segments():
    styles = [style_for(p, i) for i, p in enumerate(SEVENTEEN)]
    names = unique_names([s.name for s in styles])
    assert names == SEVENTEEN  # already distinct: nothing renamed
    assert len(set(s.terminology for s in styles)) == 17  # 17 different type + side entries
    assert all(s.terminology for s in styles)
    # the same structure asked twice still gives two segments
    assert unique_names([style_for(p).name for p in ["hippocampus, left side", "left hippocampus"]]) == [
        "left hippocampus", "left hippocampus (2)"]


def test_brain_segments_written_and_read_back(tmp_path):
    """A small synthetic label set (one label value per structure) written by io as .seg.nrrd:
    each segment keeps its name, colour and terminology tag with the side modifier."""
    import slicerio

    labels = np.zeros((3, 6, 6), dtype=np.uint8)
    for value in range(1, len(SEVENTEEN) + 1):
        labels.flat[value * 5] = value
    styles = [style_for(p, i) for i, p in enumerate(SEVENTEEN)]
    names = unique_names([s.name for s in styles])
    specs = [io.SegmentSpec(name=n, mask=labels == v, color=s.color, prompt=p, terminology=s.terminology)
             for v, (p, n, s) in enumerate(zip(SEVENTEEN, names, styles), 1)]
    path = io.write_segmentation(tmp_path / "brain.seg.nrrd", specs, np.diag([-1.0, -1.0, 1.0, 1.0]))
    header = path.read_bytes().split(b"\n\n", 1)[0].decode("ascii")
    assert f"Segment0_Tags:=TerminologyEntry:{styles[0].terminology}|" in header
    assert "~SCT^5366008^Hippocampus~SCT^7771000^Left~" in header
    assert "~SCT^5366008^Hippocampus~SCT^24028007^Right~" in header
    segments, _ = io.read_segmentation(path)
    raw = slicerio.read_segmentation(str(path))["segments"]
    assert [s.name for s in segments] == SEVENTEEN
    for spec, back, entry in zip(specs, segments, raw):
        assert back.terminology == spec.terminology and back.prompt == spec.prompt
        np.testing.assert_allclose(back.color, spec.color)
        np.testing.assert_array_equal(np.asarray(back.mask, bool), spec.mask)
        modifier = spec.terminology.split("~")[3]
        assert ("^".join(entry["terminology"]["typeModifier"]) if "typeModifier" in entry["terminology"]
                else "^^") == modifier
