"""Model directories: round trip, fp16 storage, and every way a directory can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from TextGuidedSegLib.checkpoint import (CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, CheckpointError, load_pretrained,
                                         read_config, save_pretrained, sha256_of)
from TextGuidedSegLib.models import build_model


@pytest.fixture
def tiny_model(tiny_tmc_config):
    torch.manual_seed(0)
    model = build_model(tiny_tmc_config())
    # make BatchNorm running statistics non-trivial so that buffers are part of the round trip
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def inputs(minilm):
    torch.manual_seed(1)
    return torch.rand(2, 1, 64, 64), minilm.encode(["lower left lung", "all right lung"])


@pytest.fixture
def saved(tiny_model, tmp_path) -> Path:
    return save_pretrained(tiny_model, tmp_path / "model", metadata={"name": "tiny", "validation": {"dice": 0.5}},
                           card="# tiny\n")


def _logits(model, inputs):
    with torch.no_grad():
        return model(*inputs)["logits"]


def test_round_trip_same_outputs(tiny_model, saved, inputs):
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    loaded = load_pretrained(saved)
    assert type(loaded.model) is type(tiny_model)
    assert not loaded.model.training
    assert loaded.config.to_dict() == tiny_model.config.to_dict()
    assert loaded.metadata == {"name": "tiny", "validation": {"dice": 0.5}}
    assert loaded.name == "tiny"
    assert loaded.path == saved
    assert torch.equal(_logits(loaded.model, inputs), _logits(tiny_model, inputs))
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    payload = json.loads((saved / CONFIG_NAME).read_text(encoding="utf-8"))
    assert payload["format_version"] == FORMAT_VERSION and payload["model_type"] == "tmc"
    assert (saved / "README.md").read_text(encoding="utf-8") == "# tiny\n"


def test_lazy_text_encoder_of_loaded_model(saved):
    loaded = load_pretrained(saved)
    assert loaded._text_encoder is None  # not loaded until asked for
    feats = loaded.text_encoder.encode(["left lung"])
    assert feats.tokens.shape == (1, loaded.config.text.max_length, 384)


def test_half_storage(tiny_model, tmp_path, inputs):
    d = save_pretrained(tiny_model, tmp_path / "half", half=True)
    full = save_pretrained(tiny_model, tmp_path / "full")
    with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["head.weight"] == "F16"
    assert all(dt in ("F16", "I64") for dt in dtypes.values()), set(dtypes.values())
    assert any(dt == "I64" for dt in dtypes.values())  # BatchNorm num_batches_tracked stays integer
    assert (d / WEIGHTS_NAME).stat().st_size < 0.6 * (full / WEIGHTS_NAME).stat().st_size
    loaded = load_pretrained(d)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    ref, got = _logits(tiny_model, inputs), _logits(loaded.model, inputs)
    assert not torch.equal(ref, got)  # fp16 rounding happened ...
    torch.testing.assert_close(got, ref, atol=5e-2, rtol=1e-2)  # ... and stays small


def test_overwrite_existing_directory(tiny_model, saved, inputs):
    with torch.no_grad():
        tiny_model.head.bias.add_(1.0)
    save_pretrained(tiny_model, saved, metadata={"name": "v2"})
    loaded = load_pretrained(saved)
    assert loaded.name == "v2"
    assert not (saved / "README.md").exists()  # no stale files from the old directory
    assert torch.equal(_logits(loaded.model, inputs), _logits(tiny_model, inputs))


def _rewrite_config(directory: Path, **changes) -> None:
    path = directory / CONFIG_NAME
    payload = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if key == "config_model_type":
            payload["config"]["model_type"] = value
        else:
            payload[key] = value
    path.write_text(encoding="utf-8", data=json.dumps(payload))


def test_unknown_model_type(saved):
    _rewrite_config(saved, config_model_type="no_such_model")
    with pytest.raises((CheckpointError, KeyError)) as exc:
        load_pretrained(saved)
    assert "no_such_model" in str(exc.value) and "tmc" in str(exc.value)
    assert "registered" in str(exc.value)


def _rewrite_weights(directory: Path, edit) -> None:
    state = load_file(str(directory / WEIGHTS_NAME))
    edit(state)
    save_file(state, str(directory / WEIGHTS_NAME))


def test_missing_tensor(saved):
    _rewrite_weights(saved, lambda s: s.pop("head.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing tensors \(e\.g\. head\.weight\)"):
        load_pretrained(saved)


def test_extra_tensor(saved):
    _rewrite_weights(saved, lambda s: s.__setitem__("extra.thing", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"1 unexpected tensors \(e\.g\. extra\.thing\)"):
        load_pretrained(saved)


def test_misshaped_tensor(saved):
    _rewrite_weights(saved, lambda s: s.__setitem__("head.weight", torch.zeros(1, 5, 1, 1)))
    with pytest.raises(CheckpointError) as exc:
        load_pretrained(saved)
    msg = str(exc.value)
    assert "1 mis-shaped tensors" in msg and "head.weight: file (1, 5, 1, 1) vs model (1, 4, 1, 1)" in msg
    assert "missing" not in msg and "unexpected" not in msg


def test_all_three_problems_reported_together(saved):
    def edit(s):
        s.pop("head.bias")
        s["bogus"] = torch.zeros(1)
        s["head.weight"] = torch.zeros(2, 2)
    _rewrite_weights(saved, edit)
    with pytest.raises(CheckpointError) as exc:
        load_pretrained(saved)
    msg = str(exc.value)
    assert "head.bias" in msg and "bogus" in msg and "head.weight" in msg


def test_pickle_weights_refused(saved):
    (saved / WEIGHTS_NAME).unlink()
    (saved / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError, match="pickle") as exc:
        load_pretrained(saved)
    assert "pytorch_model.bin" in str(exc.value)


def test_directory_with_only_pickle_weights_refused(tmp_path):
    d = tmp_path / "hf_style"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(CheckpointError, match="pickle") as exc:
        load_pretrained(d)
    assert "pytorch_model.bin" in str(exc.value)


def test_no_weights_at_all(saved):
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match=f"has no {WEIGHTS_NAME}"):
        load_pretrained(saved)


def test_not_a_directory_and_bad_json(tmp_path, saved):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    (saved / CONFIG_NAME).write_text(encoding="utf-8", data="{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_config(saved)


def test_sha256(saved):
    good = sha256_of(saved / WEIGHTS_NAME)
    assert len(good) == 64
    load_pretrained(saved, expected_sha256=good)
    load_pretrained(saved, expected_sha256=good.upper())  # manifests may use upper-case hex
    bad = ("0" if good[0] != "0" else "1") + good[1:]
    with pytest.raises(CheckpointError, match="SHA-256") as exc:
        load_pretrained(saved, expected_sha256=bad)
    assert good in str(exc.value) and bad in str(exc.value)


@pytest.mark.parametrize("version", [99, FORMAT_VERSION + 1, "1", None])
def test_format_version(saved, version):
    _rewrite_config(saved, format_version=version)
    with pytest.raises(CheckpointError, match="upgrade"):
        load_pretrained(saved)


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_save_is_atomic_on_failure(tiny_model, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")  # something was written before the failure
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    target = tmp_path / "atomic"
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(tiny_model, target)
    assert not target.exists()
    assert _leftovers(tmp_path, "atomic") == []
    assert [p.name for p in tmp_path.iterdir()] == []


def test_failed_save_keeps_previous_directory(tiny_model, saved, monkeypatch, inputs):
    before = (saved / WEIGHTS_NAME).read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("interrupted")))
    with pytest.raises(RuntimeError, match="interrupted"):
        save_pretrained(tiny_model, saved)
    monkeypatch.undo()
    assert (saved / WEIGHTS_NAME).read_bytes() == before
    assert _leftovers(saved.parent, saved.name) == []
    load_pretrained(saved)


# ----------------------------------------------------------------------------- text encoders saved with the model
@pytest.mark.parametrize("kind", ["lora", "fine-tuned"])
def test_trained_text_encoder_round_trip(kind, tmp_path):
    """A LoRA encoder is stored as its adapter only (the base is named in the config); a fine-tuned
    one as a full copy. Either way the loaded model encodes text exactly as the trained one did."""
    from conftest import make_tiny_svp_config
    from TextGuidedSegLib.models import build_model
    from TextGuidedSegLib.text import TextEncoder, TextEncoderConfig

    text_cfg = (TextEncoderConfig(max_length=16, lora_layers=[4, 5], lora_targets=["query", "key", "value", "dense"])
                if kind == "lora" else TextEncoderConfig(max_length=16, trainable=True))
    encoder = TextEncoder(text_cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # as if trained: LoRA's B matrices start at zero, move them
        for name, p in encoder.named_parameters():
            if p.requires_grad and (kind == "fine-tuned" and "layer.5.output.dense.weight" in name or "lora_B" in name):
                p.add_(torch.randn_like(p) * 0.05)
    encoder.eval()
    prompts = ["lower left lung", "bilateral pulmonary infection"]
    with torch.no_grad():
        expected = encoder.encode(prompts)
    model = build_model(make_tiny_svp_config(text=text_cfg))
    directory = save_pretrained(model, tmp_path / "m", text_encoder=encoder)
    size = sum(p.stat().st_size for p in (directory / "text_encoder").rglob("*") if p.is_file())
    if kind == "lora":
        assert size < 1_000_000 and (directory / "text_encoder" / "adapter_config.json").is_file()
        assert not (directory / "text_encoder" / "README.md").exists()  # no empty peft card
    else:
        assert size > 10_000_000  # the whole encoder
    loaded = load_pretrained(directory)
    assert loaded.config.text.uses_cache  # frozen again for inference
    got = loaded.text_encoder.encode(prompts)
    torch.testing.assert_close(got.pooled, expected.pooled, atol=1e-5, rtol=1e-5)
    for a, b in zip(got.hidden_states, expected.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
