"""Every segment carries an answer: a confidence (mean probability of its voxels) and a verdict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_tmc_config
from TextGuidedSegLib import io
from TextGuidedSegLib.checkpoint import save_pretrained
from TextGuidedSegLib.engine import segment_volume
from TextGuidedSegLib.io import CONFIDENCE_FOUND, CONFIDENCE_TAG, VERDICT_TAG, read_segmentation, verdict
from TextGuidedSegLib.model_store import load_model
from TextGuidedSegLib.models import build_model

XRAY = io.sample_path("qata/cxr_s11242-e20020-r1.png")
PROMPT = "unilateral pulmonary infection, one infected area, lower right lung."


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_pretrained(build_model(make_tiny_tmc_config()), tmp_path_factory.mktemp("answers") / "tiny")


def test_verdict_rule():
    assert verdict(0, 0.0) == "not found"
    assert verdict(12, CONFIDENCE_FOUND - 0.01) == "not found"  # faint
    assert verdict(1, CONFIDENCE_FOUND) == "found"


def test_engine_confidence_is_the_mean_probability_of_the_labelled_voxels(tiny_model_dir):
    vol = io.read_volume(io.sample_path("brain1_image.nrrd"))
    model = load_model(str(tiny_model_dir))
    probe = segment_volume(vol.array, vol.ijk_to_ras, ["lung"], model, device="cpu", return_probability=True)[0]
    threshold = float(np.median(probe.probability))
    for batch in (3, "auto"):  # accumulated per batch: the same whatever the batch size
        r = segment_volume(vol.array, vol.ijk_to_ras, ["lung"], model, device="cpu", threshold=threshold,
                           return_probability=True, batch_size=batch)[0]
        labelled = r.labels != 0
        assert r.voxels == int(labelled.sum()) > 0
        assert r.confidence == pytest.approx(float(r.probability[labelled].astype(np.float64).mean()), rel=1e-5)
        assert r.verdict == verdict(r.voxels, r.confidence)
    empty = segment_volume(vol.array, vol.ijk_to_ras, ["lung"], model, device="cpu",
                           threshold=float(probe.probability.max()) + 1e-6)[0]
    assert empty.voxels == 0 and empty.confidence == 0.0 and empty.verdict == "not found"


def test_cli_reports_the_answer_and_tags_it(cli, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    rc, stdout, err = cli("predict", XRAY, "--prompt", PROMPT, "--output", out, "--device", "cpu", "-q")
    assert rc == 0, err
    model = load_model(None)
    expected = segment_volume(io.read_volume(XRAY).array, io.read_volume(XRAY).ijk_to_ras, [PROMPT], model)[0]
    assert expected.verdict == "found" and expected.confidence > 0.9  # the shipped model on its own domain
    assert f"unilateral pulmonary infection: found, {expected.voxels} voxels, confidence " \
           f"{expected.confidence:.2f}" in stdout
    (segment,), _ = read_segmentation(out / "cxr_s11242-e20020-r1.seg.nrrd")
    assert segment.tags == {VERDICT_TAG: "found", CONFIDENCE_TAG: f"{expected.confidence:.3f}"}

    # a threshold nothing reaches: an empty segment, said so
    rc, stdout, err = cli("predict", XRAY, "--prompt", PROMPT, "--output", out, "--device", "cpu", "-q",
                          "--threshold", "0.999999", "--overwrite")
    assert rc == 0, err
    assert "unilateral pulmonary infection: not found (no voxel above the threshold)" in stdout
    (segment,), _ = read_segmentation(out / "cxr_s11242-e20020-r1.seg.nrrd")
    assert segment.tags == {VERDICT_TAG: "not found", CONFIDENCE_TAG: "0.000"} and not segment.mask.any()
