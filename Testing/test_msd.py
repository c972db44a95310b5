"""MSD / nnU-Net volume datasets: the reader and its prompt tables, slice sampling for training,
3D metrics, ``textguidedseg evaluate --dataset msd`` (NIfTI label maps re-scored independently),
the paper datasets' configs and a training run, all on tiny synthetic datasets in the MSD layout."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from TextGuidedSegLib.data import read_dataset
from TextGuidedSegLib.data.msd import (PROMPT_TABLES, VolumeSliceDataset, read_case, read_msd_dataset)
from TextGuidedSegLib.evaluation import multi_label_map, spacing_kji, summarise_volume_scores
from TextGuidedSegLib.metrics import dice_iou, surface_distances
from TextGuidedSegLib.models.config import IntensityConfig
from TextGuidedSegLib.orientation import slice_layout
from TextGuidedSegLib.preprocessing import normalize_intensity, resize_images

REPO = Path(__file__).resolve().parents[1]
HIPPO_LABELS = {"0": "background", "1": "Anterior", "2": "Posterior"}
SHAPE = (10, 14, 12)  # (k, j, i)


def _blob_labels(shape, rng) -> np.ndarray:
    """Label 1 in the anterior (low j in LPS-stored arrays here) part, label 2 behind it; the top and
    bottom slices stay empty (slices without the structure)."""
    k, j, i = shape
    lab = np.zeros(shape, np.uint8)
    k0, i0 = 2 + rng.integers(0, 2), 3 + rng.integers(0, 2)
    lab[k0:k - 3, 3:7, i0:i0 + 5] = 1
    lab[k0:k - 3, 7:11, i0:i0 + 5] = 2
    return lab


def make_msd(root: Path, *, name: str = "Hippocampus", labels: dict | None = None, n: int = 5,
             split: dict | None = None, spacing=(1.0, 1.5, 2.0), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1),
             seed: int = 0, nnunet_v2: bool = False) -> Path:
    """A tiny dataset in the MSD layout: images = label-dependent intensities + noise."""
    rng = np.random.default_rng(seed)
    labels = labels or HIPPO_LABELS
    values = sorted(int(v) for v in labels if int(v) > 0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for c in range(n):
        cid = f"case_{c:03d}"
        lab = _blob_labels(SHAPE, rng)
        if values != [1, 2]:  # other datasets: spread the blobs over their label values
            lab = np.where(lab > 0, np.array(values)[(lab.astype(int) + c) % len(values)], 0).astype(np.uint8)
        img = (lab * 40.0 + rng.normal(100, 5, SHAPE)).astype(np.float32)
        for arr, folder, fname in ((img, "imagesTr", f"{cid}_0000.nii.gz" if nnunet_v2 else f"{cid}.nii.gz"),
                                   (lab, "labelsTr", f"{cid}.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing(spacing)
            im.SetOrigin((10.0, -5.0, 3.0))
            im.SetDirection(direction)
            sitk.WriteImage(im, str(root / folder / fname))
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
    meta = {"name": name, "modality": {"0": "MRI"}, "labels": labels, "numTraining": n, "training": training}
    if nnunet_v2:
        meta = {"name": name, "channel_names": {"0": "CT"}, "labels": {v: int(k) for k, v in labels.items()},
                "numTraining": n, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    if split is None:
        split = {"train": [f"case_{c:03d}" for c in range(n - 2)], "val": [f"case_{c:03d}" for c in range(n - 2, n)]}
    if split:
        (root / "split.json").write_text(json.dumps(split), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def hippo(tmp_path_factory) -> Path:
    return make_msd(tmp_path_factory.mktemp("msd") / "hippo")


# ----------------------------------------------------------------------------- reader
def test_reader_labels_modality_split_and_prompts(hippo):
    ds = read_msd_dataset(hippo, "train")
    assert ds.labels == {0: "background", 1: "Anterior", 2: "Posterior"} and ds.modality == "MRI"
    assert [c.case_id for c in ds.cases] == ["case_000", "case_001", "case_002"]
    assert [c.case_id for c in read_msd_dataset(hippo, "val").cases] == ["case_003", "case_004"]
    assert len(read_msd_dataset(hippo, "all").cases) == 5
    assert all(c.image_path.is_file() and c.label_path.is_file() for c in ds.cases)
    assert [c.case_id for c in read_dataset("msd", hippo, "val")] == ["case_003", "case_004"]
    table = ds.prompts
    assert [t.prompt for t in table.per_label()] == ["anterior hippocampus", "posterior hippocampus"]
    assert table.find("Hippocampal  Head").labels == (1,)  # a synonym, case and spaces ignored
    assert table.find("body and tail of the hippocampus").labels == (2,)
    assert table.find("hippocampus").labels == (1, 2)  # the union
    assert table.find("left kidney") is None
    with pytest.raises(ValueError, match="split 'test' not found"):
        read_msd_dataset(hippo, "test")


def test_reader_without_split_file_nnunet_v2_and_default_prompts(tmp_path):
    root = make_msd(tmp_path / "v2", name="Dataset123_Thing", labels={"0": "background", "1": "left_thing",
                                                                         "2": "other"}, split={}, nnunet_v2=True)
    ds = read_msd_dataset(root, "all")
    assert ds.labels == {0: "background", 1: "left_thing", 2: "other"} and ds.modality == "CT"
    assert len(ds.cases) == 5 and ds.cases[0].image_path.name == "case_000_0000.nii.gz"
    assert [t.prompt for t in ds.prompts.targets] == ["left thing", "other"]  # no table: one per label
    with pytest.raises(KeyError, match="unknown prompt table"):
        read_msd_dataset(root, "all", prompt_table="nope")
    with pytest.raises(ValueError, match="does not name"):  # the hippocampus table needs labels 1 and 2 only...
        read_msd_dataset(make_msd(tmp_path / "one", labels={"0": "background", "1": "x"}), "all",
                         prompt_table="hippocampus")
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        read_msd_dataset(tmp_path, "train")


def test_read_case_geometry(hippo):
    case = read_msd_dataset(hippo, "train").cases[0]
    volume, ijk_to_ras, labels = read_case(case)
    assert volume.shape == labels.shape == SHAPE and labels.dtype == np.int16
    assert spacing_kji(ijk_to_ras) == pytest.approx((2.0, 1.5, 1.0))
    # LPS direction diag(-1, -1, 1) is RAS identity
    assert np.allclose(ijk_to_ras[:3, :3], np.diag([1.0, 1.5, 2.0]))


# ----------------------------------------------------------------------------- slice sampling
def _slices(root, split="train", **kw):
    ds = read_msd_dataset(root, split)
    return ds, VolumeSliceDataset(ds.cases, ds.prompts, 32, IntensityConfig(mode="percentile"), **kw)


def test_slices_keep_absent_structures_and_cycle_synonyms(hippo):
    ds, sl = _slices(hippo)
    n_slices = 3 * SHAPE[0]  # axial = along k here
    assert len(sl) == n_slices * 3  # 3 targets per slice
    empty = sl.masks.flatten(1).amax(1) == 0
    assert 0 < int(empty.sum()) < len(sl)  # absent slices are there, target empty
    texts = {it.text for it in sl.cases}
    assert {"anterior hippocampus", "hippocampal head", "hippocampus"} <= texts
    item = sl[0]
    assert item["image"].shape == (1, 32, 32) and item["mask"].shape == (1, 32, 32)
    _, none_empty = _slices(hippo, empty_fraction=0.0)
    assert int((none_empty.masks.flatten(1).amax(1) == 0).sum()) == 0 and 0 < len(none_empty) < len(sl)
    _, canonical = _slices(hippo, split="val", canonical_only=True, keep_native_masks=True)
    assert {it.text for it in canonical.cases} == {"anterior hippocampus", "posterior hippocampus", "hippocampus"}
    assert canonical.native_masks[0].shape == (SHAPE[1], SHAPE[2])
    _, three = _slices(hippo, planes=("axial", "coronal", "sagittal"))
    assert len(three) == 3 * 3 * (SHAPE[0] + SHAPE[1] + SHAPE[2]) and {it.plane for it in three.cases} == \
        {"axial", "coronal", "sagittal"}


def test_slices_follow_the_engine_layout_whatever_the_storage_order(hippo, tmp_path):
    """The same anatomy stored with flipped axes gives the same training slices, and those are the
    engine's (orientation.slice_layout + per-volume normalisation + resize)."""
    flipped = tmp_path / "flipped"
    (flipped / "imagesTr").mkdir(parents=True)
    (flipped / "labelsTr").mkdir()
    for folder in ("imagesTr", "labelsTr"):
        for f in sorted((hippo / folder).glob("case_00[0-2].nii.gz")):
            im = sitk.ReadImage(str(f))
            sitk.WriteImage(sitk.Flip(im, [True, True, False]), str(flipped / folder / f.name))  # keeps physical space
    for f in ("dataset.json", "split.json"):
        (flipped / f).write_text((hippo / f).read_text(encoding="utf-8"), encoding="utf-8")
    ds, a = _slices(hippo)
    _, b = _slices(flipped)
    assert torch.equal(a.masks, b.masks)
    assert torch.allclose(a.images[list(range(len(a)))].float(), b.images[list(range(len(b)))].float(), atol=1e-3)
    volume, ijk_to_ras, _ = read_case(ds.cases[0])
    layout = slice_layout(ijk_to_ras, volume.shape, "axial")
    engine_view = resize_images(torch.from_numpy(np.ascontiguousarray(
        layout.to_slices(normalize_intensity(volume, IntensityConfig(mode="percentile")))))[:, None], (32, 32))
    assert torch.allclose(a.images[[0, 3, 6]].float(), engine_view[:3].half().float())


