#!/usr/bin/env python
"""Training-step cost of the paper configurations (``Training/configs/*_qata.yaml``) on a GPU.

For each config: the model and its text encoder with the configured architecture and trainable
parts (full fine-tuning, LoRA, frozen), **random weights** (hub weights are out of reach on the
machines this was measured on; the cost does not depend on them), the configured batch size and
input size, the training script's autocast, loss and loss scaling. Prints per config: trained and
frozen parameters, seconds per step, images per second, peak GPU memory, and the time one epoch of
QaTa train (5,713 images) would take. Asserts nothing::

    python benchmarks/benchmark_paper_configs.py [--device cuda] [--steps 10] [--configs tmc_qata ...]

The random text encoders are built from ``transformers`` configs (BERT-base for bert-base-uncased
and CXR-BERT, CLIP ViT-L/14's text tower for TGC-Net) and tokenise with the WordPiece vocabulary
the shipped TGC-Net carries, so no download is needed.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from TextGuidedSegLib.models import build_model, config_from_dict, encode_prompts  # noqa: E402
from TextGuidedSegLib.text import TextEncoder  # noqa: E402

CONFIGS = ["tmc_qata", "ssa_qata", "svp_cvae_qata", "prolearn_qata", "tgcnet_qata"]
TOKENIZER = REPO / "TextGuidedSegLib" / "pretrained" / "tgcnet-qata-cpu" / "text_encoder"
QATA_TRAIN = 5713
PROMPTS = [p.read_text(encoding="utf-8").strip() for p in sorted((REPO / "TextGuidedSegLib" / "samples" / "qata").glob("*.txt"))]


def load_train_module() -> Any:
    spec = importlib.util.spec_from_file_location("train", REPO / "Training" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_text_model(backend: str, directory: Path) -> str:
    """A random-weight text model of the paper's size, saved with the shipped WordPiece tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel, CLIPTextConfig, CLIPTextModel

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    if backend == "clip":  # CLIP ViT-L/14's text tower
        model = CLIPTextModel(CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=768, intermediate_size=3072,
                                             num_hidden_layers=12, num_attention_heads=12,
                                             max_position_embeddings=77, projection_dim=768,
                                             bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                                             pad_token_id=tokenizer.pad_token_id))
    else:  # BERT-base (bert-base-uncased, CXR-BERT)
        model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def measure(name: str, train: Any, device: torch.device, steps: int, workdir: Path,
            batch_size: int | None = None) -> dict[str, Any]:
    from monai.losses import DiceLoss

    cfg = train.load_config(REPO / "Training" / "configs" / f"{name}.yaml", [])
    model_cfg = dict(cfg["model"])
    if cfg.get("psa"):  # ProLearn: the bank's size after PSA (M per surrogate group; 4 groups assumed)
        model_cfg["num_prototypes"] = 4 * int(model_cfg.get("prototypes_per_cluster", 16))
    text = dict(model_cfg["text"])
    text["name_or_path"] = random_text_model(text.get("backend", "auto"), workdir / name)
    model_cfg["text"] = text
    mc = config_from_dict(model_cfg)
    encoder = TextEncoder(mc.text).to(device)
    model = build_model(mc).to(device)
    t = cfg["train"]
    bs, size = int(batch_size or t["batch_size"]), mc.image_size
    params = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": t["lr"]}]
    if not mc.text.uses_cache:
        params.append({"params": [p for p in encoder.parameters() if p.requires_grad], "lr": t.get("text_lr", t["lr"])})
    optimizer = torch.optim.AdamW(params, lr=t["lr"])
    scaler = torch.amp.GradScaler("cuda", enabled=train.uses_fp16(device, t["amp"]))
    dice_loss = DiceLoss(sigmoid=True)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(bs, mc.in_channels, size, size, device=device, generator=g)
    y = (torch.rand(bs, 1, size, size, device=device, generator=g) > 0.7).float()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(bs)]
    text_free = getattr(model, "trains_without_text", False)
    model.train()
    encoder.train()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(steps + 2):  # two warm-up steps
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with train.autocast(device, t["amp"]):
            feats = None if text_free else encode_prompts(model, encoder, prompts).to(device)
            extra = {"target": y} if getattr(model, "uses_target", False) else {}
            out = model(x, feats, **extra)
        loss, _ = train.training_loss(out, y, dice_loss, t["bce_weight"], t["dice_weight"])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= 2:
            times.append(time.perf_counter() - t0)
    sec = sorted(times)[len(times) // 2]
    trained = sum(p.numel() for group in params for p in group["params"])
    total = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in encoder.parameters())
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"name": name, "batch": bs, "size": size, "trained_m": trained / 1e6, "frozen_m": (total - trained) / 1e6,
            "sec": sec, "ips": bs / sec, "peak": peak, "epoch_min": QATA_TRAIN / (bs / sec) / 60,
            "loss": float(loss.detach())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--batch-size", type=int, default=None, help="override the configs' batch (a CPU dry run)")
    args = parser.parse_args()
    device = torch.device(args.device)
    train = load_train_module()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device {name}, torch {torch.__version__}; random weights, median of {args.steps} steps after 2 warm-up")
    print(f"{'config':16s}{'batch':>6s}{'px':>5s}{'trained M':>10s}{'frozen M':>9s}{'s/step':>8s}{'img/s':>8s}"
          f"{'peak GiB':>9s}{'QaTa epoch min':>15s}{'loss':>8s}")
    with tempfile.TemporaryDirectory() as tmp:
        for cfg_name in args.configs:
            r = measure(cfg_name, train, device, args.steps, Path(tmp), args.batch_size)
            print(f"{r['name']:16s}{r['batch']:6d}{r['size']:5d}{r['trained_m']:10.1f}{r['frozen_m']:9.1f}"
                  f"{r['sec']:8.3f}{r['ips']:8.1f}{r['peak']:9.1f}{r['epoch_min']:15.1f}{r['loss']:8.3f}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
