"""The ``textguidedseg`` command line, run in-process: predict, evaluate, models."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from conftest import make_tiny_tmc_config
from test_engine import save_tiny_model
from TextGuidedSegLib import io
from TextGuidedSegLib.checkpoint import WEIGHTS_NAME, save_pretrained, sha256_of
from TextGuidedSegLib.models import build_model
from TextGuidedSegLib.engine import segment_volume
from TextGuidedSegLib.model_store import load_model
from TextGuidedSegLib.terminology import short_name, style_for

QATA_SAMPLE = io.sample_path("qata/cxr_s11234-e19977-r1.png")
QATA_STEM = "cxr_s11234-e19977-r1"
PROMPTS = ["bilateral pulmonary infection, two infected areas, lower left lung", "left lung"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("cli") / "tiny_cli")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty per-user model cache."""
    monkeypatch.setenv("TEXTGUIDEDSEG_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _predict(cli, model_dir, out, *inputs, prompts=("left lung",), extra=()):
    args = ["predict", *inputs, "--output", out, "--model", model_dir, "--device", "cpu", "--quiet", *extra]
    for p in prompts:
        args += ["--prompt", p]
    return cli(*args)


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _assert_user_error(rc, err, out_dir, *words):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line message, got:\n{err}"
    assert lines[0].startswith("textguidedseg: error: ")
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    assert "Traceback" not in err
    assert [f for f in _files(out_dir)] == [], "no output may be written for a failed input"


# ------------------------------------------------------------------ predict


def test_predict_png_two_prompts(cli, model_dir, tmp_path):
    out = tmp_path / "out"
    rc, stdout, err = _predict(cli, model_dir, out, QATA_SAMPLE, prompts=PROMPTS)
    assert rc == 0, err
    assert _files(out) == [f"{QATA_STEM}.seg.nrrd"]
    assert f"{QATA_STEM}.seg.nrrd" in stdout
    source = io.read_volume(QATA_SAMPLE)
    segments, ijk_to_ras = io.read_segmentation(out / f"{QATA_STEM}.seg.nrrd")
    np.testing.assert_allclose(ijk_to_ras, source.ijk_to_ras, atol=1e-9)
    assert [s.name for s in segments] == ["bilateral pulmonary infection", "left lung"]
    assert [s.name for s in segments] == [short_name(p) for p in PROMPTS]
    assert [s.prompt for s in segments] == PROMPTS
    assert "SCT^23583003^Inflammation" in segments[0].terminology
    np.testing.assert_allclose(segments[0].color, style_for(PROMPTS[0]).color)
    # what the file holds is what the engine computes for the same image, voxel for voxel
    expected = segment_volume(source.array, source.ijk_to_ras, PROMPTS, load_model(model_dir, device="cpu"),
                              device="cpu")
    for seg, r in zip(segments, expected):
        assert seg.mask.shape == source.array.shape == (1, 224, 224)
        np.testing.assert_array_equal(seg.mask, r.labels.astype(bool))
        assert 0 < seg.mask.sum() < seg.mask.size


def test_predict_probability_volumes(cli, model_dir, tmp_path):
    out = tmp_path / "out"
    rc, _, err = _predict(cli, model_dir, out, QATA_SAMPLE, prompts=PROMPTS, extra=["--probability"])
    assert rc == 0, err
    assert _files(out) == sorted([f"{QATA_STEM}.seg.nrrd", f"{QATA_STEM}_bilateral_pulmonary_infection_probability.nrrd",
                                  f"{QATA_STEM}_left_lung_probability.nrrd"])
    segments, _ = io.read_segmentation(out / f"{QATA_STEM}.seg.nrrd")
    for seg, safe in zip(segments, ["bilateral_pulmonary_infection", "left_lung"]):
        prob = io.read_volume(out / f"{QATA_STEM}_{safe}_probability.nrrd")
        assert prob.array.dtype == np.float32 and prob.array.shape == (1, 224, 224)
        assert 0.0 <= prob.array.min() and prob.array.max() <= 1.0
        np.testing.assert_array_equal(prob.array >= 0.5, seg.mask)
        np.testing.assert_allclose(prob.ijk_to_ras, io.read_volume(QATA_SAMPLE).ijk_to_ras, atol=1e-9)


def test_predict_labelmap_nifti(cli, model_dir, tmp_path):
    out = tmp_path / "out"
    brain = io.sample_path("brain1_image.nrrd")
    rc, _, err = _predict(cli, model_dir, out, brain, prompts=PROMPTS, extra=["--labelmap"])
    assert rc == 0, err
    assert _files(out) == ["brain1_image.seg.nrrd", "brain1_image_labels.nii.gz"]
    labels = io.read_volume(out / "brain1_image_labels.nii.gz")
    segments, _ = io.read_segmentation(out / "brain1_image.seg.nrrd")
    # label i = i-th prompt; the later prompt wins where both are foreground
    expected = np.zeros(labels.array.shape, dtype=np.uint8)
    for value, seg in enumerate(segments, 1):
        expected[seg.mask] = value
    np.testing.assert_array_equal(labels.array, expected)
    assert expected.any()
    np.testing.assert_allclose(labels.ijk_to_ras, io.read_volume(brain).ijk_to_ras, atol=1e-5)


@pytest.fixture
def image_dir(tmp_path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    for name in ("cxr_s11234-e19977-r1", "cxr_s11242-e20020-r1", "cxr_s11247-e20029-r1"):
        shutil.copy(io.sample_path(f"qata/{name}.png"), d / f"{name}.png")
    (d / "notes.txt").write_text(encoding="utf-8", data="not an image\n")
    return d


def test_predict_directory(cli, model_dir, image_dir, tmp_path):
    out = tmp_path / "out"
    rc, stdout, err = _predict(cli, model_dir, out, image_dir)
    assert rc == 0, err
    expected = sorted(f"{p.stem}.seg.nrrd" for p in image_dir.glob("*.png"))
    assert len(expected) == 3 and _files(out) == expected
    assert len(stdout.strip().splitlines()) == 3


def test_predict_shard(cli, model_dir, image_dir, tmp_path):
    out = tmp_path / "out"
    rc, _, err = _predict(cli, model_dir, out, image_dir, extra=["--shard", "1/2"])
    assert rc == 0, err
    assert _files(out) == ["cxr_s11242-e20020-r1.seg.nrrd"]
    rc, _, err = _predict(cli, model_dir, out, image_dir, extra=["--shard", "0/2"])
    assert rc == 0, err
    assert _files(out) == ["cxr_s11234-e19977-r1.seg.nrrd", "cxr_s11242-e20020-r1.seg.nrrd",
                           "cxr_s11247-e20029-r1.seg.nrrd"]


def test_predict_brain_volume_keeps_geometry(cli, model_dir, tmp_path):
    out = tmp_path / "out"
    src = io.sample_path("brain1_image.nrrd")
    rc, _, err = _predict(cli, model_dir, out, src, prompts=["brain tumour"])
    assert rc == 0, err
    assert _files(out) == ["brain1_image.seg.nrrd"]
    segments, ijk_to_ras = io.read_segmentation(out / "brain1_image.seg.nrrd")
    vol = io.read_volume(src)
    np.testing.assert_allclose(ijk_to_ras, vol.ijk_to_ras, atol=1e-6)
    assert segments[0].mask.shape == vol.array.shape == (13, 256, 256)
    assert segments[0].name == "brain tumour" and segments[0].prompt == "brain tumour"


def test_predict_several_brain_prompts_named_coloured_coded(cli, model_dir, tmp_path):
    """Several --prompt, several segments (issue 20): names, Slicer colours and terminology with the
    side modifier come from terminology.style_for. The tiny model is random (plumbing only): the
    masks are not checked here, only that each prompt got its own named, coded segment."""
    prompts = ["left hippocampus", "hippocampus, right side", "both thalami", "3rd ventricle", "left ventral DC"]
    out = tmp_path / "out"
    rc, stdout, err = _predict(cli, model_dir, out, io.sample_path("brain1_image.nrrd"), prompts=prompts)
    assert rc == 0, err
    segments, _ = io.read_segmentation(out / "brain1_image.seg.nrrd")
    assert [s.name for s in segments] == ["left hippocampus", "right hippocampus", "both thalami", "3rd ventricle",
                                          "left ventral DC"]
    assert [s.prompt for s in segments] == prompts
    for index, (seg, prompt) in enumerate(zip(segments, prompts)):
        style = style_for(prompt, index)
        assert seg.terminology == style.terminology
        np.testing.assert_allclose(seg.color, style.color, atol=1e-6)
    assert "~SCT^5366008^Hippocampus~SCT^7771000^Left~" in segments[0].terminology
    assert "~SCT^5366008^Hippocampus~SCT^24028007^Right~" in segments[1].terminology
    assert "~SCT^42695009^Thalamus~SCT^51440002^Right and left~" in segments[2].terminology
    np.testing.assert_allclose(segments[2].color, np.array([166, 113, 137]) / 255, atol=1e-6)
    assert "~SCT^49841001^Third ventricle~^^~" in segments[3].terminology
    assert segments[4].terminology is None  # Slicer has no entry for the ventral diencephalon


# ------------------------------------------------------------------ predict: bad input


def _write_4d(path):
    a = sitk.GetImageFromArray(np.zeros((3, 8, 8), np.float32))
    sitk.WriteImage(sitk.JoinSeries([a, a]), str(path))


def _write_vector(path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8, 3), np.uint8), isVector=True), str(path))