# ----------------------------------------------------------------------------- 3D metrics
def test_3d_metrics_on_known_shapes():
    a = np.zeros((8, 8, 8), bool)
    b = np.zeros((8, 8, 8), bool)
    a[2:6, 2:6, 2:6] = True
    b[3:7, 2:6, 2:6] = True  # shifted by one voxel along k: 48 of 64 overlap
    assert dice_iou(a, b)[0] == pytest.approx(0.75)
    p = np.zeros((8, 8, 8), bool)
    g = np.zeros((8, 8, 8), bool)
    p[2, 2, 2] = True
    g[5, 2, 2] = True  # 3 voxels apart along k, 2 mm each
    hd95, asd = surface_distances(p, g, (2.0, 1.5, 1.0))
    assert hd95 == pytest.approx(6.0) and asd == pytest.approx(6.0)
    g2 = np.zeros_like(g)
    g2[2, 6, 2] = True  # 4 voxels along j, 1.5 mm each
    assert surface_distances(p, g2, (2.0, 1.5, 1.0))[0] == pytest.approx(6.0)
    assert np.isnan(surface_distances(p, np.zeros_like(p), (1, 1, 1))[0])


def test_multi_label_map_takes_the_most_probable_label_above_threshold():
    p1 = np.array([0.9, 0.6, 0.2, 0.4])
    p2 = np.array([0.1, 0.7, 0.3, 0.45])
    assert multi_label_map([p1, p2], [1, 2], 0.5).tolist() == [1, 2, 0, 0]
    assert multi_label_map([p1, p2], [1, 2], 0.4).tolist() == [1, 2, 0, 2]
    with pytest.raises(ValueError):
        multi_label_map([p1], [1, 2])


