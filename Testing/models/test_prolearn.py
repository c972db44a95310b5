"""ProLearn: the language-guided U-Net contract (the token-relevance model, no bank), the prototype
bank's query / respond (top-k, weights, gradients), text-free inference through the engine, the
CLI and a checkpoint round trip, and what a prompt does to a text-free model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base import BaseModelTester  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_tiny_prolearn_config, make_tiny_prolearn_with_bank, make_tiny_tmc_config  # noqa: E402

from TextGuidedSegLib import io  # noqa: E402
from TextGuidedSegLib.checkpoint import LoadedModel, load_pretrained, save_pretrained  # noqa: E402
from TextGuidedSegLib.engine import segment_volume  # noqa: E402
from TextGuidedSegLib.models import build_model  # noqa: E402
from TextGuidedSegLib.models.prolearn import ProLearnConfig  # noqa: E402

EYE = np.eye(4)


class TestProLearn(BaseModelTester):
    """With no bank ProLearn is the plain language-guided U-Net PSA trains to score tokens."""

    model_type = "prolearn"
    gradient_groups = {"encoder.": "image encoder", "stage16.guide.": "guide attention at 1/16",
                       "stage8.guide.": "guide attention at 1/8", "stage4.guide.": "guide attention at 1/4",
                       "upsample.": "sub-pixel head", "head.": "head"}
    unused_parameter_prefixes = ("query_prototypes", "response_prototypes")  # empty (N = 0)
    bad_image_size = (50, 50)
    bad_image_message = "64x64"

    def make_config(self):
        return make_tiny_prolearn_config()

    def test_attention_weights_for_token_relevance(self, config, model, text):
        with torch.no_grad():
            out = model(self.image(config), text, need_weights=True)
        sizes = [(64 // s) ** 2 for s in (16, 8, 4)]
        assert [tuple(w.shape) for w in out["attention"]] == [(self.batch_size, n, 16) for n in sizes]
        for w in out["attention"]:
            torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))  # a distribution over tokens
            assert float(w[text.mask[:, None, :].expand_as(w) == 0].abs().max()) == 0.0  # padding gets none


def test_config_validation():
    with pytest.raises(ValueError, match="top_k"):
        make_tiny_prolearn_config(num_prototypes=2, top_k=3)
    with pytest.raises(ValueError, match="encoder"):
        make_tiny_prolearn_config(encoder="resnet")
    assert make_tiny_prolearn_config(num_prototypes=4).text_free
    assert not make_tiny_prolearn_config().text_free


def test_query_picks_the_nearest_prototypes_and_weights_sum_to_one():
    model = make_tiny_prolearn_with_bank(num_prototypes=6)
    feature = torch.randn(3, model.query_prototypes.shape[1])
    idx, weights = model.query(feature)
    cos = torch.nn.functional.cosine_similarity(feature[:, None], model.query_prototypes[None], dim=-1)
    expected = cos.topk(3, dim=1)
    assert torch.equal(idx, expected.indices)
    torch.testing.assert_close(weights, torch.softmax(expected.values, dim=1))
    torch.testing.assert_close(weights.sum(1), torch.ones(3))
    assert (weights[:, :-1] >= weights[:, 1:]).all()  # the nearest weighs most
    # an image equal to a prototype finds that prototype first
    idx, _ = model.query(model.query_prototypes[4:5].detach() * 2.5)
    assert idx[0, 0] == 4
    tokens, mask = model.respond(idx, weights[:1])
    expected_tokens = (weights[:1, :, None, None] * model.response_prototypes[idx]).sum(1)
    torch.testing.assert_close(tokens, expected_tokens)
    assert torch.equal(mask, model.response_mask[idx].amax(1))


def test_text_free_forward_reads_only_the_top_k_responses():
    model = make_tiny_prolearn_with_bank(num_prototypes=6)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        base = model(x)["logits"]
        f32 = model.encoder(x)[3].mean(dim=(2, 3))
        idx, _ = model.query(f32)
        unused = sorted(set(range(6)) - set(idx[0].tolist()))
        # (random changes: a constant shift of a token would vanish in the attention's LayerNorm)
        model.response_prototypes[unused] += torch.randn_like(model.response_prototypes[unused])  # not picked
        torch.testing.assert_close(model(x)["logits"], base)
        model.response_prototypes[idx[0, 0]] += torch.randn_like(model.response_prototypes[0])  # the nearest one
        assert (model(x)["logits"] - base).abs().max() > 1e-4


def test_bank_is_trained_by_the_segmentation_loss():
    model = make_tiny_prolearn_with_bank(num_prototypes=6).train()
    x = torch.rand(2, 1, 64, 64)
    out = model(x)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out["logits"], (x > 0.5).float())
    loss.backward()
    picked = model.query(model.encoder(x)[3].mean(dim=(2, 3)))[0].unique()
    assert model.query_prototypes.grad[picked].abs().sum() > 0        # through the softmax weights
    assert model.response_prototypes.grad[picked].abs().sum() > 0
    others = sorted(set(range(6)) - set(picked.tolist()))
    if others:
        assert model.response_prototypes.grad[others].abs().sum() == 0


def test_prompt_replaces_the_bank_answer(minilm):
    """Documented behaviour: a prompt given to a text-free model is used in place of the bank's answer."""
    model = make_tiny_prolearn_with_bank(num_prototypes=6)
    x = torch.rand(1, 1, 64, 64)
    text = minilm.encode(["bilateral pulmonary infection"])
    with torch.no_grad():
        with_text = model(x, text)["logits"]
        assert (with_text - model(x)["logits"]).abs().max() > 1e-5
        model.response_prototypes.add_(torch.randn_like(model.response_prototypes))
        torch.testing.assert_close(model(x, text)["logits"], with_text)  # the bank is not read


