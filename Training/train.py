#!/usr/bin/env python
"""Train any registered model on a dataset: ``python Training/train.py --config Training/configs/X.yaml``.

Loss = w_bce * BCE-with-logits + w_dice * Dice-on-logits (MONAI) + the model's auxiliary losses
(already weighted by the model's config). Frozen text encoders are run once over every distinct
prompt of the dataset and cached on disk, so CPU training never re-runs the text model.

Resume is exact: every epoch starts from seeds derived from (seed, epoch) for the data order, the
augmentations and dropout, and ``<output_dir>/last/`` holds the model, optimizer, scheduler and
early-stopping state written at the end of each epoch. Re-running the same command continues.

Multi-GPU / multi-node: ``torchrun --nproc_per_node N Training/train.py --config ...`` (DDP; NCCL on
GPUs, gloo on CPUs). Rank 0 validates and writes checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import logging
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from monai.losses import DiceLoss
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from TextGuidedSegLib import __version__  # noqa: E402
from TextGuidedSegLib.checkpoint import save_pretrained  # noqa: E402
from TextGuidedSegLib.data import VOLUME_KINDS, VolumeSliceDataset, read_dataset, read_msd_dataset  # noqa: E402
from TextGuidedSegLib.data.dataset import PreloadedDataset, collate  # noqa: E402
from TextGuidedSegLib.data.transforms import AugmentConfig, build_train_transforms, seed_transforms  # noqa: E402
from TextGuidedSegLib.metrics import SegmentationScores  # noqa: E402
from TextGuidedSegLib.models import build_model, config_from_dict, encode_prompts  # noqa: E402
from TextGuidedSegLib.preprocessing import resize_probabilities  # noqa: E402
from TextGuidedSegLib.text import TextEncoder, TextFeatures, swap_left_right  # noqa: E402

logger = logging.getLogger("train")

TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 100, "batch_size": 8, "grad_accum": 1, "optimizer": "adamw", "lr": 3e-4, "text_lr": 1e-5,
    "weight_decay": 1e-4, "schedule": "cosine", "min_lr": 1e-6, "warmup_epochs": 0, "plateau_patience": 10,
    "early_stop_patience": 20, "monitor": "dice_global", "seed": 0, "amp": True, "num_workers": 0,
    "val_every": 1, "bce_weight": 1.0, "dice_weight": 1.0, "max_train_cases": None, "max_val_cases": None,
    "max_time_minutes": None, "grad_clip": 1.0, "tensorboard": False, "final_engine_eval": True,
}


PSA_SETTINGS = {"relevance_threshold", "min_cluster_size", "min_samples", "prototypes_per_cluster", "relevance_train"}


# ----------------------------------------------------------------------------- configuration
def load_config(path: str | Path, overrides: list[str]) -> dict[str, Any]:
    """YAML config + ``key.sub=value`` overrides (values parsed as YAML: numbers, lists, null)."""
    cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    cfg["train"] = {**TRAIN_DEFAULTS, **cfg.get("train", {})}
    unknown = set(cfg["train"]) - set(TRAIN_DEFAULTS)
    if unknown:
        raise SystemExit(f"unknown train settings {sorted(unknown)}; known: {sorted(TRAIN_DEFAULTS)}")
    for section in ("model", "data", "output_dir"):
        if section not in cfg:
            raise SystemExit(f"config {path} has no '{section}' section")
    if cfg.get("psa") is not None:  # ProLearn's one-time prototype-bank initialisation
        unknown = set(cfg["psa"]) - PSA_SETTINGS
        if unknown:
            raise SystemExit(f"unknown psa settings {sorted(unknown)}; known: {sorted(PSA_SETTINGS)}")
        unknown = set(cfg["psa"].get("relevance_train") or {}) - set(TRAIN_DEFAULTS)
        if unknown:
            raise SystemExit(f"unknown psa.relevance_train settings {sorted(unknown)}; known: {sorted(TRAIN_DEFAULTS)}")
    fraction = cfg["data"].get("text_fraction", 1.0)
    if not 0 < float(fraction) <= 1:
        raise SystemExit(f"data.text_fraction must be in (0, 1], got {fraction}")
    return cfg


# ----------------------------------------------------------------------------- distributed
def setup_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


# ----------------------------------------------------------------------------- text cache
def build_text_table(encoder: TextEncoder, texts: list[str], cache_file: Path) -> tuple[TextFeatures, dict[str, int]]:
    """Encode every distinct prompt once (frozen encoder) and keep the table on disk."""
    texts = sorted(set(texts))
    if cache_file.is_file():
        meta = json.loads(cache_file.with_suffix(".json").read_text(encoding="utf-8"))
        if meta["texts"] == texts and meta["encoder"] == encoder.config.to_dict():
            t = load_file(str(cache_file))
            hidden = tuple(t[f"hidden_{i}"] for i in range(meta["num_hidden"]))
            return TextFeatures(t["tokens"], t["mask"], t["pooled"], hidden), {s: i for i, s in enumerate(texts)}
    chunks = [encoder.encode(texts[i:i + 256]) for i in range(0, len(texts), 256)]
    table = TextFeatures.cat(chunks)
    tensors = {"tokens": table.tokens, "mask": table.mask, "pooled": table.pooled}
    tensors.update({f"hidden_{i}": h for i, h in enumerate(table.hidden_states)})
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(cache_file))
    cache_file.with_suffix(".json").write_text(encoding="utf-8", data=json.dumps(
        {"texts": texts, "encoder": encoder.config.to_dict(), "num_hidden": len(table.hidden_states)}))
    return table, {s: i for i, s in enumerate(texts)}


# ----------------------------------------------------------------------------- state (no pickle)
def flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Nested state (dicts/lists with tensor leaves) -> JSON-able skeleton + safetensors dict."""
    if torch.is_tensor(obj):
        key = prefix or "t"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten_state(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: unflatten_state(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


def save_train_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: Any, trainer: dict[str, Any], text_encoder: TextEncoder | None) -> None:
    """Write ``last/`` atomically: model + optimizer tensors as safetensors, the rest as JSON."""
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    skeleton = {"optimizer": flatten_state(optimizer.state_dict(), "opt", tensors),
                "scheduler": flatten_state(scheduler.state_dict(), "sched", tensors), "trainer": trainer}
    if text_encoder is not None and not text_encoder.config.uses_cache:
        skeleton["text_encoder"] = flatten_state(text_encoder.state_dict(), "text", tensors)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(encoding="utf-8", data=json.dumps(skeleton))
    if directory.exists():
        for f in directory.iterdir():
            f.unlink()
        directory.rmdir()
    os.replace(tmp, directory)


def load_train_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: Any, text_encoder: TextEncoder | None) -> dict[str, Any]:
    model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
    tensors = load_file(str(directory / "state.safetensors"))
    skeleton = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    opt_state = unflatten_state(skeleton["optimizer"], tensors)
    opt_state["state"] = {int(k): v for k, v in opt_state["state"].items()}
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(unflatten_state(skeleton["scheduler"], tensors))
    if "text_encoder" in skeleton and text_encoder is not None:
        text_encoder.load_state_dict(unflatten_state(skeleton["text_encoder"], tensors))
    return skeleton["trainer"]