def test_volume_summary_mean_and_sd():
    rows = [{"x_dice": d, "x_hd95": h, "x_asd": h / 2, "x_intersection": 1, "x_pred_voxels": 2, "x_true_voxels": 2}
            for d, h in ((0.8, 2.0), (0.6, float("nan")), (1.0, 4.0))]
    s = summarise_volume_scores(rows, ["x"])["x"]
    assert s["dice_mean"] == pytest.approx(0.8) and s["dice_sd"] == pytest.approx(0.2)
    assert s["hd95_mean"] == pytest.approx(3.0) and s["hd95_sd"] == pytest.approx(np.std([2, 4], ddof=1))
    assert s["distance_cases"] == 2 and s["cases"] == 3 and s["dice_global"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- evaluate CLI
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from conftest import make_tiny_ssa_config

    from TextGuidedSegLib.checkpoint import save_pretrained
    from TextGuidedSegLib.models import build_model

    torch.manual_seed(0)
    cfg = make_tiny_ssa_config(laterality="patient")
    out = tmp_path_factory.mktemp("tiny_model") / "m"
    save_pretrained(build_model(cfg), out, metadata={"name": "tiny-msd"})
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion, generate_binary_structure

    return mask & ~binary_erosion(mask, generate_binary_structure(3, 1))


def _independent_scores(pred: np.ndarray, gt: np.ndarray, spacing) -> tuple[float, float, float]:
    """Dice, HD95, ASD from numpy + scipy (no MONAI): surface voxels, Euclidean distance maps in mm."""
    from scipy.ndimage import distance_transform_edt

    dice = 1.0 if not pred.any() and not gt.any() else 2 * (pred & gt).sum() / (pred.sum() + gt.sum())
    if not pred.any() or not gt.any():
        return float(dice), float("nan"), float("nan")
    sp, sg = _surface(pred), _surface(gt)
    d_to_g = distance_transform_edt(~sg, sampling=spacing)[sp]
    d_to_p = distance_transform_edt(~sp, sampling=spacing)[sg]
    hd95 = max(np.percentile(d_to_g, 95), np.percentile(d_to_p, 95))
    asd = (d_to_g.sum() + d_to_p.sum()) / (d_to_g.size + d_to_p.size)
    return float(dice), float(hd95), float(asd)


def test_evaluate_cli_writes_label_maps_on_each_grid_and_they_rescore_the_same(cli, hippo, tiny_model_dir, tmp_path):
    preds, js, per_case = tmp_path / "preds", tmp_path / "s.json", tmp_path / "cases.csv"
    rc, out, err = cli("evaluate", "--dataset", "msd", "--data-root", hippo, "--split", "val", "--model",
                       tiny_model_dir, "--save-predictions", preds, "--json", js, "--per-case-csv", per_case,
                       "--threshold", "0.3", "-q")
    assert rc == 0, err
    assert "label 1 'anterior'" in out and "label 2 'posterior'" in out and "union 1+2 'hippocampus'" in out
    summary = json.loads(js.read_text(encoding="utf-8"))
    assert summary["cases"] == 2 and set(summary["scores"]) == {"anterior", "posterior", "hippocampus"}
    assert per_case.is_file()
    by_case = {r["case_id"]: r for r in summary["per_case"]}
    dices = {1: [], 2: []}
    for cid in ("case_003", "case_004"):
        pred_im = sitk.ReadImage(str(preds / f"{cid}.nii.gz"))
        image = sitk.ReadImage(str(hippo / "imagesTr" / f"{cid}.nii.gz"))
        assert pred_im.GetSize() == image.GetSize()
        assert np.allclose(pred_im.GetSpacing(), image.GetSpacing())
        assert np.allclose(pred_im.GetOrigin(), image.GetOrigin())
        assert np.allclose(pred_im.GetDirection(), image.GetDirection())
        pred = sitk.GetArrayFromImage(pred_im)
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(hippo / "labelsTr" / f"{cid}.nii.gz")))
        assert set(np.unique(pred)) <= {0, 1, 2}
        spacing = image.GetSpacing()[::-1]  # (k, j, i)
        for value, name in ((1, "anterior"), (2, "posterior")):
            dice, hd95, asd = _independent_scores(pred == value, gt == value, spacing)
            dices[value].append(dice)
            assert by_case[cid][f"{name}_dice"] == pytest.approx(dice, abs=1e-9)
            assert by_case[cid][f"{name}_hd95"] == pytest.approx(hd95, abs=1e-4, nan_ok=True)
            assert by_case[cid][f"{name}_asd"] == pytest.approx(asd, abs=1e-4, nan_ok=True)
    assert summary["scores"]["anterior"]["distance_cases"] + summary["scores"]["posterior"]["distance_cases"] > 0
    for value, name in ((1, "anterior"), (2, "posterior")):
        assert summary["scores"][name]["dice_mean"] == pytest.approx(np.mean(dices[value]))
        assert summary["scores"][name]["dice_sd"] == pytest.approx(np.std(dices[value], ddof=1))


