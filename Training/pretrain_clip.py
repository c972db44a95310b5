#!/usr/bin/env python
"""Pre-train a small CLIP on the QaTa-COV19 + Kvasir-SEG *training* pairs (TGC-Net's frozen tower).

TGC-Net keeps an aligned vision-language encoder frozen. Users with hub access load OpenAI's CLIP;
no CLIP weights are reachable here, so the CPU configuration first trains a small one on the
training image-report pairs and saves it as a standard ``transformers`` CLIP directory, which
TGC-Net then loads exactly as it would load ``openai/clip-vit-large-patch14-336``::

    python Training/pretrain_clip.py --config Training/configs/clip/clip_small_cpu.yaml

- Towers from ``transformers`` ``CLIPVisionConfig`` / ``CLIPTextConfig`` (sizes in the config), the
  text tower on the offline MiniLM WordPiece tokenizer (its [SEP] is CLIP's end token).
- Loss: symmetric InfoNCE with CLIP's learnable logit scale; cases whose reports are identical
  are positives of each other (QaTa repeats 162 distinct reports over 7,142 images).
- Images: grey, normalised like the segmentation models, repeated to 3 channels and standardised
  with CLIP's mean / std (what TGC-Net does before its frozen tower).
- Output directory: ``config.json`` + ``model.safetensors`` (CLIPModel), the tokenizer, ``README.md``
  (data, zero-shot image->text recall@1/5 on validation, command, time) and ``similarity.png`` (the
  text-patch similarity map of a few validation cases). Resumes from ``<output_dir>/last``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from TextGuidedSegLib.data import read_dataset  # noqa: E402
from TextGuidedSegLib.data.dataset import PreloadedDataset  # noqa: E402
from TextGuidedSegLib.models.blocks import info_nce  # noqa: E402
from TextGuidedSegLib.models.config import IntensityConfig  # noqa: E402
from TextGuidedSegLib.models.tgcnet import CLIP_MEAN, CLIP_STD  # noqa: E402  (what TGC-Net feeds its tower)
from TextGuidedSegLib.text.encoder import resolve_text_model_path  # noqa: E402

logger = logging.getLogger("pretrain_clip")
DEFAULTS = {"epochs": 20, "batch_size": 64, "lr": 5e-4, "weight_decay": 0.1, "warmup_epochs": 1, "seed": 0,
            "max_time_minutes": None, "max_train_cases": None, "max_val_cases": None}


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """[B, 1 or 3, H, W] in [0, 1] -> CLIP's standardised 3-channel input."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    mean = torch.tensor(CLIP_MEAN, device=images.device, dtype=images.dtype)[None, :, None, None]
    std = torch.tensor(CLIP_STD, device=images.device, dtype=images.dtype)[None, :, None, None]
    return (images - mean) / std


def projected(output: Any) -> torch.Tensor:
    """CLIP's projected embedding: transformers < 5 returns the tensor, >= 5 an output whose
    ``pooler_output`` holds it."""
    return output if torch.is_tensor(output) else output.pooler_output


def build_clip(cfg: dict[str, Any], tokenizer: Any) -> Any:
    from transformers import CLIPConfig, CLIPModel

    text = {"vocab_size": tokenizer.vocab_size, "max_position_embeddings": cfg["max_length"],
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id, **cfg["text"]}
    vision = {"image_size": cfg["image_size"], "num_channels": 3, **cfg["vision"]}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg["projection_dim"])
    return CLIPModel(config)


def load_pairs(cfg: dict[str, Any], split: str, limit: int | None) -> tuple[list, list[str]]:
    """Every source's cases of ``split`` and, for each case, the dataset kind it came from."""
    cases, groups = [], []
    for source in cfg["data"]:
        found = read_dataset(source["kind"], source["root"], split, **(source.get("options") or {}))
        found = found[:limit] if limit else found
        cases += found
        groups += [source["kind"]] * len(found)
    return cases, groups