def _write_nan(path):
    arr = np.ones((3, 8, 8), np.float32)
    arr[1, 2, 3] = np.nan
    io.write_volume(path, arr, np.diag([-1.0, -1.0, 1.0, 1.0]))


def _write_random_bytes(path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("case, writer, prompts, words", [
    ("missing", None, ["left lung"], ["not found"]),
    ("corrupt", _write_random_bytes, ["left lung"], ["could not read"]),
    ("empty prompt", None, [""], ["empty prompt"]),
    ("whitespace prompt", None, ["  \t "], ["empty prompt"]),
    ("4d", _write_4d, ["left lung"], ["4D"]),
    ("vector", _write_vector, ["left lung"], ["3 components"]),
    ("nan", _write_nan, ["left lung"], ["NaN"]),
])
def test_predict_bad_input(cli, model_dir, tmp_path, case, writer, prompts, words):
    out = tmp_path / "out"
    src = tmp_path / "input.nrrd"
    if writer is not None:
        writer(src)
    elif case != "missing":
        src = QATA_SAMPLE
    rc, stdout, err = _predict(cli, model_dir, out, src, prompts=prompts)
    _assert_user_error(rc, err, out, *words)
    if case == "missing":
        assert str(src) in err
    assert stdout == ""


def test_predict_unknown_model_lists_installed(cli, model_dir, home, tmp_path):
    rc, _, err = cli("models", "import", model_dir, "--name", "installed-one")
    assert rc == 0, err
    out = tmp_path / "out"
    rc, _, err = _predict(cli, "no-such-model", out, QATA_SAMPLE)
    _assert_user_error(rc, err, out, "no-such-model", "not found", "installed-one")


@pytest.mark.parametrize("shard", ["3/2", "2/2", "a/b", "1/0"])
def test_predict_bad_shard(cli, model_dir, tmp_path, shard):
    out = tmp_path / "out"
    rc, _, err = _predict(cli, model_dir, out, QATA_SAMPLE, extra=["--shard", shard])
    _assert_user_error(rc, err, out, "--shard")


# ------------------------------------------------------------------ predict: unusual but valid input


def test_predict_very_long_prompt(cli, model_dir, tmp_path, caplog):
    out = tmp_path / "out"
    prompt = ("right upper lobe consolidation " * 400)[:10_000]
    with caplog.at_level(logging.WARNING):
        rc, _, err = _predict(cli, model_dir, out, QATA_SAMPLE, prompts=[prompt])
    assert rc == 0, err
    assert any("truncated" in r.getMessage() for r in caplog.records)
    segments, _ = io.read_segmentation(out / f"{QATA_STEM}.seg.nrrd")
    assert len(segments[0].prompt) == 2000 and prompt.startswith(segments[0].prompt)
    assert len(segments[0].name) <= 41


def test_predict_non_ascii_prompt(cli, model_dir, tmp_path):
    out = tmp_path / "out"
    rc, _, err = _predict(cli, model_dir, out, QATA_SAMPLE, prompts=["infección pulmonar izquierda 左肺"])
    assert rc == 0, err
    segments, _ = io.read_segmentation(out / f"{QATA_STEM}.seg.nrrd")
    assert segments[0].prompt.startswith("infeccion pulmonar izquierda")  # headers are ASCII
    assert segments[0].mask.shape == (1, 224, 224)


def _rot_s(degrees):
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])