# ----------------------------------------------------------------------------- schedule
def make_scheduler(optimizer: torch.optim.Optimizer, t: dict[str, Any], steps_per_epoch: int) -> Any:
    if t["schedule"] == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1,
                                                          patience=t["plateau_patience"], min_lr=t["min_lr"])
    if t["schedule"] != "cosine":
        raise SystemExit(f"train.schedule must be cosine or plateau, got {t['schedule']!r}")
    total = max(1, t["epochs"] * steps_per_epoch)
    warm = t["warmup_epochs"] * steps_per_epoch
    floors = [t["min_lr"] / g["lr"] for g in optimizer.param_groups]

    def factor(step: int, floor: float) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s, f=f: factor(s, f) for f in floors])


# ----------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(model: torch.nn.Module, dataset: PreloadedDataset, text_for: Any, batch_size: int,
             device: torch.device, amp: bool) -> dict[str, float]:
    """Both Dice and IoU conventions at the masks' native size (probabilities resized linearly, threshold 0.5)."""
    model.eval()
    scores = SegmentationScores()
    for start in range(0, len(dataset), batch_size):
        idx = list(range(start, min(len(dataset), start + batch_size)))
        images = dataset.images[idx].float().to(device)
        texts = [dataset.cases[i].text for i in idx]
        with autocast(device, amp):
            logits = model(images, text_for(texts))["logits"]
        probs = torch.sigmoid(logits.float())
        for j, i in enumerate(idx):
            truth = dataset.native_masks[i]
            pred = resize_probabilities(probs[j:j + 1], truth.shape)[0, 0] >= 0.5
            scores.add(dataset.cases[i].case_id, pred.cpu().numpy(), truth)
    model.train()
    summary = scores.summary()
    return {k: summary[k] for k in ("dice_global", "dice_per_image", "iou_global", "iou_per_image")}


def uses_fp16(device: torch.device, amp: bool) -> bool:
    """Mixed precision in fp16 (needs loss scaling): CUDA without bf16; bf16 wherever CUDA has it."""
    return amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16 if uses_fp16(device, amp) else torch.bfloat16)
    return contextlib.nullcontext()


