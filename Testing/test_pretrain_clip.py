"""Training/pretrain_clip.py: a small CLIP trained on a few real pairs is a standard transformers
CLIP directory that TGC-Net's text encoder and image tower load, with a card and a similarity map."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_pretrain_clip_writes_a_loadable_clip(shared_data, tmp_path):
    spec = importlib.util.spec_from_file_location("textguidedseg_pretrain_clip", REPO / "Training" / "pretrain_clip.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    cfg = yaml.safe_load((REPO / "Training" / "configs" / "clip" / "clip_small_cpu.yaml").read_text(encoding="utf-8"))
    cfg.update(output_dir=str(tmp_path / "run"), export_dir=str(tmp_path / "clip"), image_size=32, max_length=16,
               projection_dim=8)
    cfg["vision"] = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                     "patch_size": 8}
    cfg["text"] = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    for source in cfg["data"]:
        source["root"] = str(shared_data / source["kind"])
    cfg["train"].update(epochs=2, batch_size=8, max_train_cases=16, max_val_cases=6)
    path = tmp_path / "clip.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    result = module.main(["--config", str(path)])

    assert result["epochs"] == 2 and set(result["recall"]) == {"qata", "kvasir"}
    for r in result["recall"].values():
        assert 0.0 <= r["recall@1"] <= r["recall@5"] <= 1.0 and r["images"] == 6
    clip_dir = Path(result["model_dir"])
    card = (clip_dir / "README.md").read_text(encoding="utf-8")
    assert "recall@1" in card and "similarity.png" in card and (clip_dir / "similarity.png").stat().st_size > 1000
    from TextGuidedSegLib.text import TextEncoder, TextEncoderConfig
    from TextGuidedSegLib.models.tgcnet import TGCNetConfig

    encoder = TextEncoder(TextEncoderConfig(name_or_path=str(clip_dir), backend="clip", pooling="eos", max_length=16))
    assert encoder.encode(["lower left lung"]).tokens.shape == (1, 16, 16)
    tgc = TGCNetConfig(image_size=64, clip_name_or_path=str(clip_dir), cnn_channels=(4, 4, 8, 8, 8), dim=8,
                       heads=2, deform_heads=2, text=encoder.config)
    assert tgc.clip_vision["image_size"] == 32 and tgc.clip_vision["patch_size"] == 8
    # resume: a third epoch continues from last/
    cfg["train"]["epochs"] = 3
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert module.main(["--config", str(path)])["epochs"] == 3
    assert torch.load(tmp_path / "run" / "last" / "optimizer.pt", weights_only=True)["state"]
