"""SSA: the shared model contract, Sinkhorn against POT, guidance inside the model, ablations,
checkpoint round trip, and the engine + CLI on the shipped sample."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base import BaseModelTester  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_tiny_ssa_config  # noqa: E402

from TextGuidedSegLib import io  # noqa: E402
from TextGuidedSegLib.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from TextGuidedSegLib.engine import segment_volume  # noqa: E402
from TextGuidedSegLib.models import build_model, encode_prompts  # noqa: E402
from TextGuidedSegLib.models.ssa import SSAConfig, SSAText, cosine_cost, outside_mass, sinkhorn  # noqa: E402

SAMPLE = "qata/cxr_s11234-e19977-r1"


class TestSSA(BaseModelTester):
    model_type = "ssa"
    aux_losses = ("align", "guidance")
    gradient_groups = {
        "encoder.": "CNN image encoder", "region_in.": "region projection", "text_in.": "expression projection",
        "regions_to_text.": "OT regions -> expressions", "text_to_regions.": "OT expressions -> regions",
        "region_out.": "fused region projection", "text_out.": "text vector", "film.": "decoder FiLM",
        "temperature.": "InfoNCE temperature", "up16.": "decoder", "up2.": "decoder", "head.": "head",
    }
    bad_image_size = (50, 50)
    bad_image_message = "64x64"

    def make_config(self):
        return make_tiny_ssa_config()

    def test_backward_reaches_every_part(self, config, model, text):
        """FiLM starts as the identity (zero-initialised projections, like a zero convolution), so
        the text vector behind it gets gradient from the second step on: nudge FiLM off zero first,
        as one optimiser step would, then hold the model to the shared contract."""
        with torch.no_grad():
            for film in model.film:
                film.proj.weight.normal_(0.0, 1e-3)
        super().test_backward_reaches_every_part(config, model, text)

    def test_film_starts_as_identity_and_learns(self, config, model, text):
        model.train()
        out = model(self.image(config), text)
        out["logits"].mean().backward()
        assert all(float(f.proj.weight.grad.abs().sum()) > 0 for f in model.film)

    def test_text_must_be_ssa_text(self, config, model, minilm):
        with pytest.raises(TypeError, match="encode_text"):
            model(self.image(config), minilm.encode(["left lung", "right lung"]))

    def test_side_of_the_prompt_changes_the_output(self, config, model, minilm):
        model.eval()
        x = self.image(config)[:1]
        with torch.no_grad():
            left = model(x, encode_prompts(model, minilm, ["infection, lower left lung"]))["logits"]
            right = model(x, encode_prompts(model, minilm, ["infection, lower right lung"]))["logits"]
        assert (left - right).abs().max() > 1e-4


# ----------------------------------------------------------------------------- text input
def test_encode_text_expressions_and_cells(minilm):
    model = build_model(make_tiny_ssa_config())
    text = model.encode_text(minilm, ["unilateral pulmonary infection, one infected area, lower right lung.",
                                      "polyp"])
    assert isinstance(text, SSAText)
    assert text.expressions.shape == (2, 4, 384)
    assert text.expression_mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 1]]
    # the expressions are the encoder's own pooled vectors of each parsed string
    torch.testing.assert_close(text.expressions[0, 1], minilm.encode(["lower right lung"]).pooled[0])
    assert torch.count_nonzero(text.expressions[1, 1:3]) == 0
    # image convention: 'right' = right column, 'lower' = bottom row; no location = everything allowed
    assert text.cells[0].tolist() == [[0, 0], [0, 0], [0, 1]]
    assert text.cells[1].tolist() == [[1, 1]] * 3
    picked = text.index([1, 1, 0])
    assert picked.cells.shape == (3, 3, 2) and picked.cells[2].tolist() == text.cells[0].tolist()


def test_encode_text_follows_the_models_laterality(minilm):
    model = build_model(make_tiny_ssa_config(laterality="patient"))
    text = model.encode_text(minilm, ["lower right lung"])
    # the engine shows slices radiologically: the patient's right is the picture's left column
    assert text.cells[0].tolist() == [[0, 0], [0, 0], [1, 0]]
    sagittal = model.encode_text(minilm, ["lower right lung"], plane="sagittal")
    assert sagittal.cells[0].tolist() == [[0, 0], [0, 0], [1, 1]]  # no left-right axis in a sagittal slice


# ----------------------------------------------------------------------------- Sinkhorn
def _random_problem(seed: int, n: int = 7, m: int = 4):
    g = torch.Generator().manual_seed(seed)
    cost = cosine_cost(torch.randn(2, n, 5, generator=g), torch.randn(2, m, 5, generator=g))
    a = torch.rand(2, n, generator=g) + 0.1
    b = torch.rand(2, m, generator=g) + 0.1
    return cost, a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")  # POT's own stop test at 1e-9; plans agree
@pytest.mark.parametrize("epsilon", [0.05, 0.1, 0.5])
def test_sinkhorn_matches_pot(epsilon):
    ot = pytest.importorskip("ot")
    cost, a, b = _random_problem(0)
    plan = sinkhorn(cost, a, b, epsilon, iterations=500)
    for k in range(2):
        ref = ot.sinkhorn(a[k].double().numpy(), b[k].double().numpy(), cost[k].double().numpy(), reg=epsilon,
                          method="sinkhorn_log", numItermax=5000, stopThr=1e-9)
        np.testing.assert_allclose(plan[k].double().numpy(), ref, atol=2e-5)


def test_sinkhorn_marginals_and_masked_columns():
    cost, a, b = _random_problem(1)
    b[:, -1] = 0.0  # an expression the prompt does not have
    b = b / b.sum(1, keepdim=True)
    plan = sinkhorn(cost, a, b, 0.1, iterations=200)
    assert (plan >= 0).all()
    torch.testing.assert_close(plan.sum(1), b, atol=1e-6, rtol=0)   # exact after the last update
    torch.testing.assert_close(plan.sum(2), a, atol=1e-4, rtol=0)   # converged
    assert float(plan[:, :, -1].max()) < 1e-12
    # cheaper pairs carry more mass: the plan is not uniform
    assert float(plan.std()) > 1e-3


def test_sinkhorn_is_differentiable():
    cost, a, b = _random_problem(2)
    cost.requires_grad_(True)
    plan = sinkhorn(cost, a, b, 0.1, iterations=30)
    (plan * cost).sum().backward()
    assert torch.isfinite(cost.grad).all() and cost.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- guidance loss, ablations
def test_outside_mass_counts_probability_outside_the_guidance():
    guide = torch.zeros(1, 1, 8, 8)
    guide[..., :, :4] = 1
    inside = torch.full((1, 1, 8, 8), -20.0)
    inside[..., 2:6, 0:4] = 20.0
    outside = torch.full((1, 1, 8, 8), -20.0)
    outside[..., 2:6, 4:8] = 20.0
    assert float(outside_mass(inside, guide)) < 1e-6
    assert float(outside_mass(outside, guide)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("ot, guidance", [("none", True), ("regions_to_text", True), ("symmetric", False)])
def test_ablations_build_and_drop_their_parts(ot, guidance, minilm):
    model = build_model(make_tiny_ssa_config(ot=ot, guidance=guidance)).train()
    text = encode_prompts(model, minilm, ["infection, lower left lung", "polyp"])
    out = model(torch.rand(2, 1, 64, 64), text)
    assert out["logits"].shape == (2, 1, 64, 64)
    assert (model.regions_to_text is None) == (ot == "none")
    assert (model.text_to_regions is None) == (ot != "symmetric")
    assert ("guidance" in out["losses"]) == guidance
    assert model.encoder.stages[0][0].in_channels == 1 + int(guidance)  # the prior is an input channel


def test_config_validation():
    with pytest.raises(ValueError, match="ot must be"):
        SSAConfig(ot="both")
    with pytest.raises(ValueError, match="region_stride"):
        SSAConfig(region_stride=8)
    with pytest.raises(ValueError, match="divisible by 32"):
        SSAConfig(image_size=100)


# ----------------------------------------------------------------------------- checkpoint, engine, CLI
def _save_tiny_ssa(directory: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(make_tiny_ssa_config()).eval()
    with torch.no_grad():  # spread probabilities around 0.5 so the label map is not empty
        model.head.weight.mul_(200.0)
    return save_pretrained(model, directory, metadata={"name": "tiny-ssa"})


@pytest.fixture(scope="module")
def tiny_ssa_dir(tmp_path_factory) -> Path:
    return _save_tiny_ssa(tmp_path_factory.mktemp("ssa") / "tiny-ssa")


def test_checkpoint_round_trip(tiny_ssa_dir, minilm):
    loaded = load_pretrained(tiny_ssa_dir)
    assert loaded.config.model_type == "ssa" and loaded.config.ot == "symmetric"
    torch.manual_seed(0)
    original = build_model(make_tiny_ssa_config()).eval()
    with torch.no_grad():
        original.head.weight.mul_(200.0)
    x = torch.rand(2, 1, 64, 64)
    prompts = ["infection, lower left lung", "bilateral pulmonary infection"]
    with torch.no_grad():
        a = original(x, encode_prompts(original, minilm, prompts))["logits"]
        b = loaded.model(x, encode_prompts(loaded.model, minilm, prompts))["logits"]
    torch.testing.assert_close(a, b)


def test_engine_on_shipped_sample(tiny_ssa_dir):
    loaded = load_pretrained(tiny_ssa_dir)
    vol = io.read_volume(io.sample_path(f"{SAMPLE}.png"))
    left, right = segment_volume(vol.array, vol.ijk_to_ras, ["infection, lower left lung", "infection, lower right lung"],
                                 loaded, device="cpu", return_probability=True, prompt_laterality="image")
    assert left.labels.shape == vol.array.shape and left.labels.dtype == np.uint8
    assert 0 < left.labels.sum() < left.labels.size
    assert not np.array_equal(left.probability, right.probability)


def test_cli_predict_on_shipped_sample(cli, tiny_ssa_dir, tmp_path):
    rc, stdout, stderr = cli("predict", io.sample_path(f"{SAMPLE}.png"), "--model", tiny_ssa_dir,
                             "--prompt", "infection in the left lower lung", "--output", tmp_path, "--device", "cpu")
    assert rc == 0, stderr
    segments, ijk_to_ras = io.read_segmentation(tmp_path / f"{Path(SAMPLE).name}.seg.nrrd")
    [segment] = segments
    assert segment.prompt == "infection in the left lower lung"
    assert segment.mask.shape == (1, 224, 224) and 0 < segment.mask.sum() < segment.mask.size


def test_fine_tuned_text_encoder_gets_gradients():
    """The paper config fine-tunes the text encoder: the expression vectors must stay in the graph."""
    from TextGuidedSegLib.text import TextEncoder, TextEncoderConfig

    encoder = TextEncoder(TextEncoderConfig(max_length=16, trainable=True))
    model = build_model(make_tiny_ssa_config()).train()
    text = encode_prompts(model, encoder, ["infection, lower left lung", "polyp"])
    assert text.expressions.requires_grad
    out = model(torch.rand(2, 1, 64, 64), text)
    (out["logits"].mean() + sum(out["losses"].values())).backward()
    grads = [p.grad for p in encoder.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
