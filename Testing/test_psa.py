"""ProLearn's PSA initialisation (Training/psa.py) on real QaTa cases, and the whole ProLearn
pipeline through Training/train.py (paired split -> relevance model -> bank -> text-free training)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_prolearn_config
from TextGuidedSegLib.checkpoint import load_pretrained
from TextGuidedSegLib.data import read_dataset
from TextGuidedSegLib.data.dataset import PreloadedDataset
from TextGuidedSegLib.models import build_model

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("hdbscan", reason="PSA clusters with the hdbscan package (extra 'train' / 'test')")


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


@pytest.fixture(scope="module")
def psa():
    return _load("textguidedseg_psa", REPO / "Training" / "psa.py")


@pytest.fixture(scope="module")
def subset(shared_data):
    """24 real QaTa training cases (images at 64 px, as the tiny model reads them)."""
    cases = read_dataset("qata", shared_data / "qata", "train")[:24]
    cfg = make_tiny_prolearn_config()
    images = PreloadedDataset(cases, cfg.image_size, cfg.intensity, cfg.in_channels).images
    return cases, images


def test_choose_paired_is_seeded(psa):
    ids = [f"case{i:03d}" for i in range(200)]
    half = psa.choose_paired(ids, 0.5, seed=0)
    assert len(half) == 100 and set(half) <= set(ids) and half == sorted(half)
    assert psa.choose_paired(list(reversed(ids)), 0.5, seed=0) == half   # order of the input does not matter
    assert psa.choose_paired(ids, 0.5, seed=1) != half
    assert len(psa.choose_paired(ids, 0.01, seed=0)) == 2
    assert len(psa.choose_paired(ids[:10], 0.01, seed=0)) == 1          # at least one report
    with pytest.raises(ValueError, match="text_fraction"):
        psa.choose_paired(ids, 0.0, seed=0)


def test_word_pieces_and_shortening(psa):
    words = psa.merge_word_pieces(["un", "##ila", "##teral", "pulmonary", "infection"], [0.1, 0.1, 0.1, 0.2, 0.5])
    assert [w for w, _ in words] == ["unilateral", "pulmonary", "infection"]
    np.testing.assert_allclose([s for _, s in words], [0.3, 0.2, 0.5])
    # uniform share = 1/3: keep words at or above it, in order
    assert psa.shorten(words, 1.0) == "infection"
    assert psa.shorten(words, 0.5) == "unilateral pulmonary infection"
    assert psa.shorten([("lung", 0.2), ("left", 0.2)], 5.0) == "lung"   # the top word at least
    assert psa.shorten([], 1.0) == ""


def test_surrogate_labels(psa):
    rng = np.random.default_rng(0)
    a = rng.normal([5, 0, 0], 0.05, size=(20, 3))
    b = rng.normal([0, 5, 0], 0.05, size=(20, 3))
    outlier = np.array([[0.0, 0.0, 5.0]])
    x = np.concatenate([a, b, outlier])
    labels = psa.surrogate_labels(x, min_cluster_size=5)
    assert np.array_equal(labels, psa.surrogate_labels(x, min_cluster_size=5))    # deterministic
    assert set(labels.tolist()) == {0, 1, 2}                                     # 2 clusters + the noise group
    assert len(set(labels[:20])) == 1 and len(set(labels[20:40])) == 1 and labels[0] != labels[20]
    assert labels[40] == 2


def test_bank_from_real_cases(psa, subset, minilm):
    """Deterministic with a seed; every prototype is a real sample's image feature and report."""
    cases, images = subset
    torch.manual_seed(0)
    relevance = build_model(make_tiny_prolearn_config()).eval()
    ids, texts = [c.case_id for c in cases], [c.text for c in cases]
    kwargs = dict(per_cluster=3, relevance_threshold=1.0, min_cluster_size=4, seed=0)
    bank = psa.build_bank(relevance, minilm, images, ids, texts, **kwargs)
    again = psa.build_bank(relevance, minilm, images, ids, texts, **kwargs)
    for k, v in bank.tensors().items():
        assert torch.equal(v, again.tensors()[k]), k
    assert bank.info == again.info

    n = bank.query.shape[0]
    groups = bank.info["surrogate_groups"]
    assert 1 <= groups and n <= 3 * groups and sum(bank.info["group_sizes"]) == 24
    assert set(bank.info["assignments"]) == set(ids)
    with torch.no_grad():
        features = relevance.image_query(images.float())
    for j, proto in enumerate(bank.info["prototypes"]):
        i = ids.index(proto["case_id"])
        torch.testing.assert_close(bank.query[j], features[i])                   # the sample's own feature
        report = minilm.encode([texts[i]])
        torch.testing.assert_close(bank.response[j], report.tokens[0])           # its report's tokens
        assert torch.equal(bank.response_mask[j], report.mask[0].float())
        assert bank.cluster[j] == proto["group"] == bank.info["assignments"][proto["case_id"]]["group"]
        assert proto["shortened"] and set(proto["shortened"].split()) <= set(
            texts[i].lower().replace(",", " , ").replace(".", " . ").split()) | {",", "."}
    assert len({p["case_id"] for p in bank.info["prototypes"]}) == n             # no sample twice


