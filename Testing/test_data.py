"""Dataset readers on the shared bundle, the preloaded dataset and the text-aware flip."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from TextGuidedSegLib.data import read_csv, read_dataset, read_kvasir, read_mask, read_qata
from TextGuidedSegLib.data.dataset import PreloadedDataset, collate
from TextGuidedSegLib.data.transforms import AugmentConfig, RandFlipWithTextd, build_train_transforms, seed_transforms
from TextGuidedSegLib.models.config import IntensityConfig


@pytest.fixture(scope="module")
def qata_val(shared_data):
    return read_qata(shared_data / "qata", "val")


# ----------------------------------------------------------------------------- QaTa
def test_read_qata_counts_and_fields(shared_data, qata_val):
    train = read_qata(shared_data / "qata", "train")
    assert len(train) == 5713  # 5,716 upstream entries, 3 duplicates removed
    assert len(qata_val) == 1429
    assert len({c.case_id for c in train}) == 5713
    assert not {c.case_id for c in train} & {c.case_id for c in qata_val}
    for c in (train[0], train[-1], qata_val[0], qata_val[-1]):
        assert c.image_path.is_file() and c.mask_path.is_file()
        assert c.image_path.name == c.mask_path.name == f"{c.case_id}.png"
    assert all(c.text and c.text == c.text.strip() for c in qata_val)
    assert all(c.laterality == "image" for c in train + qata_val)
    assert all("pulmonary infection" in c.text for c in qata_val)
    first = next(c for c in train if c.case_id == "covid_0001")
    assert first.text == ("bilateral pulmonary infection, two infected areas, all left lung and middle lower "
                          "right lung.")


def test_read_qata_unknown_split(shared_data):
    with pytest.raises(ValueError) as exc:
        read_qata(shared_data / "qata", "test")  # withheld from this bundle
    assert "'test'" in str(exc.value) and "available: train, val" in str(exc.value)


def test_read_qata_wrong_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="split.json"):
        read_qata(tmp_path, "train")


# ----------------------------------------------------------------------------- Kvasir
def test_read_kvasir(shared_data):
    root = shared_data / "kvasir"
    val = read_kvasir(root, "val")
    assert len(val) == 100
    assert len(read_kvasir(root, "train", prompt="p1")) == 798
    anns = json.loads((root / "anns" / "val.json").read_text(encoding="utf-8"))
    assert [c.case_id for c in val] == [a["segment_id"] for a in anns]
    assert val[0].text == anns[0]["prompts"]["p6"] == "one medium white oval polyp, located in center of the image"
    assert all("located in" in c.text for c in val)  # p6 = the location prompt
    assert all(c.laterality == "image" for c in val)
    assert val[0].image_path.suffix == ".jpg" and val[0].mask_path.suffix == ".png"
    assert val[0].image_path.is_file() and val[0].mask_path.is_file()
    # list prompts (p7..p9) use their first variant
    p9 = read_kvasir(root, "val", prompt="p9")
    assert p9[0].text == anns[0]["prompts"]["p9"][0]


def test_read_kvasir_bad_prompt_key(shared_data):
    with pytest.raises(KeyError) as exc:
        read_kvasir(shared_data / "kvasir", "val", prompt="p42")
    assert "p42" in str(exc.value) and "p6" in str(exc.value)
    with pytest.raises(ValueError, match="empty"):
        read_kvasir(shared_data / "kvasir", "val", prompt="p0")  # the medvlsm empty prompt
    with pytest.raises(ValueError, match="available: train, val"):
        read_kvasir(shared_data / "kvasir", "test")


def test_read_dataset_dispatch(shared_data):
    assert len(read_dataset("kvasir", shared_data / "kvasir", "val", prompt="p2")) == 100
    with pytest.raises(KeyError, match="csv, kvasir, msd, qata"):
        read_dataset("brats", shared_data, "val")


# ----------------------------------------------------------------------------- CSV
def _write_case(folder, name, value):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(folder / name)


def test_read_csv(tmp_path):
    _write_case(tmp_path / "img", "a.png", 100)
    _write_case(tmp_path / "msk", "a.png", 255)
    _write_case(tmp_path / "img", "b.png", 50)
    _write_case(tmp_path / "msk", "b.png", 0)
    table = tmp_path / "cases.csv"
    with table.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "mask", "text", "split", "case_id"])
        w.writerow(["img/a.png", "msk/a.png", "left lung", "train", ""])
        w.writerow(["img/b.png", "msk/b.png", "right lung", "val", "case_b"])
    all_cases = read_csv(table)
    assert [c.case_id for c in all_cases] == ["a", "case_b"]  # stem when case_id is empty
    assert all_cases[0].image_path == tmp_path / "img" / "a.png"  # resolved against the CSV's folder
    assert all_cases[0].image_path.is_file() and all_cases[1].mask_path.is_file()
    train = read_csv(table, split="train")
    assert [(c.case_id, c.text) for c in train] == [("a", "left lung")]
    assert read_mask(train[0].mask_path).all()
    assert [c.case_id for c in read_dataset("csv", table, "val")] == ["case_b"]
    assert read_csv(table, laterality="patient")[0].laterality == "patient"
    with pytest.raises(ValueError, match="available: train, val"):
        read_csv(table, split="test")


def test_read_csv_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_csv(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text(encoding="utf-8", data="image,text\nx.png,left\n")
    with pytest.raises(ValueError, match=r"missing columns \['mask'\]"):
        read_csv(bad)
    nosplit = tmp_path / "nosplit.csv"
    nosplit.write_text(encoding="utf-8", data="image,mask,text\nx.png,y.png,left\n")
    with pytest.raises(ValueError, match="no 'split' column"):
        read_csv(nosplit, split="train")


# ----------------------------------------------------------------------------- preloaded dataset
@pytest.fixture(scope="module")
def small_ds(qata_val):
    return PreloadedDataset(qata_val[:8], 64, IntensityConfig(), keep_native_masks=True)


def test_preloaded_dataset(small_ds, qata_val):
    ds = small_ds
    assert len(ds) == 8
    assert ds.images.shape == (8, 1, 64, 64) and ds.images.dtype == torch.float16
    assert ds.masks.shape == (8, 1, 64, 64)
    item = ds[3]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 64, 64)
    assert item["text"] == qata_val[3].text and item["index"] == 3
    assert float(ds.images.min()) >= 0.0 and float(ds.images.max()) <= 1.0
    assert float(ds.images.max()) > 0.9 and float(ds.images.min()) < 0.05  # stretched to [0, 1]
    assert set(torch.unique(ds.masks).tolist()) <= {0, 1}
    for i, native in enumerate(ds.native_masks):
        assert native.shape == (224, 224) and native.dtype == bool
        # the 64 px mask covers the same fraction of the image as the native one
        assert abs(float(ds.masks[i].float().mean()) - native.mean()) < 0.03
        # and the 64 px image is the X-ray, downsampled (high correlation with a plain PIL resize)
        with Image.open(qata_val[i].image_path) as im:
            ref = np.asarray(im.convert("L").resize((64, 64), Image.BILINEAR), dtype=np.float32)
        corr = np.corrcoef(ref.ravel(), ds.images[i, 0].float().numpy().ravel())[0, 1]
        assert corr > 0.95, (i, corr)
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 1, 64, 64) and batch["index"].tolist() == [0, 1]
    assert batch["text"] == [qata_val[0].text, qata_val[1].text]


def test_preloaded_dataset_refuses_empty():
    with pytest.raises(ValueError, match="empty"):
        PreloadedDataset([], 64, IntensityConfig())


# ----------------------------------------------------------------------------- flip with text
def _sample(small_ds, i=0):
    item = small_ds[i]
    item["text"] = "unilateral pulmonary infection, one infected area, lower Left lung and all right lung."
    return item


def test_flip_with_text_prob_one(small_ds):
    sample = _sample(small_ds)
    out = RandFlipWithTextd(prob=1.0)(sample)
    assert torch.equal(torch.as_tensor(out["image"]), torch.flip(sample["image"], dims=(-1,)))
    assert torch.equal(torch.as_tensor(out["mask"]), torch.flip(sample["mask"], dims=(-1,)))
    assert not torch.equal(torch.as_tensor(out["image"]), sample["image"])  # really asymmetric data
    assert out["text"] == "unilateral pulmonary infection, one infected area, lower Right lung and all left lung."
    assert sample["text"].endswith("lower Left lung and all right lung.")  # input not modified
    # twice = identity
    twice = RandFlipWithTextd(prob=1.0)(out)
    assert torch.equal(torch.as_tensor(twice["image"]), sample["image"]) and twice["text"] == sample["text"]


def test_flip_with_text_prob_zero(small_ds):
    sample = _sample(small_ds)
    out = RandFlipWithTextd(prob=0.0)(sample)
    assert torch.equal(torch.as_tensor(out["image"]), sample["image"])
    assert torch.equal(torch.as_tensor(out["mask"]), sample["mask"])
    assert out["text"] == sample["text"]


def test_flip_inside_dataset(qata_val):
    plain = PreloadedDataset(qata_val[:2], 32, IntensityConfig())
    flipped = PreloadedDataset(qata_val[:2], 32, IntensityConfig(), transforms=RandFlipWithTextd(prob=1.0))
    a, b = plain[1], flipped[1]
    assert torch.equal(b["image"], torch.flip(a["image"], dims=(-1,)))
    assert torch.equal(b["mask"], torch.flip(a["mask"], dims=(-1,)))
    assert b["text"] != a["text"] and b["text"].replace("right", "RIGHT").replace("left", "right").replace(
        "RIGHT", "left") == a["text"]
    assert type(b["image"]) is torch.Tensor  # MetaTensor unwrapped


def test_seeded_augmentation_is_reproducible(small_ds):
    cfg = AugmentConfig(affine_prob=1.0, flip_prob=0.5, contrast_prob=1.0, noise_prob=1.0)
    t = build_train_transforms(cfg, 64)
    sample = _sample(small_ds)
    seed_transforms(t, 123)
    a = [t(dict(sample)) for _ in range(3)]
    seed_transforms(t, 123)
    b = [t(dict(sample)) for _ in range(3)]
    for x, y in zip(a, b):
        assert torch.equal(torch.as_tensor(x["image"]), torch.as_tensor(y["image"]))
        assert x["text"] == y["text"]
    assert not torch.equal(torch.as_tensor(a[0]["image"]), torch.as_tensor(a[1]["image"]))
    assert len(build_train_transforms(AugmentConfig(affine_prob=0, contrast_prob=0), 64).transforms) == 0


# ----------------------------------------------------------------------------- laterality convention
def _one_sided(cases, side):
    other = "right" if side == "left" else "left"
    return [c for c in cases if c.text.startswith("unilateral") and f"{side} lung" in c.text
            and f"{other} lung" not in c.text]


@pytest.mark.parametrize("side", ["left", "right"])
def test_qata_left_means_image_left(qata_val, side):
    """The convention the QaTa reader declares (laterality 'image'): 'left lung' = image's left half."""
    cases = _one_sided(qata_val, side)[:6]
    assert len(cases) == 6
    fractions = []
    for c in cases:
        m = read_mask(c.mask_path)
        fractions.append(m[:, : m.shape[1] // 2].sum() / m.sum())
    on_named_side = [f > 0.9 if side == "left" else f < 0.1 for f in fractions]
    assert sum(on_named_side) >= 5, (side, fractions)
