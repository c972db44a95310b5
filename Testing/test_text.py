"""Text encoders: the packaged MiniLM, LoRA, loading BERT / CLIP towers from a local directory,
prompt validation and the left/right word swap."""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import shutil
from pathlib import Path

import pytest
import torch

from TextGuidedSegLib.text import (TextEncoder, TextEncoderConfig, TextEncoderError, TextFeatures, clean_prompt,
                                   resolve_text_model_path, swap_left_right)
from TextGuidedSegLib.text import encoder as encoder_module

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def token_counts(encoder: TextEncoder, prompts: list[str]) -> list[int]:
    """Number of real tokens ([CLS] ... [SEP]) the tokenizer makes of each prompt, capped at max_length."""
    return [min(len(encoder.tokenizer(p)["input_ids"]), encoder.config.max_length) for p in prompts]


# ----------------------------------------------------------------------------- packaged MiniLM
def test_minilm_shapes_mask_and_hidden_states(minilm):
    prompts = ["left lung infection", "bilateral pulmonary infection, two infected areas, all left lung."]
    f = minilm.encode(prompts)
    assert isinstance(f, TextFeatures)
    assert f.tokens.shape == (2, minilm.config.max_length, 384)
    assert f.mask.shape == (2, minilm.config.max_length)
    assert f.pooled.shape == (2, 384)
    assert minilm.config.dim == 384
    # MiniLM-L6: embeddings + 6 layers; the last hidden state is the tokens
    assert len(f.hidden_states) == 7
    assert all(h.shape == f.tokens.shape for h in f.hidden_states)
    assert torch.equal(f.hidden_states[-1], f.tokens)
    assert f.mask.sum(1).tolist() == token_counts(minilm, prompts)
    # padding sits at the end: the mask is 1...1 0...0
    for row, n in zip(f.mask, f.mask.sum(1).tolist()):
        assert row[:n].eq(1).all() and row[n:].eq(0).all()
    assert torch.isfinite(f.tokens).all()
    assert not f.tokens.requires_grad  # frozen encoder


def test_minilm_pooled_is_masked_mean(minilm):
    f = minilm.encode(["upper right lung", "one infected area, lower left lung and middle right lung"])
    m = f.mask.unsqueeze(-1).float()
    expected = (f.tokens * m).sum(1) / m.sum(1)
    torch.testing.assert_close(f.pooled, expected, rtol=1e-5, atol=1e-6)
    # and not simply the mean over all (padded) positions
    assert not torch.allclose(f.pooled[0], f.tokens[0].mean(0), atol=1e-4)


def test_identical_prompts_identical_features(minilm):
    f = minilm.encode(["lower left lung", "lower left lung", "lower right lung"])
    assert torch.equal(f.tokens[0], f.tokens[1])
    assert torch.equal(f.pooled[0], f.pooled[1])
    assert not torch.allclose(f.pooled[0], f.pooled[2])
    # whitespace is normalised before encoding and caching
    g = minilm.encode(["  lower   left\tlung "])
    assert torch.equal(g.pooled[0], f.pooled[0])
    # distinct prompts are far from identical but semantically related prompts are close
    cos = torch.nn.functional.cosine_similarity(f.pooled[0], f.pooled[2], dim=0)
    assert 0.5 < cos < 0.9999


def test_cache_hit_does_not_run_model(minilm, monkeypatch):
    calls: list[list[str]] = []
    original = TextEncoder._run

    def counting(self, prompts):
        calls.append(list(prompts))
        return original(self, prompts)

    monkeypatch.setattr(TextEncoder, "_run", counting)
    prompt = "cache probe: middle right lung, unique string 7f3a"
    first = minilm.encode([prompt])
    assert calls == [[prompt]]
    second = minilm.encode([prompt, prompt])
    assert calls == [[prompt]], "second encode of a cached prompt ran the model again"
    assert torch.equal(second.tokens[0], first.tokens[0]) and torch.equal(second.tokens[1], first.tokens[0])
    # a batch with one new prompt runs the model on that prompt only
    minilm.encode([prompt, "cache probe 2"])
    assert calls == [[prompt], ["cache probe 2"]]


