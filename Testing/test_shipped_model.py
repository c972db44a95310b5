"""The shipped default model: manifest, checksum, and real segmentations of the shipped samples."""

from __future__ import annotations

import json

import numpy as np
import pytest

from TextGuidedSegLib import io
from TextGuidedSegLib.checkpoint import WEIGHTS_NAME, sha256_of
from TextGuidedSegLib.engine import segment_volume
from TextGuidedSegLib.metrics import dice_iou
from TextGuidedSegLib.model_store import DEFAULT_MODEL, MANIFEST, list_models, load_model, resolve_model

SAMPLES = ["cxr_s11234-e19977-r1", "cxr_s11242-e20020-r1", "cxr_s11247-e20029-r1"]


SHIPPED = {"tmc-qata-cpu": "tmc", "tmc-kvasir-cpu": "tmc", "ssa-qata-cpu": "ssa", "svp-cvae-qata-cpu": "svp_cvae",
           "prolearn-qata-cpu-1pct": "prolearn", "tgcnet-qata-cpu": "tgcnet", "hippocampus-mr-cpu": "ssa",
           "brain-mr-cpu": "ssa"}
VOLUME_MODELS = {"hippocampus-mr-cpu", "brain-mr-cpu"}  # trained on volumes: prompts name the patient's sides, 3D card
TEXT_FREE = {"prolearn-qata-cpu-1pct"}
QATA_MODELS = ["tmc-qata-cpu", "ssa-qata-cpu", "svp-cvae-qata-cpu", "tgcnet-qata-cpu"]


ENSEMBLES = {"qata-ensemble-cpu": QATA_MODELS}  # no weights of their own: members' probabilities averaged


def test_manifest_lists_every_shipped_model():
    models = json.loads(MANIFEST.read_text(encoding="utf-8"))["models"]
    assert {e["name"]: e["model_type"] for e in models if "members" not in e} == SHIPPED
    assert {e["name"]: [m["name"] for m in e["members"]] for e in models if "members" in e} == ENSEMBLES


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_model_matches_its_manifest_entry(name):
    entries = {e["name"]: e for e in json.loads(MANIFEST.read_text(encoding="utf-8"))["models"]}
    entry = resolve_model(name)
    weights = entry.path / WEIGHTS_NAME
    assert entry.source == "shipped"
    assert sha256_of(weights) == entries[name]["sha256"]
    assert weights.stat().st_size == entries[name]["size"] <= 25 * 2**20
    model = load_model(name)
    assert model.config.model_type == SHIPPED[name]
    assert model.config.laterality == ("patient" if name in VOLUME_MODELS else "image")
    card = (entry.path / "README.md").read_text(encoding="utf-8")
    if name == "brain-mr-cpu":  # trained on generated images: the card's figures are on a real T1 (Colin27)
        assert "Colin27" in card and "Mean Dice" in card and "correct side" in card and "Training command" in card
        assert entries[name]["size"] < 5 * 2**20
    elif name in VOLUME_MODELS:
        assert "HD95" in card and "ASD" in card and "Training command" in card and "nnU-Net" in card
        assert entries[name]["size"] < 5 * 2**20
    else:
        assert "Dice, global" in card and "Dice, per-image" in card and "Training command" in card
    # the manifest's text_free flag (what the Slicer panel reads before loading) is the model's own
    assert entries[name].get("text_free", False) == model.config.text_free == (name in TEXT_FREE)
    assert entry.text_free == (name in TEXT_FREE)