@torch.no_grad()
def embed(model: Any, tokenizer: Any, images: torch.Tensor, texts: list[str], max_length: int,
          batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text embeddings."""
    model.eval()
    v = torch.cat([projected(model.get_image_features(pixel_values=clip_pixels(images[i:i + batch].float())))
                   for i in range(0, len(images), batch)])
    tok = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    t = torch.cat([projected(model.get_text_features(input_ids=tok["input_ids"][i:i + batch],
                                                     attention_mask=tok["attention_mask"][i:i + batch]))
                   for i in range(0, len(texts), batch)])
    return torch.nn.functional.normalize(v, dim=-1), torch.nn.functional.normalize(t, dim=-1)


def retrieval(model: Any, tokenizer: Any, dataset: PreloadedDataset, max_length: int, groups: list[str]
              ) -> dict[str, dict[str, float]]:
    """Image->text recall@1/5 per dataset: each image ranks that dataset's distinct validation reports."""
    out = {}
    for group in dict.fromkeys(groups):
        idx = [i for i, g in enumerate(groups) if g == group]
        texts = [dataset.cases[i].text for i in idx]
        candidates = list(dict.fromkeys(texts))
        v, t = embed(model, tokenizer, dataset.images[idx], candidates, max_length)
        ranks = (v @ t.t()).argsort(dim=1, descending=True)
        truth = torch.tensor([candidates.index(x) for x in texts])
        position = (ranks == truth[:, None]).float().argmax(dim=1)
        out[group] = {"recall@1": float((position < 1).float().mean()), "recall@5": float((position < 5).float().mean()),
                      "images": len(idx), "candidates": len(candidates)}
    return out


@torch.no_grad()
def similarity_png(model: Any, tokenizer: Any, dataset: PreloadedDataset, picks: list[int], max_length: int,
                   path: Path) -> None:
    """Each picked case: the image, then the cosine similarity of its report to every image patch
    (red = high), the ground-truth outline in green. The paper's Fig. 1 argument on our data."""
    from PIL import Image

    model.eval()
    tiles = []
    for i in picks:
        image = dataset.images[i:i + 1].float()
        out = model.vision_model(pixel_values=clip_pixels(image))
        patches = model.visual_projection(model.vision_model.post_layernorm(out.last_hidden_state[:, 1:]))
        tok = tokenizer([dataset.cases[i].text], padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
        text = projected(model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
        sim = torch.nn.functional.cosine_similarity(patches, text[:, None], dim=-1)[0]
        side = int(math.isqrt(sim.numel()))
        sim = sim.reshape(1, 1, side, side)
        size = image.shape[-1]
        sim = torch.nn.functional.interpolate(sim, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        sim = (sim - sim.min()) / (sim.max() - sim.min()).clamp_min(1e-6)
        grey = (image[0, 0].numpy() * 255).astype(np.uint8)
        mask = dataset.masks[i, 0].numpy() > 0
        edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
        heat = np.stack([grey] * 3, -1).astype(np.float32)
        heat[..., 0] = 0.5 * heat[..., 0] + 127 * sim.numpy()
        heat[..., 1:] *= 0.5 + 0.5 * (1 - sim.numpy())[..., None]
        heat[edge] = (0, 255, 0)
        tiles.append(np.concatenate([np.stack([grey] * 3, -1), heat.clip(0, 255).astype(np.uint8)], axis=1))
    Image.fromarray(np.concatenate(tiles, axis=0)).save(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    for item in args.set:
        key, value = item.split("=", 1)
        node = cfg
        for part in key.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[key.split(".")[-1]] = yaml.safe_load(value)
    t = {**DEFAULTS, **cfg.get("train", {})}
    unknown = set(t) - set(DEFAULTS)
    if unknown:
        raise SystemExit(f"unknown train settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(t["seed"])

    tokenizer = AutoTokenizer.from_pretrained(resolve_text_model_path(cfg.get("tokenizer", "packaged:all-MiniLM-L6-v2")))
    model = build_clip(cfg, tokenizer)
    intensity = IntensityConfig(**cfg.get("intensity", {}))
    train_cases, _ = load_pairs(cfg, "train", t["max_train_cases"])
    val_cases, groups = load_pairs(cfg, "val", t["max_val_cases"])
    train_ds = PreloadedDataset(train_cases, cfg["image_size"], intensity)
    val_ds = PreloadedDataset(val_cases, cfg["image_size"], intensity)
    train_tok = tokenizer([c.text for c in train_cases], padding="max_length", truncation=True,
                          max_length=cfg["max_length"], return_tensors="pt")

    optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    steps_per_epoch = max(1, len(train_ds) // t["batch_size"])
    total, warm = t["epochs"] * steps_per_epoch, t["warmup_epochs"] * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warm if s < warm else
                                                  0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm)))))
    state = {"epoch": 0, "wall_s": 0.0, "history": []}
    last = out / "last"
    if (last / "model.safetensors").is_file():
        model.load_state_dict(load_file(str(last / "model.safetensors")))
        extra = json.loads((last / "state.json").read_text(encoding="utf-8"))
        optimizer.load_state_dict(torch.load(last / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(extra["scheduler"])
        state = extra["state"]
        logger.info("resumed at epoch %d", state["epoch"])
    started = time.time() - state["wall_s"]
    while state["epoch"] < t["epochs"]:
        epoch = state["epoch"]
        model.train()
        order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(t["seed"] * 100003 + epoch))
        losses = []
        for step in range(steps_per_epoch):
            idx = order[step * t["batch_size"]:(step + 1) * t["batch_size"]]
            v = projected(model.get_image_features(pixel_values=clip_pixels(train_ds.images[idx].float())))
            txt = projected(model.get_text_features(input_ids=train_tok["input_ids"][idx],
                                                    attention_mask=train_tok["attention_mask"][idx]))
            loss = info_nce(v, txt, 1.0 / model.logit_scale.exp().clamp(max=100.0))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        state["epoch"] = epoch + 1
        state["wall_s"] = time.time() - started
        recall = retrieval(model, tokenizer, val_ds, cfg["max_length"], groups)
        state["history"].append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val": recall})
        logger.info("epoch %d: loss %.4f, val %s", epoch + 1, np.mean(losses), recall)
        last.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(last / "model.safetensors"))
        torch.save(optimizer.state_dict(), last / "optimizer.pt")
        (last / "state.json").write_text(json.dumps({"scheduler": scheduler.state_dict(), "state": state}),
                                         encoding="utf-8")
        if t["max_time_minutes"] and state["wall_s"] > 60 * t["max_time_minutes"]:
            logger.info("time budget reached")
            break

    export = Path(cfg.get("export_dir", out / "model"))
    export.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(export)
    tokenizer.save_pretrained(export)
    recall = state["history"][-1]["val"]
    picks = [i for i, g in enumerate(groups) if g == groups[0]][:3] + \
        [i for i, g in enumerate(groups) if g != groups[0]][:1]
    similarity_png(model, tokenizer, val_ds, picks, cfg["max_length"], export / "similarity.png")
    n_params = sum(p.numel() for p in model.parameters())
    rows = "\n".join(f"| {g} val | {r['images']} images, {r['candidates']} distinct reports | "
                     f"{r['recall@1']:.4f} | {r['recall@5']:.4f} |" for g, r in recall.items())
    (export / "README.md").write_text(encoding="utf-8", data=f"""# {cfg.get('name', 'clip')}

A small CLIP (``transformers`` CLIPModel, {n_params / 1e6:.2f} M parameters: ViT {cfg['vision']} at
{cfg['image_size']} px; text {cfg['text']} on the MiniLM WordPiece vocabulary, {cfg['max_length']} tokens)
pre-trained here on the *training* image-report pairs of {', '.join(s['kind'] for s in cfg['data'])}
({len(train_cases)} pairs), symmetric multi-positive InfoNCE, {state['epoch']} epochs,
{state['wall_s'] / 60:.1f} min. TGC-Net loads it frozen as it would load OpenAI's CLIP. Research use only.

Zero-shot retrieval on validation (each image ranks its dataset's distinct validation reports):

| split | candidates | image->text recall@1 | recall@5 |
|---|---|---|---|
{rows}

`similarity.png`: for {len(picks)} validation cases, the image and the cosine similarity of its report to
every image patch (red = high; ground truth outlined in green).

![text-patch similarity](similarity.png)

Command:

```
{command}
```
""")
    logger.info("CLIP written to %s", export)
    return {"model_dir": str(export), "recall": recall, "epochs": state["epoch"]}


if __name__ == "__main__":
    main()