@pytest.mark.parametrize("name, dtype, shape, direction", [
    ("int16", np.int16, (4, 40, 48), np.diag([-1.0, -1.0, 1.0])),
    ("uint8", np.uint8, (4, 40, 48), np.diag([-1.0, -1.0, 1.0])),
    ("float32", np.float32, (4, 40, 48), np.diag([-1.0, -1.0, 1.0])),
    ("float64", np.float64, (4, 40, 48), np.diag([-1.0, -1.0, 1.0])),
    ("one-slice", np.int16, (1, 40, 48), np.diag([-1.0, -1.0, 1.0])),
    ("oblique", np.float32, (5, 40, 48), _rot_s(20.0) @ np.diag([-1.0, -1.0, 1.0])),
])
def test_predict_volume_kinds(cli, model_dir, tmp_path, name, dtype, shape, direction):
    rng = np.random.default_rng(0)
    arr = (rng.random(shape) * 200).astype(dtype)
    m = np.eye(4)
    m[:3, :3] = direction * [0.7, 0.8, 2.5]
    m[:3, 3] = (-20.0, 13.5, 7.25)
    src = io.write_volume(tmp_path / f"{name}.nrrd", arr, m)
    out = tmp_path / "out"
    rc, _, err = _predict(cli, model_dir, out, src, prompts=["left lung"])
    assert rc == 0, err
    segments, ijk_to_ras = io.read_segmentation(out / f"{name}.seg.nrrd")
    np.testing.assert_allclose(ijk_to_ras, m, atol=1e-6)
    np.testing.assert_allclose(ijk_to_ras, io.read_volume(src).ijk_to_ras, atol=1e-6)
    assert segments[0].mask.shape == shape