def test_prolearn_pipeline_through_train_script(shared_data, tmp_path):
    """One command: paired split -> relevance model on it -> bank -> text-free training -> scored export;
    re-running reuses the bank (PSA runs once)."""
    import yaml

    train = _load("textguidedseg_train_psa", REPO / "Training" / "train.py")
    out = tmp_path / "out"
    cfg = {
        "name": "tiny_prolearn_test", "output_dir": str(out),
        "model": {"model_type": "prolearn", "image_size": 64, "in_channels": 1, "laterality": "image",
                  "text": {"name_or_path": "packaged:all-MiniLM-L6-v2", "max_length": 16, "pooling": "mean"},
                  "encoder": "cnn", "cnn_channels": [4, 4, 8, 8, 8], "decoder_channels": [8, 8, 4], "heads": 2,
                  "head_channels": 4, "top_k": 2},
        "data": {"kind": "qata", "root": str(shared_data / "qata"), "train_split": "train", "val_split": "val",
                 "text_fraction": 0.25},
        "psa": {"min_cluster_size": 3, "prototypes_per_cluster": 2, "relevance_train": {"epochs": 2}},
        "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "max_train_cases": 32, "max_val_cases": 6,
                  "warmup_epochs": 0, "amp": False, "seed": 0},
        "export": {"dir": str(tmp_path / "model")},
    }
    path = tmp_path / "pl.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    result = train.main(["--config", str(path)])

    split = json.loads((out / "text_split.json").read_text(encoding="utf-8"))
    assert split["text_fraction"] == 0.25 and split["train_cases"] == 32 and len(split["paired"]) == 8
    rel_cases = json.loads((out / "relevance" / "model" / "config.json").read_text(encoding="utf-8"))
    assert rel_cases["metadata"]["training"]["train_cases"] == 8                  # the paired subset only
    info = json.loads((out / "psa" / "psa.json").read_text(encoding="utf-8"))
    assert info["paired_cases"] == 8 and set(info["assignments"]) == set(split["paired"])
    loaded = load_pretrained(result["model_dir"])
    n = len(info["prototypes"])
    assert loaded.config.num_prototypes == n and loaded.config.text_free and not loaded.model.requires_text
    card = (tmp_path / "model" / "README.md").read_text(encoding="utf-8")
    assert "Prototype bank (PSA initialisation)" in card and "--no-prompt" in card and "text-free" in card
    assert f"{n} prototypes" in card
    validation = json.loads((tmp_path / "model" / "config.json").read_text(encoding="utf-8"))["metadata"]["validation"]
    assert validation["cases"] == 6 and 0.0 <= validation["dice_global"] <= 1.0

    bank_mtime = (out / "psa" / "bank.safetensors").stat().st_mtime_ns
    train.main(["--config", str(path), "--set", "train.epochs=3"])                 # resume: one more epoch
    assert (out / "psa" / "bank.safetensors").stat().st_mtime_ns == bank_mtime


def test_config_typos_are_refused(tmp_path):
    import yaml

    train = _load("textguidedseg_train_cfg", REPO / "Training" / "train.py")
    base = yaml.safe_load((REPO / "Training" / "configs" / "prolearn_qata_cpu.yaml").read_text(encoding="utf-8"))
    for change, message in ((("psa", "min_cluster", 3), "unknown psa settings"),
                            (("data", "text_fraction", 0), "text_fraction must be in"),
                            (("psa", "relevance_train", {"epoch": 3}), "unknown psa.relevance_train")):
        cfg = yaml.safe_load(yaml.safe_dump(base))
        cfg[change[0]][change[1]] = change[2]
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        with pytest.raises(SystemExit, match=message):
            train.load_config(path, [])