def test_cache_is_bounded_lru():
    enc = TextEncoder(TextEncoderConfig(max_length=8), cache_size=2)
    enc.encode(["a lung"])
    enc.encode(["b lung"])
    enc.encode(["a lung"])  # refresh "a"
    enc.encode(["c lung"])  # evicts "b", the least recently used
    assert list(enc._cache) == ["a lung", "c lung"]


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_empty_prompt_is_refused_with_help(minilm, prompt):
    with pytest.raises(ValueError, match="empty prompt") as exc:
        minilm.encode(["left lung", prompt])
    assert "e.g." in str(exc.value)  # tells the user what a prompt looks like


def test_non_string_prompt_is_refused(minilm):
    with pytest.raises(TypeError, match="must be a string"):
        minilm.encode([None])  # type: ignore[list-item]


def test_very_long_prompt_is_truncated_with_warning(minilm, caplog):
    long_prompt = ("lung " * 2000)[:-1] + "s"  # 10,000 characters, no trailing space
    assert len(long_prompt) == 10_000
    with caplog.at_level(logging.WARNING, logger=encoder_module.__name__):
        f = minilm.encode([long_prompt])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "truncated" in r.getMessage()]
    assert warnings, "no truncation warning was logged"
    assert "10000" in warnings[0].getMessage() and str(encoder_module.MAX_PROMPT_CHARS) in warnings[0].getMessage()
    assert len(clean_prompt(long_prompt)) == encoder_module.MAX_PROMPT_CHARS
    assert f.tokens.shape == (1, minilm.config.max_length, 384)
    assert int(f.mask.sum()) == minilm.config.max_length  # token-level truncation too
    assert torch.isfinite(f.pooled).all()


def test_non_ascii_prompt(minilm):
    prompt = "infección pulmonar bilatéral — 左肺"
    f = minilm.encode([prompt])
    assert f.tokens.shape == (1, minilm.config.max_length, 384)
    assert torch.isfinite(f.tokens).all()
    n = int(f.mask.sum())
    assert 4 < n <= minilm.config.max_length
    # the CJK characters are not dropped: they change the embedding
    g = minilm.encode(["infección pulmonar bilatéral —"])
    assert not torch.allclose(f.pooled, g.pooled)


def test_text_features_index_and_cat(minilm):
    f = minilm.encode(["a", "b b", "c c c"])
    sub = f.index([2, 0])
    assert torch.equal(sub.tokens, f.tokens[[2, 0]])
    assert torch.equal(sub.mask, f.mask[[2, 0]])
    assert len(sub.hidden_states) == len(f.hidden_states)
    both = TextFeatures.cat([f.index([0]), f.index([1, 2])])
    assert torch.equal(both.pooled, f.pooled)
    half = f.to("cpu", dtype=torch.float16)
    assert half.tokens.dtype == torch.float16 and half.mask.dtype == f.mask.dtype


def test_config_validation():
    with pytest.raises(ValueError, match="backend"):
        TextEncoderConfig(backend="t5")
    with pytest.raises(ValueError, match="pooling"):
        TextEncoderConfig(pooling="max")
    with pytest.raises(ValueError, match="max_length"):
        TextEncoderConfig(max_length=1)
    assert TextEncoderConfig().uses_cache
    assert not TextEncoderConfig(trainable=True).uses_cache
    assert not TextEncoderConfig(lora_layers=[0]).uses_cache


# ----------------------------------------------------------------------------- LoRA
def test_lora_adapters_only_in_chosen_layer_and_no_cache(monkeypatch):
    enc = TextEncoder(TextEncoderConfig(max_length=8, lora_layers=[5], lora_targets=["query", "value"]))
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable, "LoRA encoder has no trainable parameters"
    assert all("lora_" in n and ".layer.5." in n for n in trainable), trainable
    assert {n.split(".layer.5.")[1].split(".lora_")[0] for n in trainable} == {"attention.self.query",
                                                                                 "attention.self.value"}
    n_train = sum(p.numel() for p in enc.parameters() if p.requires_grad)
    # rank 8 adapters on two 384x384 projections: 2 * (384*8 + 8*384)
    assert n_train == 2 * 2 * 384 * 8

    calls = []
    original = TextEncoder._run
    monkeypatch.setattr(TextEncoder, "_run", lambda self, p: calls.append(p) or original(self, p))
    f1 = enc.encode(["left lung"])
    enc.encode(["left lung"])
    assert len(calls) == 2, "a LoRA encoder must not answer from the cache"
    assert len(enc._cache) == 0
    assert f1.tokens.requires_grad  # gradients reach the adapters
    f1.pooled.sum().backward()
    grads = {n: p.grad for n, p in enc.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    # lora_B starts at zero, so its gradient (through lora_A's output) is the non-zero one
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


# ----------------------------------------------------------------------------- local HF directories
def _copy_tokenizer(dst: Path) -> None:
    src = Path(resolve_text_model_path("packaged:all-MiniLM-L6-v2"))
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, dst / name)