def test_evaluate_cli_msd_errors(cli, hippo, tiny_model_dir, tmp_path):
    rc, _, err = cli("evaluate", "--dataset", "msd", "--data-root", tmp_path, "--split", "val", "--model",
                     tiny_model_dir)
    assert rc == 2 and "dataset.json" in err
    rc, _, err = cli("evaluate", "--dataset", "msd", "--data-root", hippo, "--split", "nope", "--model",
                     tiny_model_dir)
    assert rc == 2 and "split 'nope'" in err


def test_predict_writes_both_labels_as_named_segments_on_the_input_grid(cli, hippo, tiny_model_dir, tmp_path):
    from TextGuidedSegLib.io import read_segmentation, read_volume

    src = hippo / "imagesTr" / "case_003.nii.gz"
    rc, out, err = cli("predict", src, "--model", tiny_model_dir, "--prompt", "anterior hippocampus",
                       "--prompt", "posterior hippocampus", "--output", tmp_path, "--threshold", "0.3", "-q")
    assert rc == 0, err
    segments, ijk_to_ras = read_segmentation(tmp_path / "case_003.seg.nrrd")
    assert [s.name for s in segments] == ["anterior hippocampus", "posterior hippocampus"]
    vol = read_volume(src)
    assert np.allclose(ijk_to_ras, vol.ijk_to_ras)
    assert all(s.mask.shape == vol.array.shape for s in segments)