# ------------------------------------------------------------------ evaluate


def _dice(pred, truth):
    inter, ps, gs = int(np.logical_and(pred, truth).sum()), int(pred.sum()), int(truth.sum())
    return (1.0 if ps + gs == 0 else 2 * inter / (ps + gs)), inter, ps, gs


def test_evaluate_qata_val_is_externally_checkable(cli, model_dir, shared_data, tmp_path):
    root = shared_data / "qata"
    preds, csv_path, json_path = tmp_path / "preds", tmp_path / "cases.csv", tmp_path / "summary.json"
    rc, stdout, err = cli("evaluate", "--model", model_dir, "--dataset", "qata", "--data-root", root, "--split", "val",
                          "--limit", 6, "--save-predictions", preds, "--per-case-csv", csv_path, "--json", json_path,
                          "--device", "cpu", "--quiet")
    assert rc == 0, err
    assert "Dice global" in stdout and "Dice per-image" in stdout
    ids = list(dict.fromkeys(json.loads((root / "split.json").read_text(encoding="utf-8"))["val"]))[:6]
    assert _files(preds) == sorted(f"{cid}.png" for cid in ids)

    summary = json.loads(json_path.read_text(encoding="utf-8"))
    assert summary["cases"] == 6 and summary["split"] == "val" and summary["dataset"] == "qata"
    per_image, inter, ps, gs, seen = [], 0, 0, 0, set()
    for cid in ids:
        png = np.asarray(Image.open(preds / f"{cid}.png"))
        assert png.shape == (224, 224) and png.dtype == np.uint8
        seen |= set(np.unique(png).tolist())
        truth = np.asarray(Image.open(root / "masks" / f"{cid}.png").convert("L")) > 127
        d, i, p, g = _dice(png > 127, truth)
        per_image.append(d)
        inter, ps, gs = inter + i, ps + p, gs + g
    assert seen == {0, 255}
    assert summary["dice_per_image"] == float(np.mean(per_image))
    assert summary["dice_global"] == 2 * inter / (ps + gs)
    assert f"{summary['dice_global']:.4f}" in stdout and f"{summary['dice_per_image']:.4f}" in stdout

    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == ids
    assert [float(r["dice"]) for r in rows] == per_image


