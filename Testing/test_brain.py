"""Brain structures by name: prompt table, label-map generator, laterality, SSA's shared image part."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from TextGuidedSegLib.data import PROMPT_TABLES
from TextGuidedSegLib.data.synthseg import (BRAIN_PROMPTS, BrainSliceGenerator, GeneratorConfig, SynthBrainDataset,
                                            SynthBrainValidation, atlas_to_freesurfer, read_atlas_names,
                                            read_label_slices, swap_lookup)
from TextGuidedSegLib.io import write_labelmap
from TextGuidedSegLib.models import build_model, config_from_dict, encode_prompts
from TextGuidedSegLib.text import TextEncoder

STILL = dict(rotate_deg=0.0, scale=0.0, elastic_magnitude=(0.0, 0.0), shift=0.0, fov_scale=(1.2, 1.2),
             aspect=(1.0, 1.0))


@pytest.mark.parametrize("prompt, labels", [
    ("left hippocampus", (17,)), ("hippocampus, right side", (53,)), ("the left hippocampal formation", (17,)),
    ("hippocampi", (17, 53)), ("both hippocampi", (17, 53)), ("hippocampus", (17, 53)),
    ("both thalami", (10, 49)), ("lateral ventricles", (4, 43)), ("right lateral ventricle", (43,)),
    ("putamina", (12, 51)), ("left globus pallidus", (13,)), ("brain stem", (16,)), ("3rd ventricle", (14,)),
    ("left cerebellum", (7, 8)), ("right caudate nucleus", (50,)),
])
def test_brain_prompts_name_the_structures(prompt, labels):
    assert BRAIN_PROMPTS.find(prompt).labels == labels


def test_every_phrasing_names_one_target_and_left_right_mirror():
    seen = {}
    for t in BRAIN_PROMPTS.targets:
        for p in t.phrasings:
            assert p.lower() not in seen, f"{p!r} names both {seen[p.lower()]} and {t.name}"
            seen[p.lower()] = t.name
    swap = swap_lookup(100)
    for t in BRAIN_PROMPTS.targets:
        if t.name.startswith("left_"):
            right = next(r for r in BRAIN_PROMPTS.targets if r.name == "right_" + t.name[5:])
            assert tuple(swap[v] for v in t.labels) == right.labels
    assert {t.name for t in PROMPT_TABLES["brain-aal"].per_label()} == {
        f"{s}_{n}" for s in ("left", "right") for n in ("hippocampus", "amygdala", "caudate", "putamen",
                                                        "pallidum", "thalamus")}


def _label_map(tmp_path, name: str, ijk_to_ras: np.ndarray) -> "np.ndarray":
    """A 24^3 head with a 'left hippocampus' (17) at RAS x < 0 (RAS: +x is the patient's right) and a
    'right putamen' (51) at x > 0."""
    n = 24
    ras = np.stack(np.meshgrid(np.arange(n), np.arange(n), np.arange(n), indexing="ij"), -1)  # (k, j, i) -> (k, j, i)
    ijk = np.stack([ras[..., 2], ras[..., 1], ras[..., 0], np.ones(ras.shape[:3])], -1)
    x, y, z = np.moveaxis((ijk @ ijk_to_ras.T)[..., :3], -1, 0)
    lab = np.zeros((n, n, n), np.int16)
    lab[(x ** 2 + y ** 2 + z ** 2) < 10 ** 2] = 2          # white matter ball
    lab[(np.abs(x + 5) < 2) & (np.abs(y) < 3) & (np.abs(z) < 3)] = 17
    lab[(np.abs(x - 5) < 2) & (np.abs(y - 1) < 3) & (np.abs(z) < 3)] = 51
    path = tmp_path / f"{name}.nii.gz"
    write_labelmap(path, lab, ijk_to_ras)
    return path


GEOMETRIES = {
    # RAS-aligned, centred
    "ras": np.array([[1, 0, 0, -11.5], [0, 1, 0, -11.5], [0, 0, 1, -11.5], [0, 0, 0, 1]], float),
    # as SynthSeg's maps: i -> +x, j -> -z, k -> -y
    "synthseg": np.array([[1, 0, 0, -11.5], [0, 0, -1, 11.5], [0, -1, 0, 11.5], [0, 0, 0, 1]], float),
    # mirrored along i
    "flipped": np.array([[-1, 0, 0, 11.5], [0, 1, 0, -11.5], [0, 0, 1, -11.5], [0, 0, 0, 1]], float),
}


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_label_slices_put_the_patients_left_on_the_image_right(tmp_path, geometry):
    slices = read_label_slices([_label_map(tmp_path, geometry, GEOMETRIES[geometry])], min_brain_voxels=20)
    values = list(slices.values)
    left = np.isin(slices.slices, [values.index(17)])
    right = np.isin(slices.slices, [values.index(51)])
    cols = slices.slices.shape[2]
    assert left.any() and right.any()
    assert np.nonzero(left)[2].mean() > cols / 2 > np.nonzero(right)[2].mean()


def test_generator_mirror_swaps_the_sides_and_keeps_left_on_the_image_right(tmp_path):
    slices = read_label_slices([_label_map(tmp_path, "ras", GEOMETRIES["ras"])], min_brain_voxels=20)
    index = int(np.argmax((slices.slices == list(slices.values).index(17)).sum((1, 2))))
    kept = BrainSliceGenerator(slices, 32, GeneratorConfig(**STILL, mirror_prob=0.0))
    mirrored = BrainSliceGenerator(slices, 32, GeneratorConfig(**STILL, mirror_prob=1.0))
    a = kept.label_slice(index, np.random.default_rng(0))
    b = mirrored.label_slice(index, np.random.default_rng(0))
    np.testing.assert_array_equal(swap_lookup(60)[a[:, ::-1]], b)       # a mirror with the sides' labels swapped
    for lab in (a, b):
        cols = np.nonzero(np.isin(lab, [17, 49, 10, 12, 13]))[1], np.nonzero(np.isin(lab, [53, 51]))[1]
        left_cols = np.nonzero(np.isin(lab, [17, 12]))[1]
        right_cols = np.nonzero(np.isin(lab, [53, 51]))[1]
        assert left_cols.mean() > 16 > right_cols.mean(), cols


def test_generated_images_are_seeded_normalised_and_vary_in_contrast(tmp_path):
    slices = read_label_slices([_label_map(tmp_path, "ras", GEOMETRIES["ras"])], min_brain_voxels=20)
    gen = BrainSliceGenerator(slices, 32, GeneratorConfig(**STILL, mirror_prob=0.0))
    lab = gen.label_slice(len(slices.slices) // 2, np.random.default_rng(1))
    assert (lab == 2).any() and (lab == 0).any()
    a, b = gen.image(lab, np.random.default_rng(5)), gen.image(lab, np.random.default_rng(5))
    c = gen.image(lab, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (32, 32) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert np.abs(a - c).mean() > 0.02
    # the labels shape the image: the mean intensity differs between white matter and background
    assert abs(a[lab == 2].mean() - a[lab == 0].mean()) > 0.02 or abs(c[lab == 2].mean() - c[lab == 0].mean()) > 0.02


def test_dataset_items_and_collate_group_prompts_by_image(tmp_path):
    slices = read_label_slices([_label_map(tmp_path, "ras", GEOMETRIES["ras"])], min_brain_voxels=20)
    ds = SynthBrainDataset(slices, 32, prompts_per_image=3, samples_per_epoch=4, absent_fraction=0.3,
                           config=GeneratorConfig(mirror_prob=0.0))
    item = ds[0]
    assert item["image"].shape == (1, 32, 32) and item["mask"].shape == (3, 32, 32) and len(item["text"]) == 3
    for text, mask in zip(item["text"], item["mask"]):
        assert BRAIN_PROMPTS.find(text) is not None
    batch = ds.collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 1, 32, 32) and batch["mask"].shape == (6, 1, 32, 32)
    assert len(batch["text"]) == 6 and batch["text"][:3] == ds[0]["text"]
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], item["image"])
    val = SynthBrainValidation(slices, 32, images=3, prompts_per_image=2)
    assert len(val) == 6 and val.images[[0, 1]].shape == (2, 1, 32, 32)
    assert all(m.shape == (32, 32) for m in val.native_masks)


def test_atlas_names_map_to_freesurfer_values(tmp_path):
    names_file = tmp_path / "aal.txt"
    names_file.write_text("37 Hippocampus_L 4101\r\n38 Hippocampus_R 4102\r\n75 Pallidum_L 7021\r\n1 Precentral_L 2001\r\n\r\n")
    names = read_atlas_names(names_file)
    atlas = np.array([[[37, 38, 75, 1, 0]]])
    np.testing.assert_array_equal(atlas_to_freesurfer(atlas, names), [[[17, 53, 13, 0, 0]]])


def _late_ssa():
    cfg = config_from_dict({"model_type": "ssa", "image_size": 64, "in_channels": 1, "laterality": "patient",
                            "text": {"name_or_path": "packaged:all-MiniLM-L6-v2", "max_length": 16},
                            "encoder_channels": [8, 8, 16, 16, 16], "decoder_channels": [16, 8, 8, 8], "dim": 16,
                            "guidance": False, "text_fusion": "late", "ot_iterations": 5})
    encoder = TextEncoder(cfg.text)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    for p in model.parameters():  # FiLM starts at zero: give it values so the test sees the prompt
        p.data.add_(0.05 * torch.randn_like(p))
    return model, encoder


def test_late_fusion_answers_many_prompts_per_image_like_one_at_a_time():
    model, encoder = _late_ssa()
    assert model.shares_image_features
    prompts = ["left hippocampus", "right putamen", "brainstem"]
    text = encode_prompts(model, encoder, prompts, plane="axial")
    images = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        together = model(images, text.index([0, 1, 2, 0, 1, 2]))["logits"]
        for b in range(2):
            for p in range(3):
                alone = model(images[b:b + 1], text.index([p]))["logits"]
                torch.testing.assert_close(together[3 * b + p], alone[0], atol=1e-4, rtol=1e-4)
        assert (together[0] - together[1]).abs().max() > 1e-3  # the prompt changes the answer
        with pytest.raises(ValueError, match="whole multiple"):
            model(images, text.index([0, 1, 2]))


def test_late_fusion_refuses_the_guidance_channel():
    with pytest.raises(ValueError, match="guidance: false"):
        config_from_dict({"model_type": "ssa", "image_size": 64, "guidance": True, "text_fusion": "late"})


def test_engine_answers_many_prompts_at_once_like_one_at_a_time():
    """The shared path (all prompts per batch) gives each prompt's labels, probabilities, voxel count
    and confidence as a call with that prompt alone; progress counts prompts x slices."""
    from TextGuidedSegLib.checkpoint import LoadedModel
    from TextGuidedSegLib.engine import segment_volume

    model, encoder = _late_ssa()
    loaded = LoadedModel(model, model.config, _text_encoder=encoder)
    rng = np.random.default_rng(0)
    volume = rng.normal(100, 20, (7, 40, 36)).astype(np.float32)
    ijk_to_ras = np.diag([-1.0, -1.0, 2.0, 1.0])
    prompts = ["left hippocampus", "right putamen", "brainstem"]
    seen = []
    together = segment_volume(volume, ijk_to_ras, prompts, loaded, batch_size=3, return_probability=True,
                              threshold=0.45, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (21, 21) and seen[0] == (9, 21)
    for prompt, result in zip(prompts, together):
        [alone] = segment_volume(volume, ijk_to_ras, [prompt], loaded, batch_size=3, return_probability=True,
                                 threshold=0.45)
        assert result.prompt == prompt and result.labels.shape == volume.shape
        np.testing.assert_allclose(result.probability, alone.probability, atol=1e-5)
        np.testing.assert_array_equal(result.labels, alone.labels)
        assert result.voxels == alone.voxels and result.confidence == pytest.approx(alone.confidence, rel=1e-4)
    assert not np.array_equal(together[0].probability, together[1].probability)
