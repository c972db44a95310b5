"""SVP-CVAE: the shared model contract, LoRA-only text training, KL and its warm-up, CBSM symmetry,
sampling (seeds, agreement -> zero uncertainty), and the engine / CLI uncertainty volume."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base import BaseModelTester  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_tiny_svp_config  # noqa: E402

from TextGuidedSegLib import io  # noqa: E402
from TextGuidedSegLib.checkpoint import LoadedModel, load_pretrained, save_pretrained  # noqa: E402
from TextGuidedSegLib.engine import segment_volume  # noqa: E402
from TextGuidedSegLib.models import build_model  # noqa: E402
from TextGuidedSegLib.models.svp_cvae import CBSM, MARL, gaussian_kl, kl_beta  # noqa: E402
from TextGuidedSegLib.text import TextEncoder, TextEncoderConfig  # noqa: E402

PROMPTS = ["bilateral pulmonary infection, all left lung and all right lung.",
           "unilateral pulmonary infection, one infected area, lower right lung."]


class TestSVPCVAE(BaseModelTester):
    model_type = "svp_cvae"
    aux_losses = ("sal",)
    gradient_groups = {
        "encoder.": "CNN encoder", "marl.ssgm.": "MARL SSGM", "marl.cbsm.": "MARL CBSM", "marl.fuse.": "MARL fusion",
        "visual_in.": "visual projection", "text_levels.": "text levels", "mtf.": "MTF", "prior.": "prior network",
        "latent_out.": "latent projection", "bottleneck_out.": "bottleneck", "regional.": "regional text stage",
        "up16.": "decoder", "up2.": "decoder", "head.": "head",
    }
    # posterior and mask encoder need the ground truth (training with target); FiLM starts at zero
    unused_parameter_prefixes = ("posterior.", "mask_encoder.")
    bad_image_size = (50, 50)
    bad_image_message = "64x64"

    def make_config(self):
        return make_tiny_svp_config()

    def test_backward_reaches_every_part(self, config, model, text):
        """The diagnostic-text FiLMs start as the identity; nudge them as one optimiser step would."""
        with torch.no_grad():
            for film in (model.diagnostic4, model.diagnostic2):
                film.proj.weight.normal_(0.0, 1e-3)
        super().test_backward_reaches_every_part(config, model, text)

    def test_posterior_path_trains_with_target(self, config, model, text):
        model.train()
        model.on_epoch_start(5)
        target = (torch.rand(self.batch_size, 1, 64, 64) > 0.7).float()
        out = model(self.image(config), text, target=target)
        assert set(out["losses"]) == {"kl", "sal"} and out["losses"]["kl"] >= 0
        (out["logits"].mean() + out["losses"]["kl"]).backward()
        for prefix in ("posterior.", "mask_encoder."):
            grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
            assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0, prefix


# ----------------------------------------------------------------------------- text: LoRA only
def test_lora_adapters_are_the_only_trainable_text_parameters():
    encoder = TextEncoder(TextEncoderConfig(max_length=16, lora_layers=[4, 5],
                                            lora_targets=["query", "key", "value", "dense"]))
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".layer.")[1].split(".")[0] for n in trainable} == {"4", "5"}  # the last T = 2 layers
    assert any("intermediate.dense" in n for n in trainable) and any("query" in n for n in trainable)
    model = build_model(make_tiny_svp_config()).train()
    out = model(torch.rand(2, 1, 64, 64), encoder.encode(PROMPTS))
    (out["logits"].mean() + out["losses"]["sal"]).backward()
    grads = {n: p.grad for n, p in encoder.named_parameters() if p.requires_grad}
    assert sum(float(g.abs().sum()) for g in grads.values() if g is not None) > 0
    frozen = [p.grad for n, p in encoder.named_parameters() if not p.requires_grad]
    assert all(g is None for g in frozen)


def test_text_levels_beyond_the_encoder_fail_clearly(minilm):
    model = build_model(make_tiny_svp_config(text_levels=(4, 8, 12)))
    with pytest.raises(ValueError, match="hidden states"):
        model(torch.rand(1, 1, 64, 64), minilm.encode(["left lung"]))


# ----------------------------------------------------------------------------- KL, beta(t)
def test_kl_is_zero_when_posterior_equals_prior():
    mu, log_sigma = torch.randn(4, 6), torch.randn(4, 6) * 0.3
    assert float(gaussian_kl(mu, log_sigma, mu, log_sigma)) == pytest.approx(0.0, abs=1e-6)
    kl = gaussian_kl(mu + 1.0, log_sigma, mu, log_sigma)
    # equal variances: KL = sum over dims of (delta mu)^2 / (2 sigma^2)
    expected = (1.0 / (2 * (2 * log_sigma).exp())).sum(-1).mean()
    torch.testing.assert_close(kl, expected)


def test_beta_follows_the_two_stage_warm_up():
    assert [kl_beta(e, 1.0, start=2, ramp=4) for e in range(8)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert kl_beta(0, 0.5, start=0, ramp=0) == 0.5
    model = build_model(make_tiny_svp_config(kl_warmup_start=3, kl_warmup_epochs=2, kl_weight=2.0))
    seen = []
    for epoch in range(6):
        model.on_epoch_start(epoch)
        seen.append(model.beta)
    assert seen == [0.0, 0.0, 0.0, 1.0, 2.0, 2.0]


# ----------------------------------------------------------------------------- CBSM / MARL
def test_cbsm_of_a_symmetric_input_is_zero():
    torch.manual_seed(0)
    cbsm = CBSM(4, 5)
    half = torch.randn(2, 4, 6, 5)
    symmetric = torch.cat([half, torch.flip(half, dims=(-1,))], dim=-1)
    assert torch.count_nonzero(cbsm(symmetric)) == 0
    asymmetric = symmetric.clone()
    asymmetric[..., 0] += 1.0
    assert cbsm(asymmetric).abs().sum() > 0
    marl = MARL(4, cbsm=True, kernel=5).eval()
    no_cbsm = MARL(4, cbsm=False, kernel=5)
    assert marl(symmetric).shape == symmetric.shape and no_cbsm.cbsm is None


# ----------------------------------------------------------------------------- sampling
@pytest.fixture(scope="module")
def tiny_svp(minilm) -> LoadedModel:
    torch.manual_seed(0)
    net = build_model(make_tiny_svp_config()).eval()
    with torch.no_grad():  # wide prior and a strong latent path: the samples must differ visibly
        net.prior.net[-1].bias[3:].fill_(1.0)
        net.latent_out.weight.mul_(20.0)
        net.head.weight.mul_(50.0)
    return LoadedModel(net, net.config, metadata={"name": "tiny-svp"}, _text_encoder=minilm)


def test_seeds_decide_the_samples(tiny_svp, minilm):
    net = tiny_svp.model
    x = torch.rand(2, 1, 64, 64)
    text = minilm.encode(PROMPTS)
    a = net.sample(x, text, 4, generator=torch.Generator().manual_seed(1))
    b = net.sample(x, text, 4, generator=torch.Generator().manual_seed(1))
    c = net.sample(x, text, 4, generator=torch.Generator().manual_seed(2))
    assert a.shape == (4, 2, 1, 64, 64)
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3
    assert (a[0] - a[1]).abs().max() > 1e-3  # samples differ from each other


def test_uncertainty_is_zero_when_all_samples_agree(tiny_svp, minilm):
    vol = io.read_volume(io.sample_path("qata/cxr_s11234-e19977-r1.png"))
    agree = LoadedModel(build_model(make_tiny_svp_config(clmd=False)).eval(),
                        make_tiny_svp_config(clmd=False), _text_encoder=minilm)
    [r] = segment_volume(vol.array, vol.ijk_to_ras, [PROMPTS[1]], agree, device="cpu", samples=4)
    assert r.uncertainty is not None and np.count_nonzero(r.uncertainty) == 0
    [r] = segment_volume(vol.array, vol.ijk_to_ras, [PROMPTS[1]], tiny_svp, device="cpu", samples=4)
    assert r.uncertainty.max() > 0 and r.uncertainty.max() <= 0.25 + 1e-6  # samples differ: non-zero


def test_engine_sampling_is_seeded_and_mean_based(tiny_svp):
    brain = io.read_volume(io.sample_path("brain1_image.nrrd"))
    run = dict(device="cpu", return_probability=True)
    [a] = segment_volume(brain.array, brain.ijk_to_ras, ["tumour"], tiny_svp, samples=3, seed=7, **run)
    [b] = segment_volume(brain.array, brain.ijk_to_ras, ["tumour"], tiny_svp, samples=3, seed=7, **run)
    [c] = segment_volume(brain.array, brain.ijk_to_ras, ["tumour"], tiny_svp, samples=3, seed=8, **run)
    np.testing.assert_array_equal(a.probability, b.probability)
    np.testing.assert_array_equal(a.uncertainty, b.uncertainty)
    assert not np.array_equal(a.probability, c.probability)
    assert a.uncertainty.shape == brain.array.shape and a.uncertainty.dtype == np.float32
    np.testing.assert_array_equal(a.labels, (a.probability >= 0.5).astype(np.uint8))
    [one] = segment_volume(brain.array, brain.ijk_to_ras, ["tumour"], tiny_svp, samples=1, **run)
    assert one.uncertainty is None  # one sample = the prior mean, nothing to spread


def test_models_that_do_not_sample_refuse_samples(minilm):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import make_tiny_tmc_config

    tmc = LoadedModel(build_model(make_tiny_tmc_config()).eval(), make_tiny_tmc_config(), _text_encoder=minilm)
    with pytest.raises(ValueError, match="samples"):
        segment_volume(np.zeros((1, 64, 64)), np.eye(4), ["lung"], tmc, samples=4, device="cpu")


def test_cli_writes_the_uncertainty_volume(cli, tiny_svp, tmp_path):
    model_dir = save_pretrained(tiny_svp.model, tmp_path / "tiny-svp", metadata={"name": "tiny-svp"})
    loaded = load_pretrained(model_dir)
    assert loaded.config.model_type == "svp_cvae" and loaded.config.samples == 4
    brain = io.sample_path("brain1_image.nrrd")
    out = tmp_path / "out"
    rc, stdout, stderr = cli("predict", brain, "--model", model_dir, "--prompt", "tumour", "--output", out,
                             "--device", "cpu", "--samples", "3", "--quiet")
    assert rc == 0, stderr
    [unc_path] = sorted(out.glob("*_uncertainty.nrrd"))
    unc = io.read_volume(unc_path)
    ref = io.read_volume(brain)
    assert unc.array.shape == ref.array.shape
    np.testing.assert_allclose(unc.ijk_to_ras, ref.ijk_to_ras, atol=1e-6)
    assert 0 <= unc.array.min() and unc.array.max() <= 0.25 + 1e-6 and unc.array.max() > 0


def test_evaluate_scores_the_uncertainty(cli, tiny_svp, tmp_path, shared_data):
    model_dir = save_pretrained(tiny_svp.model, tmp_path / "tiny-svp", metadata={"name": "tiny-svp"})
    report = tmp_path / "scores.json"
    rc, stdout, stderr = cli("evaluate", "--model", model_dir, "--dataset", "qata", "--data-root",
                             shared_data / "qata", "--split", "val", "--limit", "3", "--samples", "2",
                             "--no-distances", "--json", report, "--quiet", "--device", "cpu")
    assert rc == 0, stderr
    import json

    summary = json.loads(report.read_text(encoding="utf-8"))
    assert 0.0 <= summary["uncertainty_auroc"] <= 1.0
    assert 0.0 <= summary["dice_global_confident90"] <= 1.0
    assert "AUROC for wrong pixels" in stdout


def test_cbsm_mirror_is_the_patients_left_right_whatever_the_array_order(tiny_svp):
    """The same anatomy stored with the i axis reversed (and IJK->RAS saying so) gets the same mask:
    the engine shows both as the same radiological slices, so CBSM's width flip mirrors the patient's
    left and right, not an array axis."""
    brain = io.read_volume(io.sample_path("brain1_image.nrrd"))
    flipped = brain.array[:, :, ::-1].copy()
    m = brain.ijk_to_ras.copy()
    m[:3, 3] += m[:3, 0] * (brain.array.shape[2] - 1)
    m[:3, 0] *= -1
    run = dict(device="cpu", samples=1, return_probability=True)
    [a] = segment_volume(brain.array, brain.ijk_to_ras, ["tumour"], tiny_svp, **run)
    [b] = segment_volume(flipped, m, ["tumour"], tiny_svp, **run)
    np.testing.assert_allclose(b.probability[:, :, ::-1], a.probability, atol=1e-6)
