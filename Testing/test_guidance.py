"""Directional guidance masks: chest X-ray phrases, conventions, and laterality in volumes from
IJK->RAS (LPS, RAS, flipped, permuted, oblique), checked against the AAL atlas's left/right labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_ssa_config
from TextGuidedSegLib import io
from TextGuidedSegLib.checkpoint import LoadedModel
from TextGuidedSegLib.engine import segment_volume
from TextGuidedSegLib.evaluation import IMAGE_IJK_TO_RAS
from TextGuidedSegLib.guidance import guidance_cells, guidance_volume, render_guidance, side_columns
from TextGuidedSegLib.models import build_model

H = W = 224


def xray_guidance(prompt: str, prompt_laterality: str = "image", model_laterality: str = "image") -> np.ndarray:
    """The guidance the engine shows a model for a 224 x 224 chest X-ray (a one-slice volume)."""
    return guidance_volume((1, H, W), IMAGE_IJK_TO_RAS, prompt, model_laterality=model_laterality,
                           prompt_laterality=prompt_laterality)[0].astype(bool)


def region(rows: tuple[float, float], cols: tuple[float, float]) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[int(rows[0] * H):int(rows[1] * H), int(cols[0] * W):int(cols[1] * W)] = True
    return m


@pytest.mark.parametrize("prompt, inside, outside", [
    ("unilateral pulmonary infection, one infected area, lower left lung.",
     region((0.31, 1.0), (0.0, 0.44)), [region((0.0, 0.29), (0, 1)), region((0, 1), (0.56, 1.0))]),
    ("upper right lung", region((0.0, 0.69), (0.56, 1.0)), [region((0.71, 1.0), (0, 1)), region((0, 1), (0, 0.44))]),
    ("middle left lung", region((0.21, 0.79), (0.0, 0.44)), [region((0.0, 0.19), (0, 1)), region((0.81, 1.0), (0, 1))]),
    ("all left lung and middle lower right lung", region((0, 1), (0, 0.44)) | region((0.21, 1.0), (0.56, 1.0)),
     [region((0.0, 0.19), (0.56, 1.0))]),
    ("bilateral pulmonary infection", region((0, 1), (0, 1)), []),
    ("one medium yellow round polyp, located in bottom right of the image", region((0.31, 1.0), (0.56, 1.0)),
     [region((0, 0.29), (0, 1)), region((0, 1), (0, 0.44))]),
])
def test_xray_phrases(prompt, inside, outside):
    g = xray_guidance(prompt)
    assert g[inside].all(), "the described region must be allowed"
    for o in outside:
        assert not g[o].any(), "the guidance must exclude what the text rules out"


def test_left_lower_lung_never_covers_both_lungs():
    right_lung, left_lung = region((0.3, 0.9), (0.6, 0.95)), region((0.3, 0.9), (0.05, 0.4))
    for prompt_side in ("image", "patient"):
        for model_side in ("image", "patient"):
            g = xray_guidance("infection in the left lower lung", prompt_side, model_side)
            assert g[left_lung].any() != g[right_lung].any(), (prompt_side, model_side)
    # users speak of the patient: the patient's left lung is on the picture's right
    g = xray_guidance("infection in the left lower lung", prompt_laterality="patient")
    assert g[right_lung].all() and not g[left_lung].any()
    # the dataset's words: 'left' is the picture's left half
    g = xray_guidance("infection in the left lower lung", prompt_laterality="image")
    assert g[left_lung].all() and not g[right_lung].any()


def test_cells_and_render():
    cells = torch.from_numpy(np.stack([guidance_cells("lower right lung"), guidance_cells("polyp")]))
    assert cells.shape == (2, 3, 2)
    mask = render_guidance(cells, 30, 20)
    assert mask.shape == (2, 1, 30, 20)
    assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
    assert mask[1].all()
    assert side_columns("image") == {"left": 0, "right": 1} and side_columns("patient") == {"left": 1, "right": 0}
    with pytest.raises(ValueError, match="laterality"):
        side_columns("radiological")
    with pytest.raises(ValueError, match="plane"):
        guidance_cells("left lung", plane="oblique")


# ----------------------------------------------------------------------------- synthetic volumes
def _rot_s(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])


def _voxel_ras(shape: tuple[int, int, int], m: np.ndarray) -> np.ndarray:
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], -1).reshape(-1, 4).astype(float)
    return (ijk @ m.T)[:, :3].reshape(*shape, 3)


@pytest.mark.parametrize("name, direction", [
    ("RAS", np.eye(3)), ("LPS", np.diag([-1.0, -1.0, 1.0])), ("oblique", _rot_s(25.0) @ np.diag([-1.0, -1.0, 1.0])),
    ("permuted", np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])),
])
@pytest.mark.parametrize("model_laterality", ["image", "patient"])
def test_left_in_volumes_is_the_patients_left(name, direction, model_laterality):
    shape = (6, 40, 40)
    m = np.eye(4)
    m[:3, :3] = direction * 2.0
    centre = np.array([19.5, 19.5, 2.5])
    m[:3, 3] = -(m[:3, :3] @ centre)  # the volume centred on the origin
    ras = _voxel_ras(shape, m)
    for prompt, sign in (("left kidney", -1), ("right kidney", 1)):
        g = guidance_volume(shape, m, prompt, model_laterality=model_laterality).astype(bool)
        assert g.shape == shape
        # well inside the named side (R = +x), near the A-P centre, where a 25 degree oblique slice's
        # column midline is still within a few mm of the patient's midline
        central = np.abs(ras[..., 1]) < 15
        far_named = (sign * ras[..., 0] > 12) & central
        far_other = (sign * ras[..., 0] < -12) & central
        assert g[far_named].all() and not g[far_other].any(), (name, prompt)


# ----------------------------------------------------------------------------- Colin27 + AAL
@pytest.fixture(scope="module")
def aal(shared_data):
    root = shared_data / "volumes" / "colin27_aal"
    if not (root / "aal.nii.gz").is_file():
        pytest.skip(f"{root}/aal.nii.gz not found")
    vol = io.read_volume(root / "aal.nii.gz")
    names = {}
    for line in (root / "aal.nii.txt").read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2:
            names[int(parts[0])] = parts[1]
    return vol, names


def _flip(array: np.ndarray, m: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Flip array axis ``axis`` (0 = k, 1 = j, 2 = i) and fix IJK->RAS so each voxel keeps its place."""
    n = array.shape[axis]
    col = 2 - axis
    new = m.copy()
    new[:3, 3] = m[:3, 3] + m[:3, col] * (n - 1)
    new[:3, col] = -m[:3, col]
    return np.flip(array, axis), new