# ----------------------------------------------------------------------------- configs and training
PAPER_CONFIGS = {"tgcnet_msd_spleen.yaml": {"0": "background", "1": "spleen"},
                 "svp_cvae_msd_liver.yaml": {"0": "background", "1": "liver", "2": "cancer"},
                 "tgcnet_word.yaml": {"0": "background", **{str(i): f"organ{i}" for i in range(1, 17)}},
                 "tgcnet_abdomenct1k.yaml": {"0": "background", "1": "liver", "2": "kidney", "3": "spleen",
                                             "4": "pancreas"}}


def _load_train_module():
    spec = importlib.util.spec_from_file_location("textguidedseg_train_script_msd", REPO / "Training" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config", sorted(PAPER_CONFIGS))
def test_paper_dataset_configs_read_a_synthetic_dataset_in_their_layout(config, tmp_path):
    cfg = yaml.safe_load((REPO / "Training" / "configs" / config).read_text(encoding="utf-8"))
    data = cfg["data"]
    assert data["kind"] == "msd" and cfg["model"]["laterality"] == "patient"
    root = make_msd(tmp_path / "d", name="Anything", labels=PAPER_CONFIGS[config], n=3)
    ds = read_msd_dataset(root, data["train_split"], **data["options"])
    assert ds.prompts is PROMPT_TABLES[data["options"]["prompt_table"]]
    assert len(ds.prompts.per_label()) == len(PAPER_CONFIGS[config]) - 1  # one prompt per label
    sl = VolumeSliceDataset(ds.cases, ds.prompts, 32, IntensityConfig(**cfg["model"]["intensity"]),
                            planes=data["planes"], empty_fraction=data["empty_fraction"])
    assert len(sl) > 0 and int(sl.masks.sum()) > 0


def test_training_on_volumes_exports_3d_scores(tmp_path):
    root = make_msd(tmp_path / "hippo", n=4)
    cfg = {"name": "tiny_msd", "output_dir": str(tmp_path / "out"),
           "model": {"model_type": "ssa", "image_size": 32, "in_channels": 1, "laterality": "patient",
                     "text": {"name_or_path": "packaged:all-MiniLM-L6-v2", "max_length": 16, "pooling": "mean"},
                     "encoder_channels": [4, 4, 8, 8, 8], "decoder_channels": [8, 8, 4, 4], "dim": 8,
                     "ot_iterations": 5},
           "data": {"kind": "msd", "root": str(root), "planes": ["axial"], "empty_fraction": 0.5},
           "augment": {"affine_prob": 0.3, "flip_prob": 0.5, "contrast_prob": 0.3},
           "train": {"epochs": 2, "batch_size": 16, "lr": 2e-3, "warmup_epochs": 0, "amp": False}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    result = _load_train_module().main(["--config", str(path)])
    assert result["epochs"] == 2
    meta = json.loads((Path(result["model_dir"]) / "config.json").read_text(encoding="utf-8"))["metadata"]
    val = meta["validation"]
    assert val["dataset"] == "msd" and val["volumes"] == 2 and val["axis"] == "axial"
    assert set(val["scores"]) == {"anterior", "posterior", "hippocampus"}
    card = (Path(result["model_dir"]) / "README.md").read_text(encoding="utf-8")
    assert "3D validation" in card and "anterior hippocampus" in card
