"""TMC: the shared model contract on a tiny config, plus MCM, InfoNCE and config validation."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base import BaseModelTester  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_tiny_tmc_config  # noqa: E402

from TextGuidedSegLib.models import build_model  # noqa: E402
from TextGuidedSegLib.models.blocks import LearnableTemperature, check_divisible, info_nce  # noqa: E402
from TextGuidedSegLib.models.config import ModelConfig  # noqa: E402
from TextGuidedSegLib.models.tmc import TMC, MultiStageCrossModal, TMCConfig  # noqa: E402


class TestTMC(BaseModelTester):
    model_type = "tmc"
    aux_losses = ("align",)
    gradient_groups = {
        "swin.": "Swin image encoder", "cnn.": "CNN down path", "mcm.": "cross-modal modules (MCM)",
        "text_in.": "text projection", "align_visual.": "alignment heads (visual)",
        "align_text.": "alignment heads (text)", "temperature.": "InfoNCE temperatures",
        "bottleneck.": "decoder bottleneck", "up16.": "decoder", "up8.": "decoder", "up4.": "decoder",
        "up2.": "decoder", "head.": "segmentation head",
    }
    # The language stream produced by the last MCM (F_L of stage 4) feeds nothing: by design no gradient.
    # (DDP training therefore needs find_unused_parameters=True.)
    unused_parameter_prefixes = ("mcm.4.text_from_vision.",)
    bad_image_size = (50, 50)
    bad_image_message = "64x64"

    def make_config(self):
        return make_tiny_tmc_config()

    def test_temperatures_get_gradient_from_alignment(self, config, model, text):
        out = model(self.image(config), text)
        out["losses"]["align"].backward()
        for key, temp in model.temperature.items():
            assert temp.log_tau.grad is not None and temp.log_tau.grad.abs() > 0, key

    def test_align_weight_zero_has_no_align_loss(self, minilm):
        cfg = make_tiny_tmc_config(align_weight=0.0, mcm_stages=(3, 4))
        model = build_model(cfg)
        out = model(torch.rand(1, 1, 64, 64), minilm.encode(["left lung"]))
        assert out["losses"] == {}
        assert out["logits"].shape == (1, 1, 64, 64)

    def test_align_loss_is_weighted_mean_over_stages(self, config, model, text):
        model.eval()
        x = self.image(config)
        with torch.no_grad():
            a = model(x, text)["losses"]["align"]
            model.config.align_weight = 0.2
            b = model(x, text)["losses"]["align"]
        torch.testing.assert_close(b, 2 * a)
        # each stage's InfoNCE of a batch of 2 lies in (0, log 2 + something); 0.1 * mean of them
        assert 0 < float(a) < 0.1 * 2 * math.log(2) + 1.0

    def test_rgb_input(self, minilm):
        cfg = make_tiny_tmc_config(in_channels=3)
        out = build_model(cfg)(torch.rand(1, 3, 64, 64), minilm.encode(["polyp"]))
        assert out["logits"].shape == (1, 1, 64, 64)


# ----------------------------------------------------------------------------- MCM
@pytest.fixture
def mcm_inputs():
    g = torch.Generator().manual_seed(0)
    visual = torch.randn(2, 16, 4, 4, generator=g)
    language = torch.randn(2, 5, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return visual, language, mask


def test_mcm_shapes(mcm_inputs):
    torch.manual_seed(0)
    mcm = MultiStageCrossModal(16, 2).eval()
    visual, language, mask = mcm_inputs
    f_v, f_l = mcm(visual, language, mask)
    assert f_v.shape == visual.shape
    assert f_l.shape == language.shape
    assert torch.isfinite(f_v).all() and torch.isfinite(f_l).all()
    assert not torch.allclose(f_v, visual)  # residual + attention did something


def test_mcm_text_flows_into_visual_and_padding_is_ignored(mcm_inputs):
    torch.manual_seed(0)
    mcm = MultiStageCrossModal(16, 2).eval()
    visual, language, mask = mcm_inputs
    with torch.no_grad():
        f_v, f_l = mcm(visual, language, mask)
        # a real token changed -> F_V of that sample changes, the other sample's does not
        # (random perturbations: a constant shift would be removed by the pre-attention LayerNorm)
        noise = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
        changed = language.clone()
        changed[0, 1] += noise[0, 1]
        f_v2, _ = mcm(visual, changed, mask)
        assert (f_v2[0] - f_v[0]).abs().max() > 1e-4
        torch.testing.assert_close(f_v2[1], f_v[1])
        # a padded token changed (mask 0) -> F_V unchanged: the key padding mask is applied
        padded = language.clone()
        padded[0, 4] += 10 * noise[0, 4]
        f_v3, _ = mcm(visual, padded, mask)
        torch.testing.assert_close(f_v3, f_v)
        # and the language stream attends to the (fused) visual tokens
        _, f_l4 = mcm(visual + torch.randn(visual.shape, generator=torch.Generator().manual_seed(2)),
                      language, mask)
        assert (f_l4 - f_l).abs().max() > 1e-4


# ----------------------------------------------------------------------------- InfoNCE
def test_info_nce_hand_computed_identity():
    v = torch.eye(2)
    t = torch.eye(2)
    loss = info_nce(v, t, torch.tensor(1.0))
    # logits = I: each row's positive has probability e / (e + 1)
    torch.testing.assert_close(loss, torch.tensor(math.log(1 + math.exp(-1))))


def test_info_nce_hand_computed_asymmetric():
    s = 1 / math.sqrt(2)
    v = torch.tensor([[1.0, 0.0], [s, s]])
    t = torch.eye(2)
    loss = info_nce(v, t, torch.tensor(0.5))
    r2 = math.sqrt(2)
    # logits = [[2, 0], [sqrt2, sqrt2]]
    loss_v = 0.5 * (math.log(1 + math.exp(-2)) + math.log(2))
    loss_t = 0.5 * (math.log(1 + math.exp(r2 - 2)) + math.log(1 + math.exp(-r2)))
    torch.testing.assert_close(loss, torch.tensor(0.5 * (loss_v + loss_t)))


def test_info_nce_is_scale_invariant():
    g = torch.Generator().manual_seed(0)
    v, t = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    tau = torch.tensor(0.1)
    torch.testing.assert_close(info_nce(3 * v, 0.5 * t, tau), info_nce(v, t, tau))


def test_info_nce_aligned_beats_shuffled():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 16, generator=g)
    v = t + 0.05 * torch.randn(6, 16, generator=g)
    tau = torch.tensor(0.07)
    aligned = info_nce(v, t, tau)
    shuffled = info_nce(v[torch.tensor([1, 2, 3, 4, 5, 0])], t, tau)
    assert aligned < 0.1
    assert shuffled > aligned + 1.0


def test_info_nce_duplicate_texts_are_positives():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # two identical texts with matching visuals: the target is 50/50 over the pair, so the loss sits
    # at its floor, the entropy log(2), at any temperature (it cannot go below it)
    for tau in (1.0, 0.05):
        loss = info_nce(torch.stack([e1, e1]), torch.stack([e1, e1]), torch.tensor(tau))
        torch.testing.assert_close(loss, torch.tensor(math.log(2)))
    # a duplicated pair + a distinct case at tau 0.05 (logits 20 / 0):
    # rows of the pair: -log(e^20 / (2 e^20 + 1)) = log(2 + e^-20); the distinct row: log(1 + 2 e^-20)
    v = t = torch.stack([e1, e1, e2])
    loss = info_nce(v, t, torch.tensor(0.05))
    expected = (2 * math.log(2 + math.exp(-20)) + math.log(1 + 2 * math.exp(-20))) / 3
    torch.testing.assert_close(loss, torch.tensor(expected))
    # a wrong (single-positive, unnormalised or diagonal-only) target would not give this value:
    # the same loss without the duplicate is ~0, far below
    assert info_nce(torch.stack([e1, e2]), torch.stack([e1, e2]), torch.tensor(0.05)) < 1e-6


def test_info_nce_gradient_pulls_pairs_together():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(4, 8, generator=g, requires_grad=True)
    t = torch.randn(4, 8, generator=g)
    tau = torch.tensor(0.5)
    before = info_nce(v, t, tau)
    before.backward()
    with torch.no_grad():
        after = info_nce(v - 0.5 * v.grad, t, tau)
    assert after < before


def test_learnable_temperature_init_and_clamp():
    temp = LearnableTemperature(0.07)
    torch.testing.assert_close(temp(), torch.tensor(0.07))
    with torch.no_grad():
        temp.log_tau.fill_(10.0)
    assert float(temp().detach()) == 10.0
    with torch.no_grad():
        temp.log_tau.fill_(-20.0)
    assert float(temp().detach()) == pytest.approx(0.01)


def test_check_divisible_message():
    check_divisible(torch.zeros(1, 1, 64, 96), 32, "M")
    with pytest.raises(ValueError, match=r"got 50x70; resize or pad to 64x96"):
        check_divisible(torch.zeros(1, 1, 50, 70), 32, "M")


# ----------------------------------------------------------------------------- config validation
@pytest.mark.parametrize("overrides, message", [
    (dict(num_heads=(3, 1, 2, 2)), "not divisible by 3 heads"),
    (dict(num_heads=(1, 1, 2, 5)), "not divisible by 5 heads"),
    (dict(mcm_heads=3), "mcm_heads"),
    (dict(image_size=48), "divisible by 32"),
    (dict(image_size=8), ">= 16"),
    (dict(mcm_stages=(1, 2)), "mcm_stages"),
    (dict(mcm_stages=()), "mcm_stages"),
    (dict(mcm_stages=(5,)), "mcm_stages"),
    (dict(depths=(1, 1, 1)), "4 Swin stages"),
    (dict(cnn_channels=(4, 4, 8, 8)), "5 entries"),
    (dict(patch_size=2), "patch_size 4"),
    (dict(in_channels=2), "in_channels"),
    (dict(laterality="both"), "laterality"),
])
def test_tmc_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_tiny_tmc_config(**overrides)


def test_tmc_config_from_dict_with_lists_and_nested_dicts():
    cfg = make_tiny_tmc_config()
    data = cfg.to_dict()
    data["depths"] = list(data["depths"])
    again = TMCConfig.from_dict(data)
    assert again.depths == (1, 1, 1, 1) and isinstance(again.depths, tuple)
    assert again.text.max_length == cfg.text.max_length
    assert again.intensity.mode == cfg.intensity.mode


def test_registry_errors(tiny_tmc_config):
    with pytest.raises(KeyError, match="registered models: .*tmc"):
        build_model({"model_type": "no_such_model"})
    with pytest.raises(TypeError, match="TMCConfig"):
        build_model(ModelConfig(model_type="tmc"))


def test_paper_config_size():
    cfg = TMCConfig()
    assert (cfg.embed_dim, cfg.depths, cfg.num_heads, cfg.window_size) == (96, (2, 2, 6, 2), (3, 6, 12, 24), 7)
    assert cfg.image_size == 224 and cfg.mcm_stages == (2, 3, 4) and cfg.align_weight == 0.1
    model = TMC(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 40e6 < n < 60e6, n
    n_swin = sum(p.numel() for p in model.swin.parameters())
    assert 25e6 < n_swin < 30e6, n_swin  # Swin-T backbone (~27.5 M without its final patch merging)