# ------------------------------------------------------------------ models


def test_models_import_list_info(cli, model_dir, home, tmp_path):
    rc, out, err = cli("models", "list")
    assert rc == 0 and "tiny" not in out

    rc, out, err = cli("models", "import", model_dir)
    assert rc == 0, err
    assert (home / "models" / model_dir.name / WEIGHTS_NAME).is_file()

    archive = tmp_path / "zipped_tiny.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in model_dir.iterdir():
            zf.write(f, f"inner/{f.name}")
    rc, out, err = cli("models", "import", archive)
    assert rc == 0, err
    assert "zipped_tiny" in out

    rc, out, err = cli("models", "list")
    assert rc == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line and not line.startswith("(")}
    assert rows[model_dir.name][1:3] == ["tmc", "cache"]
    assert rows["zipped_tiny"][1:3] == ["tmc", "cache"]

    rc, out, err = cli("models", "info", "zipped_tiny")
    assert rc == 0, err
    summary, raw = out[:out.index("{")], out[out.index("{"):]
    assert summary.splitlines()[1] == ("  for: not stated (no domain.json): inputs are not checked before "
                                       "segmenting")
    info = json.loads(raw)
    assert info["model_type"] == "tmc" and info["source"] == "cache" and info["name"] == "zipped_tiny"
    assert info["sha256"] == sha256_of(model_dir / WEIGHTS_NAME)
    assert len(info["sha256"]) == 64

    # an imported model is usable by name
    out_dir = tmp_path / "out"
    rc, _, err = _predict(cli, "zipped_tiny", out_dir, QATA_SAMPLE)
    assert rc == 0, err
    assert _files(out_dir) == [f"{QATA_STEM}.seg.nrrd"]


def test_models_import_twice_needs_overwrite(cli, model_dir, home):
    assert cli("models", "import", model_dir, "--name", "twice")[0] == 0
    rc, out, err = cli("models", "import", model_dir, "--name", "twice")
    assert rc == 2
    assert "--overwrite" in err and "twice" in err
    assert cli("models", "import", model_dir, "--name", "twice", "--overwrite")[0] == 0
    assert sorted(p.name for p in (home / "models").iterdir()) == ["twice"]


def test_models_import_zip_with_a_fine_tuned_text_encoder(cli, home, tmp_path):
    """A model whose text encoder was fine-tuned carries text_encoder/{config.json, model.safetensors}:
    the archive still holds one model (the outer directory), and the import keeps the encoder."""
    from TextGuidedSegLib.text import TextEncoder, TextEncoderConfig

    encoder = TextEncoder(TextEncoderConfig(max_length=16, trainable=True))
    torch.manual_seed(0)
    model_dir = save_pretrained(build_model(make_tiny_tmc_config()), tmp_path / "tuned", text_encoder=encoder)
    archive = tmp_path / "tuned.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in model_dir.rglob("*"):
            if f.is_file():
                zf.write(f, f"tuned/{f.relative_to(model_dir)}")
    shutil.rmtree(model_dir)  # ~90 MB of encoder: keep the test's disk footprint small
    rc, out, err = cli("models", "import", archive)
    assert rc == 0, err
    assert (home / "models" / "tuned" / "text_encoder" / WEIGHTS_NAME).is_file()


def test_models_import_refuses_pickle_zip(cli, home, tmp_path):
    archive = tmp_path / "weights_only.zip"  # (the word must come from the message, not the file name)
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("weights/model.pt", b"\x80\x04\x95not really a pickle")
    rc, out, err = cli("models", "import", archive)
    assert rc == 2
    assert "pickle" in err.lower() and "model.pt" in err
    assert not (home / "models" / "weights_only").exists()
    assert [p.name for p in (home / "models").iterdir()] == []


def test_models_info_unknown(cli, home):
    rc, _, err = cli("models", "info", "nope")
    assert rc == 2 and "nope" in err