def training_loss(out: dict[str, Any], masks: torch.Tensor, dice_loss: DiceLoss, bce_weight: float,
                  dice_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """w_bce * BCE + w_dice * Dice on the logits (in fp32 under autocast) + the model's own losses."""
    logits = out["logits"].float()
    parts = {"bce": bce_weight * F.binary_cross_entropy_with_logits(logits, masks),
             "dice": dice_weight * dice_loss(logits, masks)}
    parts.update({k: v.float() for k, v in out.get("losses", {}).items()})
    return sum(parts.values()), parts


# ----------------------------------------------------------------------------- model card
def model_card(cfg: dict[str, Any], best: dict[str, Any], engine: dict[str, Any] | None, command: str,
               wall_s: float, hardware: str, parameters: str) -> str:
    """The model directory's README: data, split, both Dice figures, command, time, hardware."""
    m, d = cfg["model"], cfg["data"]
    val = d.get("val_split", "val")
    text_free = bool(m.get("num_prototypes"))  # ProLearn with a bank: scored with no prompt
    how = "`textguidedseg evaluate --no-prompt` (text-free)" if text_free else "`textguidedseg evaluate`"
    rows = ""
    if engine is not None:
        rows = (f"| {val} Dice, global (pooled over all pixels), {how} | **{engine['dice_global']:.4f}** |\n"
                f"| {val} Dice, per-image mean, {how} | **{engine['dice_per_image']:.4f}** |\n"
                f"| {val} IoU, global / per-image | {engine['iou_global']:.4f} / {engine['iou_per_image']:.4f} |\n"
                f"| {val} cases scored | {engine['cases']} |\n")
        rows += (f"| {val} HD95 / ASD (pixels, mean over {engine['distance_cases']} cases with both masks non-empty) | "
                 f"{engine['hd95_mean']:.2f} / {engine['asd_mean']:.2f} |\n")
        if "uncertainty_auroc" in engine:
            rows += (f"| {val} uncertainty (variance of {m.get('samples')} sampled probabilities): AUROC for misclassified pixels | "
                     f"{engine['uncertainty_auroc']:.4f} |\n"
                     f"| {val} Dice without each image's 10 % most uncertain pixels, global / per-image | "
                     f"{engine['dice_global_confident90']:.4f} / {engine['dice_per_image_confident90']:.4f} |\n")
        if "laterality_error_rate" in engine:
            rows += (f"| {val} laterality error rate ({engine['laterality_cases']} one-sided reports, > 10 % of the "
                     f"predicted mass on the other side) | {engine['laterality_error_rate']:.4f} |\n")
    if d["kind"] == "synthseg":
        scoring = ("Training rows: a fixed set of images generated (seeded) from the label maps kept for validation\n"
                   f"(`data.val_maps`: the last {d.get('val_maps', 3)} maps), one canonical prompt per image x target,\n"
                   "pooled (global Dice) or averaged per item. They measure the generator's world, not real scans:\n"
                   "the real-MR figures are below.")
        data_terms = " (SynthSeg label maps: Apache-2.0)"
    elif d["kind"] in VOLUME_KINDS:
        scoring = ("Training rows: every validation slice x prompt target, pooled (slice-wise global Dice) or averaged\n"
                   "per slice (a slice whose prediction and target are both empty counts as 1), from the in-memory\n"
                   "validation of the training loop. The 3D table below runs every volume through the inference\n"
                   "engine exactly as users do.")
        data_terms = ""
    else:
        scoring = ("Scoring (both tables): predictions resized linearly to the masks' native size and thresholded at\n"
                   "0.5, ground truth > 127. Global Dice pools all pixels of the split; per-image Dice averages each\n"
                   "image's Dice (an image whose prediction and ground truth are both empty counts as 1). The\n"
                   "`textguidedseg evaluate` rows run every case through the inference engine exactly as users do;\n"
                   "the training rows come from the in-memory validation of the training loop (inputs stored as fp16).\n"
                   "Re-check with:\n\n```\n"
                   f"textguidedseg evaluate --model <this directory> --dataset {d['kind']} --data-root {d['root']} "
                   f"--split {val} {'--no-prompt ' if text_free else ''}--save-predictions preds/\n```")
        data_terms = " (QaTa-COV19\nand Kvasir-SEG: research and education only)"
    return f"""# {cfg.get('name', m['model_type'])}

Model `{m['model_type']}` trained with TextGuidedSeg {__version__}. Research use only, not for clinical use.

| | |
|---|---|
| data | `{d['kind']}` at `{d['root']}`: trained on split `{d.get('train_split', 'train')}`, checkpoint selected on `{val}` |
{rows}| {val} Dice during training (global / per-image, best epoch) | {best['dice_global']:.4f} / {best['dice_per_image']:.4f} |
| selected epoch | {best['epoch']} (monitor: {cfg['train']['monitor']}) |
| input | {m.get('image_size')} px; 'left' in the training text means: `{m.get('laterality', 'image')}` side |
| text encoder | `{m.get('text', {}).get('name_or_path', 'packaged default')}` |
| parameters | {parameters} |
| training wall time | {wall_s / 60:.1f} min |
| hardware | {hardware} |

{scoring}

Training command:

```
{command}
```

Licence of the weights: Apache-2.0 (as the code); the training data keep their own terms{data_terms}:
see `shared/data/README.md`.
"""


# ----------------------------------------------------------------------------- export
def export_best(cfg: dict[str, Any], out: Path, state: dict[str, Any], model_cfg: Any, text_encoder: TextEncoder,
                val_cases: list, n_train: int, device: torch.device, world: int) -> Path:
    """Write the best epoch as a model directory, scored once more through the inference engine."""
    from TextGuidedSegLib.checkpoint import LoadedModel
    from TextGuidedSegLib.evaluation import evaluate_cases

    best_model = build_model(config_from_dict(model_cfg.to_dict())).to(device)
    best_model.load_state_dict(load_file(str(out / "best" / "model.safetensors")))
    best_model.eval()
    text_encoder.eval()
    engine = None
    volume_scores = None
    data = cfg["data"]
    if cfg["train"]["final_engine_eval"]:
        loaded = LoadedModel(model=best_model, config=model_cfg, metadata={"name": cfg.get("name", "")},
                             _text_encoder=text_encoder)
        if data["kind"] in VOLUME_KINDS:
            # 3D, as `textguidedseg evaluate --dataset msd` scores it: one prompt per label
            from TextGuidedSegLib.evaluation import evaluate_volumes, format_volume_summary

            val_set = read_msd_dataset(data["root"], data.get("val_split", "val"), **(data.get("options") or {}))
            val_set.cases = [c for c in val_set.cases if c.case_id in {v.case_id for v in val_cases}]
            axis = (data.get("planes") or ["axial"])[0]
            volume_scores = evaluate_volumes(loaded, val_set, device=str(device), axis=axis)
            for line in format_volume_summary(volume_scores):
                logger.info("engine evaluation:%s", line)
        else:
            # a text-free model is scored as users run it: no text (the reports still give laterality)
            use_text = not getattr(best_model, "trains_without_text", False)
            engine = evaluate_cases(loaded, val_cases, distances=True, device=str(device), use_text=use_text)
            logger.info("engine evaluation on %d validation cases: global Dice %.4f, per-image Dice %.4f",
                        engine["cases"], engine["dice_global"], engine["dice_per_image"])
    hardware = state.get("hardware") or "unknown"
    command = state.get("command") or f"python Training/train.py --config {cfg.get('config_path', '?')}"
    card = model_card(cfg, state["best"], engine, command, state["wall_s"], hardware,
                      parameter_summary(best_model, text_encoder))
    export = cfg.get("export", {}) or {}
    frozen_clip = frozen_clip_card(model_cfg)
    if frozen_clip is not None:
        card += frozen_clip[0]
    if (out / "psa" / "psa.json").is_file():
        card += psa_card_section(json.loads((out / "psa" / "psa.json").read_text(encoding="utf-8")), model_cfg)
    if volume_scores is not None:
        card += volume_card_section(cfg, volume_scores)
    if export.get("notes"):  # hand-written design notes / ablations, kept in git beside the configs
        card += "\n" + (REPO / export["notes"]).read_text(encoding="utf-8")
    export_dir = Path(export.get("dir", out / "model"))
    validation = {"dataset": data["kind"], "split": data.get("val_split", "val"), "epoch": state["best"]["epoch"],
                  "training_loop": {k: state["best"][k] for k in ("dice_global", "dice_per_image")}}
    if engine is not None:
        validation.update({k: engine[k] for k in ("dice_global", "dice_per_image", "iou_global", "iou_per_image",
                                                  "cases", "hd95_mean", "asd_mean", "distance_cases",
                                                  "laterality_error_rate", "laterality_cases", "uncertainty_auroc",
                                                  "dice_global_confident90", "dice_per_image_confident90")
                           if k in engine})
    if volume_scores is not None:
        validation.update({"volumes": volume_scores["cases"], "axis": (data.get("planes") or ["axial"])[0],
                           "labels": volume_scores["labels"], "unions": volume_scores["unions"],
                           "scores": volume_scores["scores"]})
    meta = {"name": cfg.get("name", model_cfg.model_type), "validation": validation,
            "training": {"command": command, "wall_minutes": round(state["wall_s"] / 60, 1), "hardware": hardware,
                         "date": dt.date.today().isoformat(), "train_cases": n_train, "val_cases": len(val_cases)}}
    save_pretrained(best_model, export_dir, metadata=meta, card=card, half=bool(export.get("half", False)),
                    text_encoder=text_encoder)
    if frozen_clip is not None and frozen_clip[1] is not None:
        shutil.copyfile(frozen_clip[1], export_dir / CLIP_SIMILARITY_PNG)
    logger.info("best model (epoch %d) written to %s", state["best"]["epoch"], export_dir)
    return export_dir


CLIP_SIMILARITY_PNG = "clip_similarity.png"


def volume_card_section(cfg: dict[str, Any], summary: dict[str, Any]) -> str:
    """Model-card table for a volume dataset: 3D figures per label, mean +- sd over volumes."""
    d = cfg["data"]
    lines = ["", f"## 3D validation ({summary['cases']} volumes of `{d.get('val_split', 'val')}`, "
             f"`textguidedseg evaluate --dataset msd`)", "",
             "One prompt per label; a voxel takes the label whose probability is highest and >= 0.5. Dice per "
             "volume, HD95 and ASD in mm from the voxel spacing (MONAI), mean +- sd (ddof 1) over volumes; "
             "pooled = one Dice over all voxels of the split. Unions are scored from their own prompt.", "",
             "| target | prompt | Dice | pooled Dice | HD95 (mm) | ASD (mm) |", "|---|---|---:|---:|---:|---:|"]
    for group in ("labels", "unions"):
        for name, info in summary[group].items():
            s = summary["scores"][name]
            lines.append(f"| {name} ({'+'.join(str(v) for v in info['values'])}) | {info['prompt']} | "
                         f"{s['dice_mean']:.4f} +- {s['dice_sd']:.4f} | {s['dice_global']:.4f} | "
                         f"{s['hd95_mean']:.2f} +- {s['hd95_sd']:.2f} | {s['asd_mean']:.2f} +- {s['asd_sd']:.2f} |")
    lines += ["", "Re-check (writes one NIfTI label map per case):", "", "```",
              f"textguidedseg evaluate --model <this directory> --dataset msd --data-root {d['root']} "
              f"--split {d.get('val_split', 'val')} --save-predictions preds/", "```"]
    return "\n".join(lines) + "\n"


def parameter_summary(model: torch.nn.Module, text_encoder: TextEncoder) -> str:
    """Trained vs frozen parameters: the figure TGC-Net's design is about (a small trained part)."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    text_total = sum(p.numel() for p in text_encoder.parameters())
    text_trained = sum(p.numel() for p in text_encoder.parameters() if p.requires_grad)
    image = f"image model {trained / 1e6:.2f} M trained" + (f" + {frozen / 1e6:.2f} M frozen" if frozen else "")
    text = (f"text encoder {text_total / 1e6:.2f} M, " +
            (f"{text_trained / 1e6:.2f} M of it trained" if text_trained else "frozen"))
    return f"{image}; {text}"


def frozen_clip_card(model_cfg: Any) -> tuple[str, Path | None] | None:
    """TGC-Net on a CLIP pre-trained here: that CLIP's card (retrieval figures) and similarity PNG.

    The card section is appended to the model's README and the PNG copied beside it, so the frozen
    encoder's evidence (the paper's Fig. 1 argument, on our data) travels with the model.
    """
    clip_dir = Path(getattr(model_cfg, "clip_name_or_path", "") or "")
    readme = clip_dir / "README.md"
    if not getattr(model_cfg, "sse", False) or not readme.is_file():
        return None
    body = readme.read_text(encoding="utf-8").split("\n", 1)[1]  # drop its title
    png = clip_dir / "similarity.png"
    body = body.replace("(similarity.png)", f"({CLIP_SIMILARITY_PNG})").replace("`similarity.png`", f"`{CLIP_SIMILARITY_PNG}`")
    return f"\n## The frozen CLIP (`{clip_dir}`)\n{body}", (png if png.is_file() else None)


# ----------------------------------------------------------------------------- ProLearn's PSA
def prepare_prototypes(cfg: dict[str, Any], out: Path, train_cases: list, device: torch.device) -> Any:
    """One-time PSA initialisation (``psa`` section of the config), cached in ``<output_dir>/psa``.

    Chooses the paired subset (``data.text_fraction``, seeded, written to ``text_split.json``),
    trains the token-relevance model on it (same architecture, no bank; ``<output_dir>/relevance``),
    then builds the bank from it (see ``Training/psa.py``).
    """
    import copy

    if str(REPO / "Training") not in sys.path:  # psa.py lives beside this script
        sys.path.insert(0, str(REPO / "Training"))
    from psa import PrototypeBank, build_bank, choose_paired

    psa_cfg = cfg["psa"]
    bank_file, info_file = out / "psa" / "bank.safetensors", out / "psa" / "psa.json"
    if bank_file.is_file() and info_file.is_file():
        t = load_file(str(bank_file))
        return PrototypeBank(t["query_prototypes"], t["response_prototypes"], t["response_mask"],
                             t["prototype_cluster"], json.loads(info_file.read_text(encoding="utf-8")))
    data = cfg["data"]
    fraction, seed = float(data.get("text_fraction", 1.0)), int(cfg["train"]["seed"])
    paired = choose_paired([c.case_id for c in train_cases], fraction, seed)
    split_file = out / "text_split.json"
    split_file.write_text(encoding="utf-8", data=json.dumps(
        {"text_fraction": fraction, "seed": seed, "train_cases": len(train_cases), "paired": paired}, indent=1))
    logger.info("PSA: %d of %d training cases keep their report (text_fraction %s, seed %d)",
                len(paired), len(train_cases), fraction, seed)

    rel = copy.deepcopy({k: v for k, v in cfg.items() if k not in ("psa", "config_path")})
    rel["name"] = f"{cfg.get('name', 'prolearn')}_relevance"
    rel["output_dir"] = str(out / "relevance")
    rel["model"]["num_prototypes"] = 0
    rel["data"] = {**{k: v for k, v in data.items() if k != "text_fraction"}, "train_cases_file": str(split_file)}
    rel["train"] = {**cfg["train"], "final_engine_eval": False, **(psa_cfg.get("relevance_train") or {})}
    rel["export"] = {"dir": str(out / "relevance" / "model")}
    rel_file = out / "relevance.yaml"
    rel_file.write_text(encoding="utf-8", data=yaml.safe_dump(rel, sort_keys=False))
    logger.info("PSA: training the token-relevance model on the paired subset (%s)", rel_file)
    rel_result = main(["--config", str(rel_file)])

    rel_cfg = config_from_dict(rel["model"])
    encoder = TextEncoder(rel_cfg.text).to(device)
    relevance = build_model(rel_cfg).to(device)
    relevance.load_state_dict(load_file(str(out / "relevance" / "best" / "model.safetensors")))
    by_id = {c.case_id: c for c in train_cases}
    cases = [by_id[i] for i in paired]
    images = PreloadedDataset(cases, rel_cfg.image_size, rel_cfg.intensity, rel_cfg.in_channels).images
    bank = build_bank(relevance, encoder, images, [c.case_id for c in cases], [c.text for c in cases],
                      per_cluster=int(psa_cfg.get("prototypes_per_cluster", rel_cfg.prototypes_per_cluster)),
                      relevance_threshold=float(psa_cfg.get("relevance_threshold", 1.0)),
                      min_cluster_size=min_cluster_size(psa_cfg.get("min_cluster_size", 0.05), len(paired)),
                      min_samples=psa_cfg.get("min_samples"), seed=seed)
    bank.info.update({"text_fraction": fraction, "train_cases": len(train_cases),
                      "relevance_model": {"best": rel_result["best"], "epochs": rel_result["epochs"]}})
    bank_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(bank.tensors(), str(bank_file))
    info_file.write_text(encoding="utf-8", data=json.dumps(bank.info, indent=1))
    logger.info("PSA: %d surrogate groups (sizes %s) -> %d prototypes", bank.info["surrogate_groups"],
                bank.info["group_sizes"], bank.query.shape[0])
    return bank


def min_cluster_size(setting: float, paired: int) -> int:
    """HDBSCAN's min_cluster_size: a count, or (below 1) a fraction of the paired cases, so 1 % and
    50 % text give comparable numbers of surrogate groups (and a bank of bounded size)."""
    return max(2, int(round(setting * paired))) if setting < 1 else int(setting)


def init_from_relevance_model(model: torch.nn.Module, out: Path, bank: Any) -> None:
    """Start ProLearn from the relevance model's weights (so the query prototypes, which are its
    image features, live in the encoder's space) and the bank PSA built."""
    weights = load_file(str(out / "relevance" / "best" / "model.safetensors"))
    own = model.state_dict()
    weights = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    weights.update({k: v.to(own[k].dtype) for k, v in bank.tensors().items()})
    missing = set(own) - set(weights)
    if missing:
        raise SystemExit(f"relevance model and ProLearn differ: {sorted(missing)[:5]}")
    model.load_state_dict(weights)


