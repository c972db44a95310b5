"""TGC-Net on a tiny random CLIP: the shared model contract, frozen parts that stay frozen, DATE,
the ablation switches, a self-contained checkpoint round trip, and the engine / CLI."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base import BaseModelTester  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_tiny_clip_dir, make_tiny_tgcnet_config  # noqa: E402

from TextGuidedSegLib import io  # noqa: E402
from TextGuidedSegLib.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from TextGuidedSegLib.engine import segment_volume  # noqa: E402
from TextGuidedSegLib.model_store import load_model  # noqa: E402
from TextGuidedSegLib.models import build_model, encode_prompts  # noqa: E402
from TextGuidedSegLib.models.tgcnet import TGCText  # noqa: E402
from TextGuidedSegLib.text import TextEncoder  # noqa: E402

PROMPTS = ["bilateral pulmonary infection, all left lung and lower right lung.",
           "unilateral pulmonary infection, one infected area, lower right lung."]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip_dir(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def clip_text(clip_dir):
    return TextEncoder(make_tiny_tgcnet_config(clip_dir).text)


class TestTGCNet(BaseModelTester):
    model_type = "tgcnet"
    gradient_groups = {"cnn.": "structure CNN", "proj_clip.": "CLIP projection", "fuse_norm.": "fusion norm",
                       "deform.": "deformable attention", "date.": "DATE", "vlcm.": "VLCM", "cost.": "cost aggregation",
                       "up16.": "decoder", "up4.": "decoder", "head.": "head"}
    unused_parameter_prefixes = ("clip.",)  # the frozen CLIP image tower
    bad_image_size = (50, 50)
    bad_image_message = "64x64"

    @pytest.fixture
    def config(self, clip_dir):
        return make_tiny_tgcnet_config(clip_dir)

    @pytest.fixture
    def model(self, config):
        torch.manual_seed(0)
        model = build_model(config)
        model.load_pretrained_backbone()
        return model

    @pytest.fixture
    def text(self, model, clip_text):
        return encode_prompts(model, clip_text, PROMPTS[: self.batch_size])

    def test_text_changes_the_output(self, config, model, clip_text):
        model.eval()
        x = self.image(config)[:1]
        with torch.no_grad():
            a = model(x, encode_prompts(model, clip_text, ["upper left lung"]))["logits"]
            b = model(x, encode_prompts(model, clip_text, ["colon polyp, round and yellow"]))["logits"]
        assert (a - b).abs().max() > 1e-6


def test_frozen_parts_get_no_gradient_and_stay_bit_identical(clip_dir, clip_text):
    torch.manual_seed(0)
    model = build_model(make_tiny_tgcnet_config(clip_dir))
    model.load_pretrained_backbone()
    from transformers import CLIPVisionModel

    from TextGuidedSegLib.models.tgcnet import clip_vision_tower

    reference = clip_vision_tower(CLIPVisionModel.from_pretrained(clip_dir)).state_dict()
    assert sorted(reference) == sorted(model.clip.state_dict()) and len(reference) == 23  # 1 layer: 5 + 16 + 2
    assert all(torch.equal(model.clip.state_dict()[k], v) for k, v in reference.items())
    before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    text_before = {k: v.clone() for k, v in clip_text.state_dict().items()}
    counts = model.parameter_counts()
    assert counts["frozen"] == sum(v.numel() for v in before.values()) and counts["trainable"] > 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    model.train()
    assert not model.clip.training  # dropout-free even in train mode
    out = model(torch.rand(2, 1, 64, 64), encode_prompts(model, clip_text, PROMPTS))
    out["logits"].mean().backward()
    assert all(p.grad is None for p in model.clip.parameters())
    assert all(p.grad is None for p in clip_text.parameters())
    optimizer.step()
    for k, v in model.clip.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in clip_text.state_dict().items():
        assert torch.equal(v, text_before[k]), k


def test_date_with_identical_prompts_is_residual_self_attention(clip_dir, clip_text):
    """Documented: T_a = T_p gives F_T = LayerNorm(F_p + SelfAttn(F_p)) over the primary prompt."""
    torch.manual_seed(0)
    model = build_model(make_tiny_tgcnet_config(clip_dir)).eval()
    feats = clip_text.encode(PROMPTS)
    with torch.no_grad():
        got, mask = model.date(feats, feats)
        f_p = model.date.proj(feats.tokens)
        attended, _ = model.date.attn(f_p, f_p, f_p, key_padding_mask=~feats.mask.bool())
        torch.testing.assert_close(got, model.date.norm(f_p + attended))
        assert torch.equal(mask, feats.mask)
        # a different auxiliary prompt changes F_T; the primary-only ablation ignores it
        other = clip_text.encode(["focal left lower zone opacities", "diffuse right opacities"])
        assert (model.date(feats, other)[0] - got).abs().max() > 1e-6
        model.date.mode = "primary"
        torch.testing.assert_close(model.date(feats, other)[0], model.date.norm(f_p))


def test_auxiliary_prompts_reach_the_model(clip_dir, clip_text):
    torch.manual_seed(0)
    model = build_model(make_tiny_tgcnet_config(clip_dir))
    text = model.encode_text(clip_text, ["all left lung and lower right lung"])
    from TextGuidedSegLib.text.auxiliary import expand_prompt

    aux = expand_prompt("all left lung and lower right lung")
    assert aux.startswith("diffuse left and focal right lower zone opacities")
    expected = clip_text.encode([aux])
    torch.testing.assert_close(text.auxiliary.tokens, expected.tokens)
    assert isinstance(text.index([0, 0]), TGCText) and text.index([0, 0]).primary.tokens.shape[0] == 2


@pytest.mark.parametrize("switch", [{"sse": False}, {"auxiliary": "primary"}, {"auxiliary": "auxiliary"},
                                    {"vlcm": False}])
def test_ablation_switches(clip_dir, clip_text, switch):
    torch.manual_seed(0)
    full = build_model(make_tiny_tgcnet_config(clip_dir))
    model = build_model(make_tiny_tgcnet_config(clip_dir, **switch))
    out = model(torch.rand(2, 1, 64, 64), encode_prompts(model, clip_text, PROMPTS))
    assert out["logits"].shape == (2, 1, 64, 64) and torch.isfinite(out["logits"]).all()
    if switch == {"sse": False}:
        assert model.clip is None and model.parameter_counts()["frozen"] == 0
    if switch == {"vlcm": False}:
        assert model.vlcm is None and model.parameter_counts()["trainable"] < full.parameter_counts()["trainable"]


def test_checkpoint_is_self_contained(clip_dir, clip_text, tmp_path):
    """The CLIP image tower lives in the weights and the frozen text tower is copied: the model
    loads and segments identically after the CLIP directory is gone."""
    clip_copy = shutil.copytree(clip_dir, tmp_path / "clip")
    torch.manual_seed(0)
    cfg = make_tiny_tgcnet_config(clip_copy)
    model = build_model(cfg)
    model.load_pretrained_backbone()
    encoder = TextEncoder(cfg.text)
    model.eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        expected = model(x, encode_prompts(model, encoder, PROMPTS[:1]))["logits"]
    directory = save_pretrained(model, tmp_path / "tgc", text_encoder=encoder)
    shutil.rmtree(clip_copy)
    loaded = load_pretrained(directory)
    with torch.no_grad():
        got = loaded.model(x, encode_prompts(loaded.model, loaded.text_encoder, PROMPTS[:1]))["logits"]
    torch.testing.assert_close(got, expected)
    counts = loaded.parameter_counts()
    assert counts["image_model_frozen"] > 0 and counts["text_encoder"] > 0


def test_engine_and_cli_on_the_shipped_volume(clip_dir, clip_text, tmp_path, cli):
    torch.manual_seed(0)
    cfg = make_tiny_tgcnet_config(clip_dir)
    model = build_model(cfg)
    model.load_pretrained_backbone()
    directory = save_pretrained(model.eval(), tmp_path / "tiny-tgc", text_encoder=TextEncoder(cfg.text))
    vol = io.read_volume(io.sample_path("brain1_image.nrrd"))
    loaded = load_model(str(directory))
    [res] = segment_volume(vol.array, vol.ijk_to_ras, ["tumour"], loaded, device="cpu", return_probability=True)
    assert res.labels.shape == vol.array.shape and np.isfinite(res.probability).all()
    assert res.probability.std() > 0
    rc, out, err = cli("predict", io.sample_path("brain1_image.nrrd"), "--model", directory, "--prompt", "tumour",
                       "--output", tmp_path / "out", "--device", "cpu", "-q")
    assert rc == 0, err
    segments, _ = io.read_segmentation(tmp_path / "out" / "brain1_image.seg.nrrd")
    assert [s.name for s in segments] == ["tumour"]
    np.testing.assert_array_equal(segments[0].mask, res.labels.astype(bool))
    rc, out, err = cli("models", "info", directory)
    assert rc == 0, err
    info = json.loads(out[out.index("{"):])  # after the readable summary
    assert info["parameters"]["image_model_frozen"] == model.parameter_counts()["frozen"]
    assert info["parameters"]["image_model_trainable"] == model.parameter_counts()["trainable"]