def test_manifest_lists_default_with_matching_sha256():
    """The default is the QaTa ensemble (issue 24): every member shipped, with its weights' SHA-256 and card."""
    entries = {e["name"]: e for e in json.loads(MANIFEST.read_text(encoding="utf-8"))["models"]}
    assert DEFAULT_MODEL == "qata-ensemble-cpu" and DEFAULT_MODEL in entries
    entry = resolve_model(DEFAULT_MODEL)
    assert entry.source == "ensemble" and [n for n, _ in entry.members] == ENSEMBLES[DEFAULT_MODEL]
    assert "Dice" in entries[DEFAULT_MODEL]["description"]
    for name, _ in entry.members:
        member = resolve_model(name)
        assert member.source == "shipped"
        weights = member.path / WEIGHTS_NAME
        assert sha256_of(weights) == entries[name]["sha256"]
        assert weights.stat().st_size <= 25 * 2**20
        assert (member.path / "README.md").read_text(encoding="utf-8").count("Dice") >= 2
    assert DEFAULT_MODEL in [e.name for e in list_models()]


@pytest.fixture(scope="module", params=QATA_MODELS)
def qata_model(request):
    return load_model(request.param)


def test_qata_models_segment_shipped_xrays(qata_model):
    """Reports in the dataset's own (image-side) words: the masks must match the ground truth."""
    dices = []
    for cid in SAMPLES:
        vol = io.read_volume(io.sample_path(f"qata/{cid}.png"))
        truth = io.read_volume(io.sample_path(f"qata/{cid}_mask.png")).array[0] > 127
        report = io.sample_path(f"qata/{cid}.txt").read_text(encoding="utf-8")
        [res] = segment_volume(vol.array, vol.ijk_to_ras, [report], qata_model, prompt_laterality="image")
        dices.append(dice_iou(res.labels[0] > 0, truth)[0])
    # measured 2026-11-25 on these three validation images; a broken model or pipeline scores ~0
    assert np.mean(dices) > 0.6, dices


def test_qata_models_follow_the_patients_side(qata_model):
    """cxr_s11242: infection in the lower lung on the image's left = the patient's right.
    'lower right lung' about the patient must put most predicted mass on the image's left half;
    'lower left lung' about the patient must move it to the image's right half."""
    cid = "cxr_s11242-e20020-r1"
    vol = io.read_volume(io.sample_path(f"qata/{cid}.png"))
    half = vol.array.shape[2] // 2
    base = "unilateral pulmonary infection, one infected area, lower {} lung."
    [right] = segment_volume(vol.array, vol.ijk_to_ras, [base.format("right")], qata_model)
    [left] = segment_volume(vol.array, vol.ijk_to_ras, [base.format("left")], qata_model)
    assert right.model_prompt == base.format("left")          # swapped to the model's image convention
    r = right.labels[0]
    l_ = left.labels[0]
    assert r.sum() > 100 and r[:, :half].sum() > 0.8 * r.sum()
    assert l_[:, half:].sum() > 0.8 * max(1, l_.sum())


# Labelled voxels and mean probability of each QaTa model on cxr_s11242 with its report, on the CPU.
# Measured identical (voxel for voxel; mean to 1e-8) on Python 3.11 / transformers 5.25 / torch 2.13 and on
# Python 3.9 / transformers 4.57 / torch 2.8 / numpy 1.26 (Slicer 5.6 / 5.8's Python and what pip gives it).
RECORDED_OUTPUT = {"tmc-qata-cpu": (2944, 0.0585222), "ssa-qata-cpu": (2721, 0.0541972),
                   "svp-cvae-qata-cpu": (3160, 0.0633299), "tgcnet-qata-cpu": (2972, 0.0593226)}


def test_qata_models_give_the_recorded_output_on_every_supported_python(qata_model):
    """Same weights, same output on transformers 4.x and 5.x: TGC-Net's CLIP towers (weight names,
    tokenizer inputs), the LoRA adapter saved by a newer peft, the packaged MiniLM."""
    vol = io.read_volume(io.sample_path("qata/cxr_s11242-e20020-r1.png"))
    prompt = "unilateral pulmonary infection, one infected area, lower right lung."
    [res] = segment_volume(vol.array, vol.ijk_to_ras, [prompt], qata_model, return_probability=True, device="cpu")
    voxels, mean = RECORDED_OUTPUT[qata_model.path.name]
    # a few voxels of slack for another CPU's arithmetic; a wrong tower or text input moves hundreds
    assert abs(int(res.labels.sum()) - voxels) <= 3
    assert float(res.probability.astype(np.float64).mean()) == pytest.approx(mean, abs=2e-6)