def psa_card_section(info: dict[str, Any], model_cfg: Any) -> str:
    """Model-card lines: how the prototype bank was made (settings, groups, examples)."""
    rel = info.get("relevance_model", {}).get("best") or {}
    lines = ["", "## Prototype bank (PSA initialisation)", "",
             f"- paired subset: {info['paired_cases']} of {info.get('train_cases', '?')} training cases keep their "
             f"report (text_fraction {info.get('text_fraction')}, seed {info['seed']}; ids in `text_split.json` of the run)",
             f"- token-relevance model (same architecture, no bank, trained on the paired subset only): validation Dice "
             f"global {rel.get('dice_global', float('nan')):.4f} / per-image {rel.get('dice_per_image', float('nan')):.4f} "
             f"(with reports)",
             f"- shortened sentences: words with >= {info['relevance_threshold']} x the uniform share of the guide "
             f"stages' cross-attention",
             f"- HDBSCAN (min_cluster_size {info['min_cluster_size']}, min_samples {info['min_samples']}): "
             f"{info['surrogate_groups']} surrogate groups, sizes {info['group_sizes']} (noise, if any, is the last group)",
             f"- k-means M = {info['prototypes_per_cluster']} per group on image features -> "
             f"{len(info['prototypes'])} prototypes (samples nearest the centroids); top-k = {model_cfg.top_k}, "
             f"softmax temperature {model_cfg.query_temperature}",
             "", "| group | size | most common shortened sentences |", "|---|---|---|"]
    for g, (size, sentences) in enumerate(zip(info["group_sizes"], info["group_sentences"])):
        lines.append(f"| {g} | {size} | {'; '.join(repr(s) for s in sentences)} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def synth_brain_datasets(data: dict[str, Any], model_cfg: Any, t: dict[str, Any], rank: int) -> tuple:
    """``data.kind: synthseg``: training images generated from label maps, validation on a fixed
    generated set from maps kept apart (``data.val_maps``: how many of the sorted maps, from the end)."""
    from TextGuidedSegLib.data.synthseg import (BRAIN_PROMPTS, GeneratorConfig, SynthBrainDataset,
                                                SynthBrainValidation, label_map_files, read_label_slices)

    files = label_map_files(data["root"])
    n_val = int(data.get("val_maps", 3))
    if not 0 < n_val < len(files):
        raise SystemExit(f"data.val_maps must be between 1 and {len(files) - 1} (there are {len(files)} label maps)")
    maps = {"train": files[:-n_val], "val": files[-n_val:]}
    generator = GeneratorConfig(**(data.get("generator") or {}))
    train_ds = SynthBrainDataset(read_label_slices(maps["train"]), model_cfg.image_size,
                                 prompts_per_image=int(data.get("prompts_per_image", 4)),
                                 absent_fraction=float(data.get("absent_fraction", 0.2)),
                                 samples_per_epoch=int(data.get("samples_per_epoch", 4096)), config=generator,
                                 seed=t["seed"])
    val_ds = SynthBrainValidation(read_label_slices(maps["val"]), model_cfg.image_size,
                                  images=int(data.get("val_images", 150)), config=generator) if rank == 0 else None
    text_pool = sorted({p for tg in BRAIN_PROMPTS.targets for p in tg.phrasings})
    return train_ds, val_ds, text_pool, maps


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config, e.g. Training/configs/tmc_qata_cpu.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides, e.g. train.epochs=2 output_dir=/tmp/run")
    parser.add_argument("--no-resume", action="store_true", help="start over even if <output_dir>/last exists")
    parser.add_argument("--export-only", action="store_true",
                        help="train nothing: export <output_dir>/best as a scored model directory again")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    cfg = load_config(args.config, args.set)
    cfg["config_path"] = args.config
    t = cfg["train"]
    rank, world, device = setup_distributed()
    out = Path(cfg["output_dir"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])

    data = cfg["data"]
    options = data.get("options", {}) or {}
    volumes = data["kind"] in VOLUME_KINDS  # labelled volumes: slices are cut from them (data.planes)
    synth = data["kind"] == "synthseg"  # brain images generated from label maps (data/synthseg.py)
    msd = None
    if synth:
        train_cases, val_cases = [], []  # the label maps are read below; no case list
    elif volumes:
        msd = read_msd_dataset(data["root"], data.get("train_split", "train"), **options)
        train_cases = msd.cases
        val_cases = read_msd_dataset(data["root"], data.get("val_split", "val"), **options).cases
    else:
        train_cases = read_dataset(data["kind"], data["root"], data.get("train_split", "train"), **options)
        val_cases = read_dataset(data["kind"], data["root"], data.get("val_split", "val"), **options)
    if t["max_train_cases"]:
        train_cases = train_cases[: t["max_train_cases"]]
    if t["max_val_cases"]:
        val_cases = val_cases[: t["max_val_cases"]]
    if data.get("train_cases_file"):  # e.g. ProLearn's token-relevance model: the paired subset only
        keep = set(json.loads(Path(data["train_cases_file"]).read_text(encoding="utf-8"))["paired"])
        train_cases = [c for c in train_cases if c.case_id in keep]
        if not train_cases:
            raise SystemExit(f"no training case of {data['train_cases_file']} is in the dataset")

    torch.manual_seed(t["seed"])
    bank = None
    if cfg.get("psa") and rank == 0:
        bank = prepare_prototypes(cfg, out, train_cases, device)
        cfg["model"]["num_prototypes"] = int(bank.query.shape[0])
    elif cfg.get("psa"):
        raise SystemExit("PSA initialisation runs in one process; run it once without torchrun first")
    model_cfg = config_from_dict(cfg["model"])
    text_encoder = TextEncoder(model_cfg.text).to(device)  # loaded first: it fixes config.text.dim
    torch.manual_seed(t["seed"])
    model = build_model(model_cfg).to(device)
    if bank is not None:
        init_from_relevance_model(model, out, bank)
    elif hasattr(model, "load_pretrained_backbone") and not (out / "last").is_dir():
        model.load_pretrained_backbone()
    for c in train_cases + val_cases:
        if c.laterality != model_cfg.laterality:
            raise SystemExit(f"dataset laterality {c.laterality!r} differs from the model's {model_cfg.laterality!r}")
    aug = AugmentConfig(**cfg.get("augment", {}))
    transforms = build_train_transforms(aug, model_cfg.image_size)
    plane = "coronal"  # what SSA's guidance grid assumes for a 2D picture (as the engine does)
    if synth:
        train_ds, val_ds, text_pool, synth_maps = synth_brain_datasets(data, model_cfg, t, rank)
        plane = "axial"
    elif volumes:
        planes = list(data.get("planes") or ["axial"])
        if len(planes) > 1 and getattr(model, "encode_text", None) is not None:
            raise SystemExit("this model's text depends on the slice plane: train it on one plane (data.planes)")
        plane = planes[0]
        train_ds = VolumeSliceDataset(train_cases, msd.prompts, model_cfg.image_size, model_cfg.intensity,
                                      model_cfg.in_channels, planes=planes, transforms=transforms,
                                      empty_fraction=float(data.get("empty_fraction", 1.0)), seed=t["seed"])
        val_ds = VolumeSliceDataset(val_cases, msd.prompts, model_cfg.image_size, model_cfg.intensity,
                                    model_cfg.in_channels, planes=planes, keep_native_masks=True,
                                    canonical_only=True) if rank == 0 else None
        text_pool = sorted({p for tg in msd.prompts.targets for p in tg.phrasings})
    else:
        train_ds = PreloadedDataset(train_cases, model_cfg.image_size, model_cfg.intensity, model_cfg.in_channels,
                                    transforms=transforms)
        val_ds = PreloadedDataset(val_cases, model_cfg.image_size, model_cfg.intensity, model_cfg.in_channels,
                                  keep_native_masks=True) if rank == 0 else None
        text_pool = [c.text for c in train_cases + val_cases]

    if hasattr(model, "prepare_training_texts"):
        # e.g. TGC-Net's auxiliary prompts: generated once, stored beside the data (data.auxiliary_dir)
        stored = model.prepare_training_texts(list(text_pool),
                                              data.get("auxiliary_dir") or data["root"])
        logger.info("auxiliary prompts: %s", stored)
    if getattr(model, "trains_without_text", False):
        # ProLearn after PSA initialisation: training and validation read no text at all
        def text_for(batch_texts: list[str]) -> None:
            return None
    elif getattr(model, "encode_text", None) is not None:
        # the model reads more than TextFeatures (e.g. SSA's parsed expressions); it caches frozen
        # encoders' vectors per string itself
        def text_for(batch_texts: list[str]) -> Any:
            return encode_prompts(model, text_encoder, batch_texts, plane=plane).to(device)
    elif model_cfg.text.uses_cache:
        texts = list(text_pool)
        if aug.flip_prob > 0:
            texts += [swap_left_right(x) for x in texts]
        if world > 1 and rank != 0:
            dist.barrier()  # rank 0 writes the cache file first; the others then read it (no race)
        table, text_row = build_text_table(text_encoder, texts, out / "text_cache.safetensors")
        if world > 1 and rank == 0:
            dist.barrier()
        table = table.to(device)

        def text_for(batch_texts: list[str]) -> TextFeatures:
            return table.index([text_row[x] for x in batch_texts])
    else:
        def text_for(batch_texts: list[str]) -> TextFeatures:
            return text_encoder.encode(batch_texts)

    params = [{"params": model.parameters(), "lr": t["lr"]}]
    if not model_cfg.text.uses_cache:
        params.append({"params": [p for p in text_encoder.parameters() if p.requires_grad], "lr": t["text_lr"]})
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(t["optimizer"])
    if opt_cls is None:
        raise SystemExit(f"train.optimizer must be adam or adamw, got {t['optimizer']!r}")
    optimizer = opt_cls(params, lr=t["lr"], weight_decay=t["weight_decay"])
    steps_per_epoch = math.ceil(len(train_ds) / (t["batch_size"] * world) / t["grad_accum"])
    scheduler = make_scheduler(optimizer, t, steps_per_epoch)

    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    state = {"epoch": 0, "best": None, "bad_epochs": 0, "history": [], "wall_s": 0.0, "step": 0,
             "command": command, "hardware": f"{hardware} x {world} process(es)"}
    last = out / "last"
    if last.is_dir() and not args.no_resume:
        state = load_train_state(last, model, optimizer, scheduler, text_encoder)
        # runs started before these fields existed: same machine, the plain command
        state.setdefault("hardware", f"{hardware} x {world} process(es)")
        state.setdefault("command", f"python Training/train.py --config {args.config}")
        logger.info("resumed from %s at epoch %d", last, state["epoch"])

    # find_unused_parameters: a model may leave parameters out of some steps' loss graph (e.g. a
    # text-free branch); plain DDP fails on the 2nd step then. Costs one graph walk per step.
    if args.export_only:
        if state["best"] is None or not (out / "best").is_dir():
            raise SystemExit(f"--export-only: {out / 'best'} does not exist; train first")
        state["epoch"] = max(state["epoch"], t["epochs"])  # skip the loop
    ddp_model = DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
    dice_loss = DiceLoss(sigmoid=True)
    # fp16 autocast (GPUs without bf16, e.g. V100 / T4) needs loss scaling or small gradients flush
    # to zero; bf16 and fp32 do not (the scaler is then a pass-through)
    scaler = torch.amp.GradScaler("cuda", enabled=uses_fp16(device, t["amp"]))
    if t["amp"] and device.type == "cuda":
        logger.info("mixed precision: %s", "fp16 with loss scaling" if scaler.is_enabled() else "bf16")
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, seed=t["seed"], drop_last=True) \
        if world > 1 else None
    log_path = out / "log.csv"
    writer = None
    if t["tensorboard"] and rank == 0:
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package (extra "train")

        writer = SummaryWriter(log_dir=str(out / "tensorboard"))
    started = time.time() - state["wall_s"]
    stop = False
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None

    while state["epoch"] < t["epochs"] and not stop:
        epoch = state["epoch"]
        epoch_seed = t["seed"] * 100003 + epoch
        torch.manual_seed(epoch_seed + rank)
        seed_transforms(transforms, epoch_seed + rank)
        if sampler is not None:
            sampler.set_epoch(epoch)
            order = None
        else:
            order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(epoch_seed)).tolist()
        if hasattr(train_ds, "set_epoch"):  # generated data: the epoch seeds the images
            train_ds.set_epoch(epoch)
        loader = DataLoader(train_ds, batch_size=t["batch_size"], sampler=sampler if sampler is not None else order,
                            collate_fn=getattr(train_ds, "collate", collate), num_workers=t["num_workers"],
                            drop_last=True)
        model.train()
        text_encoder.train()
        if hasattr(model, "on_epoch_start"):  # e.g. SVP-CVAE's KL warm-up beta(t)
            model.on_epoch_start(epoch)
        sums: dict[str, float] = {}
        n_batches = 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{t['epochs']}", disable=rank != 0 or tqdm is None,
                   mininterval=10.0) if tqdm else loader
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(bar):
            images, masks = batch["image"].to(device), batch["mask"].to(device)
            with autocast(device, t["amp"]):
                extra = {"target": masks} if getattr(model, "uses_target", False) else {}
                out_dict = ddp_model(images, text_for(batch["text"]), **extra)
            loss, parts = training_loss(out_dict, masks, dice_loss, t["bce_weight"], t["dice_weight"])
            scaler.scale(loss / t["grad_accum"]).backward()
            if (i + 1) % t["grad_accum"] == 0:
                scaler.unscale_(optimizer)  # true gradients for the all-reduce and the clip below
                if world > 1 and not model_cfg.text.uses_cache:
                    # the text encoder sits outside the DDP wrapper: average its gradients by hand
                    for p in text_encoder.parameters():
                        if p.grad is not None:
                            dist.all_reduce(p.grad)
                            p.grad /= world
                if t["grad_clip"]:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
                scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if t["schedule"] == "cosine":
                    scheduler.step()
                state["step"] += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            n_batches += 1
            if tqdm and rank == 0:
                bar.set_postfix(loss=f"{sums['loss'] / n_batches:.4f}", refresh=False)
        state["epoch"] = epoch + 1
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
               **{f"train_{k}": v / max(1, n_batches) for k, v in sums.items()}}
        if rank == 0 and ((epoch + 1) % t["val_every"] == 0 or epoch + 1 == t["epochs"]):
            metrics = validate(model, val_ds, text_for, max(1, t["batch_size"]), device, t["amp"])
            row.update({f"val_{k}": v for k, v in metrics.items()})
            score = metrics[t["monitor"]]
            if t["schedule"] == "plateau":
                scheduler.step(score)
            if state["best"] is None or score > state["best"][t["monitor"]]:
                state["best"] = {**metrics, "epoch": epoch + 1}
                state["bad_epochs"] = 0
                save_train_state(out / "best", model, optimizer, scheduler, {**state}, text_encoder)
            else:
                state["bad_epochs"] += 1
            if state["bad_epochs"] >= t["early_stop_patience"]:
                logger.info("early stop: no %s improvement for %d validations", t["monitor"], state["bad_epochs"])
                stop = True
        state["wall_s"] = time.time() - started
        if t["max_time_minutes"] and state["wall_s"] > 60 * t["max_time_minutes"]:
            logger.info("time budget of %s min reached", t["max_time_minutes"])
            stop = True
        row["wall_s"] = round(state["wall_s"], 1)
        state["history"].append(row)
        if rank == 0:
            logger.info("epoch %d: %s", epoch + 1, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
            new = not log_path.exists()
            with log_path.open("a", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    w.writeheader()
                w.writerow(row)
            save_train_state(last, model, optimizer, scheduler, state, text_encoder)
            if writer is not None:
                for k, v in row.items():
                    if k != "epoch":
                        writer.add_scalar(k, v, epoch + 1)
                writer.flush()
        if world > 1:
            flag = torch.tensor([int(stop)], device=device)
            dist.broadcast(flag, 0)
            stop = bool(flag.item())

    result = {"best": state["best"], "epochs": state["epoch"], "output_dir": str(out)}
    if rank == 0 and state["best"] is not None:
        result["model_dir"] = str(export_best(cfg, out, state, model_cfg, text_encoder, val_cases,
                                              len(synth_maps["train"]) if synth else len(train_cases), device, world))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