def test_local_bert_directory_loads(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path)
    _copy_tokenizer(tmp_path)
    cfg = TextEncoderConfig(name_or_path=str(tmp_path), pooling="cls", max_length=12)
    enc = TextEncoder(cfg)
    assert cfg.dim == 32  # filled in from the loaded model
    f = enc.encode(["lower left lung", "polyp"])
    assert f.tokens.shape == (2, 12, 32)
    assert len(f.hidden_states) == 3  # embeddings + 2 layers
    assert torch.equal(f.pooled, f.tokens[:, 0])  # cls pooling
    assert f.mask.sum(1).tolist() == token_counts(enc, ["lower left lung", "polyp"])


def test_local_clip_text_directory_loads(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    # A random CLIP text tower with the MiniLM (BERT) tokenizer saved next to it: EOS is [SEP] (102).
    CLIPTextModel(CLIPTextConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=32, bos_token_id=101,
                                 eos_token_id=102, pad_token_id=0)).save_pretrained(tmp_path)
    _copy_tokenizer(tmp_path)
    cfg = TextEncoderConfig(name_or_path=str(tmp_path), backend="clip", pooling="eos", max_length=10)
    enc = TextEncoder(cfg)
    assert type(enc.model).__name__ == "CLIPTextModel"
    assert cfg.dim == 32
    prompts = ["left lung", "a b c d e"]
    f = enc.encode(prompts)
    assert f.tokens.shape == (2, 10, 32)
    assert len(f.hidden_states) == 3
    # eos pooling = the (final-layer-normed) token at the EOS position, i.e. the last real token
    last = f.mask.sum(1) - 1
    torch.testing.assert_close(f.pooled, f.tokens[torch.arange(2), last])
    assert not torch.allclose(f.pooled, f.tokens[:, 0])


def test_missing_local_directory_fails():
    with pytest.raises(TextEncoderError) as err:
        TextEncoder(TextEncoderConfig(name_or_path="/nonexistent/text/model/dir"))
    message = str(err.value)
    assert message.startswith("Text encoder '/nonexistent/text/model/dir', backend 'auto', could not be loaded on "
                              f"Python {platform.python_version()}, transformers ")
    # the cause differs (transformers 5.x: OSError; 4.x: the hub's "Repo id must be in the form" ValueError)
    cause = err.value.__cause__
    assert f"transformers {importlib.metadata.version('transformers')}, " in message
    assert message.endswith(f": {type(cause).__name__}: {cause}. What to do: there is no directory "
                            "/nonexistent/text/model/dir: give the path of an existing model directory.")


def test_hub_name_unavailable_offline_fails_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TextEncoderError) as err:
        TextEncoder(TextEncoderConfig(name_or_path="textguidedseg-tests/no-such-model"))
    assert isinstance(err.value.__cause__, OSError)
    assert str(err.value).endswith("What to do: 'textguidedseg-tests/no-such-model' is neither a local directory nor a "
                                   "Hugging Face model available offline: give a directory, or download it once with "
                                   "network access (HF_HUB_OFFLINE unset).")


# ----------------------------------------------------------------------------- laterality words
@pytest.mark.parametrize("text, expected", [
    ("lower left lung", "lower right lung"),
    ("all left lung and middle right lung", "all right lung and middle left lung"),
    ("Left lung", "Right lung"),
    ("RIGHT LUNG", "LEFT LUNG"),
    ("left, right.", "right, left."),
    ("leftover rightmost brightness", "leftover rightmost brightness"),
    ("located in right of the image", "located in left of the image"),
    ("no side here", "no side here"),
])
def test_swap_left_right(text, expected):
    assert swap_left_right(text) == expected
    assert swap_left_right(swap_left_right(text)) == text  # an involution