def _permute(array: np.ndarray, m: np.ndarray, order: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Transpose the (k, j, i) array to ``order`` and permute the matrix's columns to match."""
    new = m.copy()
    cols = [2 - a for a in order][::-1]  # new (i, j, k) columns from the old ones
    new[:3, :3] = m[:3, cols]
    return np.transpose(array, order), new


def _orientations(array: np.ndarray, m: np.ndarray):
    yield "as stored", array, m
    a, mm = _flip(array, m, 2)
    a, mm = _flip(a, mm, 1)
    yield "LPS (i and j flipped)", a, mm
    yield "permuted", *_permute(array, m, (1, 0, 2))
    a, mm = _permute(*_flip(array, m, 2), (2, 1, 0))
    yield "flipped + permuted", a, mm
    oblique = m.copy()
    oblique[:3, :3] = _rot_s(20.0) @ m[:3, :3]
    oblique[:3, 3] = _rot_s(20.0) @ m[:3, 3]
    yield "oblique (20 degrees about S)", array, oblique


@pytest.mark.parametrize("axis", ["auto", "coronal"])
def test_atlas_left_and_right_structures(aal, axis):
    """'left ...' guidance holds every AAL *_L voxel of the hippocampus and none of *_R, and the
    reverse, whatever way the volume is stored (geometry from IJK->RAS, not from array order)."""
    vol, names = aal
    left = [v for v, n in names.items() if n == "Hippocampus_L"]
    right = [v for v, n in names.items() if n == "Hippocampus_R"]
    all_left = [v for v, n in names.items() if n.endswith("_L")]
    all_right = [v for v, n in names.items() if n.endswith("_R")]
    for label, array, m in _orientations(vol.array, vol.ijk_to_ras):
        for prompt, named, other, named_all, other_all in (
                ("left hippocampus", left, right, all_left, all_right),
                ("right hippocampus", right, left, all_right, all_left)):
            g = guidance_volume(array.shape, m, prompt, axis=axis).astype(bool)
            assert g[np.isin(array, named)].all(), (label, prompt)
            assert not g[np.isin(array, other)].any(), (label, prompt)
            # every structure of the named hemisphere; of the other only what touches the midline band
            assert g[np.isin(array, named_all)].mean() == 1.0, (label, prompt)
            assert g[np.isin(array, other_all)].mean() < 0.25, (label, prompt)


# ----------------------------------------------------------------------------- the engine's own path
@pytest.mark.parametrize("name, direction", [
    ("LPS", np.diag([-1.0, -1.0, 1.0])), ("RAS", np.eye(3)), ("oblique", _rot_s(20.0)),
    ("permuted", np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])),
])
def test_engine_shows_ssa_the_same_guidance(name, direction, minilm, monkeypatch):
    """What SSA reads inside segment_volume (cells for the slice's plane, after the left/right
    mapping) is what guidance_volume draws, and 'left' lands on the patient's left (R = +x)."""
    config = make_tiny_ssa_config()
    net = build_model(config).eval()
    seen = []
    original = net.encode_text

    def spy(encoder, prompts, plane="coronal"):
        text = original(encoder, prompts, plane=plane)
        seen.append((list(prompts), plane, text.cells.clone()))
        return text

    monkeypatch.setattr(net, "encode_text", spy)
    shape = (3, 32, 32)
    m = np.eye(4)
    m[:3, :3] = direction * 3.0
    m[:3, 3] = -(m[:3, :3] @ np.array([15.5, 15.5, 1.0]))
    volume = np.random.default_rng(0).integers(0, 255, shape).astype(np.int16)
    [result] = segment_volume(volume, m, ["left kidney"], LoadedModel(net, config, _text_encoder=minilm),
                              device="cpu", prompt_laterality="patient")
    (prompts, plane, cells), = seen
    assert prompts == [result.model_prompt] and plane == result.layout.plane == "axial"
    drawn = render_guidance(cells, 32, 32)[0, 0].numpy().astype(np.uint8)
    from_engine = result.layout.from_slices(np.broadcast_to(drawn, (3, 32, 32)))
    expected = guidance_volume(shape, m, "left kidney", model_laterality=config.laterality)
    np.testing.assert_array_equal(from_engine, expected)
    ras = _voxel_ras(shape, m)
    central = np.abs(ras[..., 1]) < 20
    assert expected[(ras[..., 0] < -15) & central].all() and not expected[(ras[..., 0] > 15) & central].any()