@pytest.mark.parametrize("name", ["ssa-qata-cpu", "svp-cvae-qata-cpu", "tgcnet-qata-cpu"])
def test_cli_segments_the_shipped_sample_with_each_model(cli, name, tmp_path):
    cid = "cxr_s11242-e20020-r1"
    rc, out, err = cli("predict", io.sample_path(f"qata/{cid}.png"), "--model", name, "--prompt",
                       "unilateral pulmonary infection, one infected area, lower right lung.", "--output", tmp_path,
                       "--quiet")
    assert rc == 0, err
    [segment], _ = io.read_segmentation(tmp_path / f"{cid}.seg.nrrd")
    truth = io.read_volume(io.sample_path(f"qata/{cid}_mask.png")).array > 127
    assert dice_iou(segment.mask, truth)[0] > 0.6


def test_svp_cvae_uncertainty_on_the_shipped_sample(cli, tmp_path):
    """The shipped SVP-CVAE (LoRA adapter loaded from its text_encoder/ folder) writes an uncertainty
    volume on the input's grid, higher on the pixels its mask gets wrong than on the others."""
    cid = "cxr_s11234-e19977-r1"
    image = io.sample_path(f"qata/{cid}.png")
    report = io.sample_path(f"qata/{cid}.txt").read_text(encoding="utf-8")
    model = load_model("svp-cvae-qata-cpu")
    assert model.config.text.adapter_path.endswith("text_encoder") and model.config.text.uses_cache
    rc, out, err = cli("predict", image, "--model", "svp-cvae-qata-cpu", "--prompt", report, "--laterality", "image",
                       "--output", tmp_path, "--samples", "8", "--quiet")
    assert rc == 0, err
    [segment], _ = io.read_segmentation(tmp_path / f"{cid}.seg.nrrd")
    [unc_file] = sorted(tmp_path.glob(f"{cid}_*_uncertainty.nrrd"))
    unc = io.read_volume(unc_file)
    source = io.read_volume(image)
    np.testing.assert_allclose(unc.ijk_to_ras, source.ijk_to_ras, atol=1e-9)
    truth = io.read_volume(io.sample_path(f"qata/{cid}_mask.png")).array > 127
    assert dice_iou(segment.mask, truth)[0] > 0.6
    wrong = segment.mask != truth
    assert unc.array[wrong].mean() > 3 * unc.array[~wrong].mean()


def test_text_free_model_segments_the_shipped_xrays_without_a_prompt(cli, tmp_path):
    """ProLearn trained with 1 % of the reports: no prompt at all, from the CLI; its card shows the
    50 % and 1 % validation figures."""
    card = (resolve_model("prolearn-qata-cpu-1pct").path / "README.md").read_text(encoding="utf-8")
    assert "text_fraction 0.01" in card and "50 % of the reports" in card and "1 % of the reports" in card
    dices = []
    for cid in SAMPLES:
        image = io.sample_path(f"qata/{cid}.png")
        rc, out, err = cli("predict", image, "--model", "prolearn-qata-cpu-1pct", "--output", tmp_path, "--quiet")
        assert rc == 0, err
        [segment], _ = io.read_segmentation(tmp_path / f"{cid}.seg.nrrd")
        assert segment.name == "segmentation" and segment.prompt == ""
        truth = io.read_volume(io.sample_path(f"qata/{cid}_mask.png")).array > 127
        dices.append(dice_iou(segment.mask, truth)[0])
    # measured 2026-11-25: 0.70, 0.52, 0.88 on these three validation images
    assert np.mean(dices) > 0.55, dices


