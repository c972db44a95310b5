"""The hybrid-text parser on the real QaTa reports and Kvasir prompts, and on users' phrasing."""

from __future__ import annotations

import collections
import json

import pytest

from TextGuidedSegLib.data import read_dataset, read_mask
from TextGuidedSegLib.guidance import side_columns
from TextGuidedSegLib.metrics import SegmentationScores
from TextGuidedSegLib.text.hybrid import LocationClause, parse_clause, parse_report


def test_qata_report_split_into_three_expressions():
    h = parse_report("bilateral pulmonary infection, two infected areas, all left lung and middle lower right lung.")
    assert h.diagnostic == "bilateral pulmonary infection"
    assert h.descriptive == "two infected areas"
    assert h.locational == "all left lung and middle lower right lung"
    assert h.clauses == (LocationClause(frozenset({"left"})),
                         LocationClause(frozenset({"right"}), frozenset({"middle", "lower"})))
    assert h.bilateral and h.unilateral_side is None
    assert h.expressions[0] == h.sentence


@pytest.mark.parametrize("text, side, zones", [
    ("unilateral pulmonary infection, one infected area, lower right lung.", "right", {"lower"}),
    ("unilateral pulmonary infection, two infected areas, upper middle lower left lung.", "left",
     {"upper", "middle", "lower"}),
    ("unilateral pulmonary infection, one infected area, all left lung.", "left", set()),
    ("infection in the left lower lung", "left", {"lower"}),
    ("Left upper lobe consolidation", "left", {"upper"}),
])
def test_one_sided_reports(text, side, zones):
    h = parse_report(text)
    assert h.unilateral_side == side
    assert set().union(*(c.vertical for c in h.clauses)) == zones


def test_user_phrasing_splits_location_out_of_the_finding():
    h = parse_report("pulmonary infection in the left lower lung")
    assert h.diagnostic == "pulmonary infection" and h.locational == "left lower lung"
    h = parse_report("bilateral pulmonary infection, lower left lung")  # the panel's example
    assert h.clauses == (LocationClause(frozenset({"left"}), frozenset({"lower"})),)
    assert h.unilateral_side is None  # "bilateral" in the text: not counted as a one-sided case


def test_side_less_clause_covers_everything():
    # a real QaTa report: "all lung and all right lung" names no side in its first clause
    h = parse_report("bilateral pulmonary infection, two infected areas, all lung and all right lung.")
    assert h.clauses[0] == LocationClause()
    assert h.unilateral_side is None


def test_generic_fallback_and_no_location():
    h = parse_report("liver tumour")
    assert (h.locational, h.descriptive, h.diagnostic) == ("", "", "liver tumour")
    assert h.clauses == () and h.sides == frozenset()
    assert parse_clause("both lungs").sides == frozenset({"left", "right"})
    assert parse_clause("anterior left").depth == frozenset({"anterior"})


def test_kvasir_prompts():
    h = parse_report("one medium yellow round polyp, located in bottom right of the image")
    assert h.descriptive == "one medium yellow round polyp"
    assert h.diagnostic == "polyp"
    assert h.clauses == (LocationClause(frozenset({"right"}), frozenset({"lower"})),)
    center = parse_report("one small white circle polyp, center of the image")
    assert center.clauses == (LocationClause(frozenset(), frozenset({"middle"})),)


def test_every_real_report_parses(shared_data):
    """All 7,142 QaTa train+val reports: three expressions each, every named side found."""
    root = shared_data / "qata"
    split = json.loads((root / "split.json").read_text(encoding="utf-8"))
    kinds = collections.Counter()
    for cid in split["train"] + split["val"]:
        text = (root / "reports" / f"{cid}.txt").read_text(encoding="utf-8")
        h = parse_report(text)
        assert h.locational and h.descriptive and h.diagnostic, text
        assert h.sides == {w for w in ("left", "right") if w in text}, text
        assert "infect" in h.descriptive or "area" in h.descriptive, text
        kinds[h.unilateral_side] += 1
        kinds["one side named"] += len(h.sides) == 1
    assert kinds["one side named"] == 1487  # shared/data/README.md: one-sided train+val cases
    # all but covid_3101 ("bilateral ..., all lung and all right lung"), which is not one-sided
    assert kinds["left"] + kinds["right"] == 1486


def test_kvasir_prompts_parse(shared_data):
    entries = json.loads((shared_data / "kvasir" / "anns" / "val.json").read_text(encoding="utf-8"))
    for e in entries:
        h = parse_report(e["prompts"]["p6"])
        assert "polyp" in h.diagnostic or "polyp" in h.descriptive
        assert h.clauses, e["prompts"]["p6"]


def test_unilateral_val_cases_and_ground_truth_laterality(shared_data):
    """421 one-sided validation reports; their own masks break the side rule in 1.2 % (the README)."""
    scores = SegmentationScores()
    sides = collections.Counter()
    for case in read_dataset("qata", shared_data / "qata", "val"):
        side = parse_report(case.text).unilateral_side
        sides[side] += 1
        if side:
            mask = read_mask(case.mask_path)
            scores.add(case.case_id, mask, mask, named_column=side_columns(case.laterality)[side])
    assert sides["left"] + sides["right"] == 421
    summary = scores.summary()
    assert summary["laterality_cases"] == 421
    assert summary["laterality_error_rate"] == pytest.approx(5 / 421)
