"""Segment names, colours and terminology derived from prompts."""

from __future__ import annotations

import numpy as np
import pytest

from TextGuidedSegLib import io
from TextGuidedSegLib.terminology import short_name, style_for, unique_names

INFECTION_COLOUR = (0.85, 0.33, 0.10)
POLYP_COLOUR = (0.89, 0.69, 0.25)


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
    assert "Infectious disease" in s.terminology and "SCT^40733004" in s.terminology
    assert "Morphologically Altered Structure" in s.terminology
    # lesion words win over organ words, whatever the order in the prompt
    assert style_for("lung with covid opacities").color == INFECTION_COLOUR


def test_style_polyp_and_organ():
    s = style_for("one medium white oval polyp, located in center of the image")
    assert s.color == POLYP_COLOUR and "^Polyp~" in s.terminology
    liver = style_for("Liver")
    assert "^Liver~" in liver.terminology and "Anatomical Structure" in liver.terminology
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


def test_every_terminology_is_a_valid_slicer_entry(tmp_path):
    prompts = ["lung infection", "polyp", "tumor", "lesion", "left lung", "liver", "spleen", "kidney", "prostate",
               "brain", "unknown thing"]
    styles = [style_for(p, i) for i, p in enumerate(prompts)]
    mask = np.zeros((1, 4, 4), dtype=bool)
    specs = [io.SegmentSpec(name=s.name, mask=mask, color=s.color, prompt=p, terminology=s.terminology)
             for p, s in zip(prompts, styles)]
    segments, _ = io.read_segmentation(io.write_segmentation(tmp_path / "t.seg.nrrd", specs, np.eye(4)))
    for s, back in zip(styles, segments):
        if s.terminology is None:
            assert back.terminology is None
        else:
            type_code = s.terminology.split("~")[1].split("^")[1]
            assert type_code in back.terminology
        np.testing.assert_allclose(back.color, s.color)


def test_unique_names():
    assert unique_names(["lung", "lung", "lung"]) == ["lung", "lung (2)", "lung (3)"]
    assert unique_names(["lung", "liver"], taken={"lung", "lung (2)"}) == ["lung (3)", "liver"]
    assert unique_names([], taken={"x"}) == []
    taken = {"a"}
    assert unique_names(["a"], taken=taken) == ["a (2)"]
    assert taken == {"a"}, "the caller's set is not modified"