def test_shipped_tgcnet_is_self_contained_and_reports_its_frozen_parts(cli):
    """TGC-Net travels with the frozen CLIP text tower it was trained on (text_encoder/) and the CLIP
    image tower inside its weights; its card gives trained vs frozen parameters, the CLIP's zero-shot
    retrieval and the text-patch similarity figure."""
    entry = resolve_model("tgcnet-qata-cpu")
    model = load_model("tgcnet-qata-cpu")
    assert model.config.text.backend == "clip" and model.config.text.name_or_path == str(entry.path / "text_encoder")
    # measured with `textguidedseg models info tgcnet-qata-cpu` when the model was exported
    assert model.parameter_counts() == {"image_model_trainable": 642114, "image_model_frozen": 904960,
                                        "text_encoder": 4704256}
    card = (entry.path / "README.md").read_text(encoding="utf-8")
    assert "image model 0.64 M trained + 0.90 M frozen; text encoder 4.70 M, frozen" in card
    assert "image->text recall@1" in card and "(clip_similarity.png)" in card
    assert (entry.path / "clip_similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc, out, err = cli("models", "info", "tgcnet-qata-cpu")
    assert rc == 0, err
    assert json.loads(out[out.index("{"):])["parameters"]["image_model_trainable"] == 642114


def test_hippocampus_model_segments_a_validation_volume(shared_data, cli, tmp_path):
    """hippocampus-mr-cpu on one MSD val volume through the CLI: both labels as named segments on the
    input's grid, each close to the ground truth."""
    root = shared_data / "volumes" / "msd_hippocampus"
    if not (root / "dataset.json").is_file():
        pytest.skip(f"{root} not found")
    cid = "hippocampus_008"  # in split.json's val
    src = root / "imagesTr" / f"{cid}.nii.gz"
    rc, out, err = cli("predict", src, "--model", "hippocampus-mr-cpu", "--prompt", "anterior hippocampus",
                       "--prompt", "posterior hippocampus", "--output", tmp_path, "--quiet")
    assert rc == 0, err
    segments, ijk_to_ras = io.read_segmentation(tmp_path / f"{cid}.seg.nrrd")
    assert [sg.name for sg in segments] == ["anterior hippocampus", "posterior hippocampus"]
    vol = io.read_volume(src)
    assert np.allclose(ijk_to_ras, vol.ijk_to_ras)
    truth = np.rint(io.read_volume(root / "labelsTr" / f"{cid}.nii.gz").array)
    for value, segment in zip((1, 2), segments):
        assert segment.mask.shape == vol.array.shape
        assert dice_iou(segment.mask > 0, truth == value)[0] > 0.7


def test_brain_model_names_the_patients_sides_on_a_real_mr():
    """brain1 (a real MR, 13 axial slices, shipped sample): structures asked for by side land on that side
    of the patient (RAS x: +x is the patient's right), both sides when asked without a side."""
    model = load_model("brain-mr-cpu")
    vol = io.read_volume(io.sample_path("brain1_image.nrrd"))
    prompts = ["left cerebral white matter", "right cerebral white matter", "left lateral ventricle",
               "right lateral ventricle", "lateral ventricles"]
    results = segment_volume(vol.array, vol.ijk_to_ras, prompts, model)
    k, j, i = np.indices(vol.array.shape)
    m = vol.ijk_to_ras
    x = m[0, 0] * i + m[0, 1] * j + m[0, 2] * k + m[0, 3]
    midline = x[vol.array > np.percentile(vol.array, 60)].mean()
    left_share = {p: float((x[r.labels.astype(bool)] < midline).mean()) for p, r in zip(prompts, results)}
    assert all(r.labels.sum() > 1000 for r in results), [int(r.labels.sum()) for r in results]
    assert left_share["left cerebral white matter"] > 0.98 and left_share["right cerebral white matter"] < 0.02
    assert left_share["left lateral ventricle"] > 0.85 and left_share["right lateral ventricle"] < 0.15
    assert 0.2 < left_share["lateral ventricles"] < 0.8
