"""Training/train.py end to end on a tiny TMC and 32 QaTa cases (a few seconds per run):
loss goes down, resume is exact, the exported model loads, and 2-process DDP on CPU (gloo) works."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from TextGuidedSegLib.checkpoint import load_pretrained

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "Training" / "train.py"


def _load_train_module():
    spec = importlib.util.spec_from_file_location("textguidedseg_train_script", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_module():
    return _load_train_module()


def tiny_config(shared_data: Path, output_dir: Path, **train) -> dict:
    return {
        "name": "tiny_tmc_test",
        "output_dir": str(output_dir),
        "model": {
            "model_type": "tmc", "image_size": 64, "in_channels": 1, "laterality": "image",
            "intensity": {"mode": "percentile", "lower": 0.5, "upper": 99.5},
            "text": {"name_or_path": "packaged:all-MiniLM-L6-v2", "max_length": 16, "pooling": "mean"},
            "embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 2,
            "cnn_channels": [4, 4, 8, 8, 8], "decoder_channels": [8, 8, 8, 4, 4], "mcm_stages": [2, 3, 4],
            "mcm_heads": 2, "align_dim": 8, "align_weight": 0.1, "drop_path_rate": 0.0,
        },
        "data": {"kind": "qata", "root": str(shared_data / "qata"), "train_split": "train", "val_split": "val"},
        # augmentations on (flip included: the text table then holds the left/right-swapped prompts too),
        # so that exact resume also covers the per-epoch augmentation seeds
        "augment": {"affine_prob": 0.5, "flip_prob": 0.5, "contrast_prob": 0.3},
        "train": {"epochs": 3, "batch_size": 8, "lr": 1e-3, "max_train_cases": 32, "max_val_cases": 16,
                  "warmup_epochs": 0, "amp": False, "seed": 0, **train},
    }


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(encoding="utf-8", data=yaml.safe_dump(cfg, sort_keys=False))
    return path


def read_log(output_dir: Path) -> list[dict]:
    with (output_dir / "log.csv").open(newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def run_a(shared_data, tmp_path_factory, train_module):
    """A straight 3-epoch run."""
    root = tmp_path_factory.mktemp("train_a")
    cfg = write_config(root / "tiny.yaml", tiny_config(shared_data, root / "out"))
    result = train_module.main(["--config", str(cfg)])
    return root / "out", result, cfg


def test_training_loss_goes_down(run_a):
    out, result, _ = run_a
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    for r in log:
        parts = r["train_bce"] + r["train_dice"] + r["train_align"]
        assert r["train_loss"] == pytest.approx(parts, rel=1e-5)  # loss = BCE + Dice + weighted alignment
        assert 0 <= r["val_dice_global"] <= 1 and 0 <= r["val_dice_per_image"] <= 1
    lrs = [r["lr"] for r in log]
    assert lrs[0] > lrs[1] > lrs[2]  # cosine decay
    assert result["epochs"] == 3
    assert {p.name for p in out.iterdir()} >= {"last", "best", "model", "log.csv", "text_cache.safetensors"}
    texts = json.loads((out / "text_cache.json").read_text(encoding="utf-8"))["texts"]
    assert any("left lung" in t for t in texts) and texts == sorted(set(texts))


def test_exported_model_loads_with_both_dice_figures(run_a):
    out, result, _ = run_a
    model_dir = Path(result["model_dir"])
    assert model_dir == out / "model"
    loaded = load_pretrained(model_dir)
    assert loaded.config.model_type == "tmc" and loaded.config.image_size == 64
    payload = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    val = payload["metadata"]["validation"]
    best_row = next(r for r in read_log(out) if r["epoch"] == val["epoch"])
    assert val["dice_global"] == pytest.approx(best_row["val_dice_global"])
    assert val["dice_per_image"] == pytest.approx(best_row["val_dice_per_image"])
    assert val["dataset"] == "qata" and val["split"] == "val"
    assert payload["metadata"]["name"] == "tiny_tmc_test"
    assert payload["metadata"]["training"]["train_cases"] == 32
    assert payload["metadata"]["training"]["val_cases"] == 16
    card = (model_dir / "README.md").read_text(encoding="utf-8")
    assert "Dice, global" in card and "Dice, per-image" in card
    assert f"{val['dice_global']:.4f}" in card and f"{val['dice_per_image']:.4f}" in card
    # the exported weights are the best epoch's
    from safetensors.torch import load_file
    best = load_file(str(out / "best" / "model.safetensors"))
    for k, v in loaded.model.state_dict().items():
        assert (v == best[k]).all(), k


def test_resume_is_exact(run_a, shared_data, tmp_path, train_module):
    out_a, _, _ = run_a
    out_b = tmp_path / "out"
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(shared_data, out_b))
    # run B, part 1: a tiny time budget stops it after the first epoch
    first = train_module.main(["--config", str(cfg), "--set", "train.max_time_minutes=0.00001"])
    assert first["epochs"] == 1
    assert [r["epoch"] for r in read_log(out_b)] == [1]
    assert json.loads((out_b / "last" / "state.json").read_text(encoding="utf-8"))["trainer"]["epoch"] == 1
    # run B, part 2: the same command without the budget continues from last/
    second = train_module.main(["--config", str(cfg)])
    assert second["epochs"] == 3
    log_a, log_b = read_log(out_a), read_log(out_b)
    assert [r["epoch"] for r in log_b] == [1, 2, 3]
    for ra, rb in zip(log_a, log_b):
        for key in ("train_loss", "train_bce", "train_dice", "train_align", "lr", "val_dice_global"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-6), (ra["epoch"], key, ra[key], rb[key])


def test_unknown_train_setting_is_refused(run_a, train_module):
    _, _, cfg = run_a
    with pytest.raises(SystemExit, match="unknown train settings"):
        train_module.main(["--config", str(cfg), "--set", "train.epochz=3"])


def test_ddp_two_processes_on_cpu(shared_data, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip(f"torchrun not found next to {sys.executable}")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(shared_data, out, epochs=2))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(TRAIN_SCRIPT),
                           "--config", str(cfg)], cwd=REPO, env=env, capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2]  # rank 0 alone writes the log
    loaded = load_pretrained(out / "model")
    assert loaded.config.model_type == "tmc"
    meta = loaded.metadata
    assert "x 2 process(es)" in meta["training"]["hardware"]
    assert {"dice_global", "dice_per_image"} <= set(meta["validation"])


# ----------------------------------------------------------------------------- every config, SSA
@pytest.mark.parametrize("path", sorted((REPO / "Training" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_builds_its_model(path, train_module):
    """A typo in a config (unknown field, bad size) fails here, not an hour into a GPU job."""
    from TextGuidedSegLib.models import build_model, config_from_dict

    cfg = train_module.load_config(path, [])
    assert cfg["output_dir"].startswith("runs/") and cfg["name"] == path.stem
    notes = (cfg.get("export") or {}).get("notes")
    assert notes is None or (REPO / notes).is_file(), f"export.notes {notes} does not exist"
    model_cfg = config_from_dict(cfg["model"])
    # QaTa's and Kvasir's text speaks of the image's sides (measured); volume prompts of the patient's
    assert model_cfg.laterality == ("patient" if cfg["data"]["kind"] in ("msd", "synthseg") else "image")
    if path.stem.endswith("_cpu"):
        model = build_model(model_cfg)
        n_params = sum(p.numel() for p in model.parameters())
        assert n_params * 4 < 25 * 2**20, "a CPU config must export under 25 MB"


def tiny_ssa_config(shared_data: Path, output_dir: Path, **train) -> dict:
    cfg = tiny_config(shared_data, output_dir, **train)
    cfg["name"] = "tiny_ssa_test"
    cfg["model"] = {
        "model_type": "ssa", "image_size": 64, "in_channels": 1, "laterality": "image",
        "text": {"name_or_path": "packaged:all-MiniLM-L6-v2", "max_length": 16, "pooling": "mean"},
        "encoder_channels": [4, 4, 8, 8, 8], "decoder_channels": [8, 8, 4, 4], "dim": 8, "ot_iterations": 10,
    }
    return cfg


def test_ssa_trains_and_exports(shared_data, tmp_path, train_module):
    cfg = write_config(tmp_path / "ssa.yaml", tiny_ssa_config(shared_data, tmp_path / "out"))
    result = train_module.main(["--config", str(cfg)])
    log = read_log(tmp_path / "out")
    assert [r["epoch"] for r in log] == [1, 2, 3]
    for r in log:
        parts = r["train_bce"] + r["train_dice"] + r["train_align"] + r["train_guidance"]
        assert r["train_loss"] == pytest.approx(parts, rel=1e-5)  # + alignment + outside-the-guidance loss
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    loaded = load_pretrained(result["model_dir"])
    assert loaded.config.model_type == "ssa" and loaded.config.ot == "symmetric" and loaded.config.guidance
    val = json.loads((Path(result["model_dir"]) / "config.json").read_text(encoding="utf-8"))["metadata"]["validation"]
    assert "laterality_error_rate" in val and val["laterality_cases"] > 0


def test_svp_cvae_trains_with_lora_and_exports(shared_data, tmp_path, train_module):
    """LoRA text training through train.py: KL warm-up from the epoch hook, the posterior fed the
    masks, the adapter exported beside the weights, and the export scored by the engine."""
    cfg = tiny_config(shared_data, tmp_path / "out", max_train_cases=24, max_val_cases=8)
    cfg["name"] = "tiny_svp_test"
    cfg["model"] = {
        "model_type": "svp_cvae", "image_size": 64, "in_channels": 1, "laterality": "image",
        "text": {"name_or_path": "packaged:all-MiniLM-L6-v2", "max_length": 16, "pooling": "mean",
                 "lora_layers": [5], "lora_targets": ["query", "value"]},
        "encoder_channels": [4, 4, 8, 8, 8], "decoder_channels": [8, 8, 4, 4], "dim": 8, "heads": 2,
        "text_levels": [2, 4, 6], "latent_dim": 3, "kl_warmup_start": 1, "kl_warmup_epochs": 1, "samples": 2,
    }
    cfg["train"]["text_lr"] = 1e-3
    result = train_module.main(["--config", str(write_config(tmp_path / "svp.yaml", cfg))])
    log = read_log(tmp_path / "out")
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[0]["train_kl"] == 0.0 and log[1]["train_kl"] > 0  # beta = 0 in epoch 1, then 1
    for r in log:
        parts = r["train_bce"] + r["train_dice"] + r["train_kl"] + r["train_sal"]
        assert r["train_loss"] == pytest.approx(parts, rel=1e-5)
        assert "val_iou_per_image" in r
    model_dir = Path(result["model_dir"])
    assert (model_dir / "text_encoder" / "adapter_config.json").is_file()
    loaded = load_pretrained(model_dir)
    assert loaded.config.text.adapter_path and loaded.config.model_type == "svp_cvae"