def test_convnext_encoder_and_pretrained_backbone(tmp_path):
    """The paper's encoder (transformers ConvNeXt); pretrained weights load from an id or a local directory."""
    from transformers import ConvNextConfig, ConvNextModel

    cfg = make_tiny_prolearn_config(encoder="convnext", convnext_hidden_sizes=(8, 8, 16, 16),
                                    convnext_depths=(1, 1, 1, 1), decoder_channels=(8, 8, 4))
    torch.manual_seed(1)
    ConvNextModel(ConvNextConfig(num_channels=1, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1])).save_pretrained(
        tmp_path / "convnext")
    cfg.convnext_pretrained = str(tmp_path / "convnext")
    model = build_model(cfg)
    feats = model.encoder(torch.rand(2, 1, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 16, 16), (8, 8, 8), (16, 4, 4), (16, 2, 2)]
    model.load_pretrained_backbone()
    reference = ConvNextModel.from_pretrained(tmp_path / "convnext")
    for k, v in reference.state_dict().items():
        assert torch.equal(model.encoder.net.state_dict()[k], v), k


def test_checkpoint_round_trip_keeps_the_bank(tmp_path):
    model = make_tiny_prolearn_with_bank(num_prototypes=6)
    directory = save_pretrained(model, tmp_path / "pl")
    loaded = load_pretrained(directory)
    assert isinstance(loaded.config, ProLearnConfig) and loaded.config.num_prototypes == 6 and loaded.config.text_free
    assert not loaded.model.requires_text
    for name in ("query_prototypes", "response_prototypes", "response_mask", "prototype_cluster"):
        assert torch.equal(getattr(loaded.model, name), getattr(model, name)), name
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x)["logits"], model(x)["logits"])


def test_engine_segments_without_a_prompt(minilm):
    model = make_tiny_prolearn_with_bank()
    loaded = LoadedModel(model=model, config=model.config, metadata={"name": "tiny-prolearn"}, _text_encoder=minilm)
    volume = np.random.default_rng(0).random((3, 40, 50)).astype(np.float32)
    [result] = segment_volume(volume, EYE, None, loaded, device="cpu", return_probability=True)
    assert result.prompt == "" and result.labels.shape == (3, 40, 50)
    assert 0.0 <= result.probability.min() and result.probability.max() <= 1.0
    assert result.probability.std() > 0
    [again] = segment_volume(volume, EYE, [], loaded, device="cpu", return_probability=True)
    np.testing.assert_array_equal(again.probability, result.probability)
    [prompted] = segment_volume(volume, EYE, ["lung infection"], loaded, device="cpu", return_probability=True)
    assert prompted.prompt == "lung infection"
    assert np.abs(prompted.probability - result.probability).max() > 1e-6


def test_relevance_model_needs_a_prompt(minilm):
    model = build_model(make_tiny_prolearn_config()).eval()
    loaded = LoadedModel(model=model, config=model.config, metadata={"name": "relevance"}, _text_encoder=minilm)
    with pytest.raises(ValueError, match="needs a text prompt"):
        segment_volume(np.zeros((1, 32, 32), np.float32), EYE, None, loaded, device="cpu")


def test_cli_predict_without_prompt(cli, tmp_path):
    model_dir = save_pretrained(make_tiny_prolearn_with_bank(), tmp_path / "tiny-prolearn")
    image = io.sample_path("qata/cxr_s11234-e19977-r1.png")
    rc, out, err = cli("predict", image, "--model", model_dir, "--output", tmp_path / "out", "--device", "cpu", "-q")
    assert rc == 0, err
    [seg_file] = (tmp_path / "out").glob("*.seg.nrrd")
    segments, _ = io.read_segmentation(seg_file)
    assert [s.name for s in segments] == ["segmentation"] and segments[0].prompt == ""
    assert segments[0].mask.shape[1:] == io.read_volume(image).array.shape[1:]
    # a text-guided model still refuses to run without --prompt
    tmc_dir = save_pretrained(build_model(make_tiny_tmc_config()), tmp_path / "tiny-tmc")
    rc, out, err = cli("predict", image, "--model", tmc_dir, "--output", tmp_path / "out2", "--device", "cpu", "-q")
    assert rc == 2 and "needs --prompt" in err
    assert not (tmp_path / "out2").exists() or not list((tmp_path / "out2").iterdir())


def test_cli_evaluate_no_prompt(cli, tmp_path, shared_data):
    model_dir = save_pretrained(make_tiny_prolearn_with_bank(), tmp_path / "tiny-prolearn")
    rc, out, err = cli("evaluate", "--model", model_dir, "--dataset", "qata", "--data-root", shared_data / "qata",
                       "--limit", "3", "--no-prompt", "--no-distances", "--device", "cpu", "-q",
                       "--save-predictions", tmp_path / "preds")
    assert rc == 0, err
    assert "text-free: no prompt" in out and "Dice global" in out
    assert len(list((tmp_path / "preds").glob("*.png"))) == 3
    tmc_dir = save_pretrained(build_model(make_tiny_tmc_config()), tmp_path / "tiny-tmc")
    rc, out, err = cli("evaluate", "--model", tmc_dir, "--dataset", "qata", "--data-root", shared_data / "qata",
                       "--limit", "1", "--no-prompt", "--device", "cpu", "-q")
    assert rc == 2 and "--no-prompt is for text-free models" in err
