"""Slice layout from IJK->RAS: the radiological picture must not depend on the array order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from TextGuidedSegLib import io
from TextGuidedSegLib.orientation import SliceLayout, axis_directions, needs_left_right_swap, slice_layout

LPS_IDENTITY = np.diag([-1.0, -1.0, 1.0, 1.0])  # SimpleITK identity direction, in RAS


def _matrix(direction_spacing: np.ndarray, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = direction_spacing
    m[:3, 3] = origin
    return m


def _rot_s(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])


def _fields(layout: SliceLayout) -> tuple:
    return (layout.plane, layout.slice_axis, layout.row_axis, layout.col_axis, layout.flip_rows, layout.flip_cols)


# ------------------------------------------------------------------ specific geometries


def test_brain_sample_lps_layout():
    vol = io.read_volume(io.sample_path("brain1_image.nrrd"))
    # LPS direction 1 0 0 / 0 -1 0 / 0 0 1: i runs to the patient's left, j anterior, k superior.
    dirs = axis_directions(vol.ijk_to_ras)
    np.testing.assert_allclose(dirs, [[0, 0, 1], [0, 1, 0], [-1, 0, 0]], atol=1e-12)
    layout = slice_layout(vol.ijk_to_ras, vol.array.shape)
    assert _fields(layout) == ("axial", 0, 1, 2, True, False)
    assert layout.columns_right_to_left
    slices = layout.to_slices(vol.array)
    assert slices.shape == (13, 256, 256)
    # rows reversed (j runs anterior, rows must run anterior -> posterior), columns as stored
    np.testing.assert_array_equal(slices[5], vol.array[5, ::-1, :])


def test_permuted_axes_slice_along_superior():
    # i (array axis 2) runs superior, j to the patient's left, k posterior.
    m = _matrix(np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]]) * [2.0, 0.8, 0.9])
    layout = slice_layout(m, (30, 40, 12))
    assert _fields(layout) == ("axial", 2, 0, 1, False, False)
    assert layout.to_slices(np.zeros((30, 40, 12))).shape == (12, 30, 40)


def test_flipped_axes():
    # RAS-ordered (i to the right, j anterior) and k running inferior: both in-plane axes flipped.
    m = _matrix(np.diag([0.7, 0.7, -3.0]), origin=(10.0, -4.0, 50.0))
    layout = slice_layout(m, (5, 16, 18))
    assert _fields(layout) == ("axial", 0, 1, 2, True, True)
    x = np.arange(5 * 16 * 18).reshape(5, 16, 18)
    np.testing.assert_array_equal(layout.to_slices(x), x[:, ::-1, ::-1])


def test_oblique_20_degrees_still_axial():
    m = _matrix(_rot_s(20.0) @ np.diag([-1.0, -1.0, 1.0]) * [0.5, 0.5, 2.0])
    layout = slice_layout(m, (7, 32, 30))
    assert _fields(layout) == ("axial", 0, 1, 2, False, False)


def test_oblique_60_degrees_swaps_in_plane_axes():
    # At 60 deg the j axis is closer to right-left than i: j becomes the columns (flipped: it runs right).
    m = _matrix(_rot_s(60.0) @ np.diag([-1.0, -1.0, 1.0]))
    layout = slice_layout(m, (7, 32, 30))
    assert _fields(layout) == ("axial", 0, 2, 1, False, True)


def test_one_slice_volume_auto_picks_thin_axis():
    assert _fields(slice_layout(LPS_IDENTITY, (1, 40, 50))) == ("axial", 0, 1, 2, False, False)
    # a single coronal slice stored as (k, 1, i) is cut along j, whatever 'auto' would do for 3D
    assert slice_layout(LPS_IDENTITY, (40, 1, 50)).slice_axis == 1
    assert slice_layout(LPS_IDENTITY, (40, 1, 50)).plane == "coronal"
    # a 3D volume with no thin axis: auto = axial
    assert slice_layout(LPS_IDENTITY, (40, 30, 50)).slice_axis == 0


def test_plane_requests_and_numeric_axes():
    shape = (20, 30, 40)
    assert _fields(slice_layout(LPS_IDENTITY, shape, "axial")) == ("axial", 0, 1, 2, False, False)
    assert _fields(slice_layout(LPS_IDENTITY, shape, "coronal")) == ("coronal", 1, 0, 2, True, False)
    assert _fields(slice_layout(LPS_IDENTITY, shape, "sagittal")) == ("sagittal", 2, 0, 1, True, False)
    assert _fields(slice_layout(LPS_IDENTITY, shape, "1")) == ("coronal", 1, 0, 2, True, False)
    assert slice_layout(LPS_IDENTITY, shape, 2).plane == "sagittal"
    assert slice_layout(LPS_IDENTITY, shape, np.int64(0)).plane == "axial"
    assert not slice_layout(LPS_IDENTITY, shape, "sagittal").columns_right_to_left
    assert slice_layout(LPS_IDENTITY, shape, "coronal").columns_right_to_left


@pytest.mark.parametrize("axis", ["oblique", "3", 3, -1, "-1", "", "Axial "])
def test_bad_axis(axis):
    with pytest.raises(ValueError):
        slice_layout(LPS_IDENTITY, (4, 5, 6), axis)


def test_bad_matrix_and_shape():
    with pytest.raises(ValueError, match="singular"):
        slice_layout(np.diag([1.0, 0.0, 1.0, 1.0]), (4, 5, 6))
    with pytest.raises(ValueError, match="4x4"):
        slice_layout(np.eye(3), (4, 5, 6))
    with pytest.raises(ValueError):
        slice_layout(LPS_IDENTITY, (4, 5))


# ------------------------------------------------------------------ the key property

EXTENT = {0: 24, 1: 20, 2: 10}  # voxels (1 mm) along R, A, S
BLOB_RAS = np.array([-6.0, 5.0, 2.0])  # patient's left, anterior, superior of the centre
BLOB_RADIUS = 2.5


def _signed_permutations():
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            d = np.zeros((3, 3))
            for col, (row, s) in enumerate(zip(perm, signs)):
                d[row, col] = s  # array axis col (i, j, k) runs along RAS axis row
            yield d


def _phantom(direction: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """A (k, j, i) volume centred on RAS 0, blob at BLOB_RAS, sampled on the grid ``direction``."""
    n_ijk = []
    for col in range(3):
        ras_axis = int(np.argmax(np.abs(direction[:, col])))
        n_ijk.append(int(round(EXTENT[ras_axis] / spacing[col])))
    ds = direction * np.asarray(spacing)[None, :]
    centre = (np.array(n_ijk) - 1) / 2.0
    m = _matrix(ds, origin=-ds @ centre)
    k, j, i = np.meshgrid(*(np.arange(n) for n in n_ijk[::-1]), indexing="ij")
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(float)
    ras = ijk1 @ m.T
    vol = (np.linalg.norm(ras[..., :3] - BLOB_RAS, axis=-1) < BLOB_RADIUS).astype(np.int16)
    assert vol.sum() > 20
    return vol, m


def _ordered(slices: np.ndarray, layout: SliceLayout, m: np.ndarray, plane: str) -> np.ndarray:
    """Order the stack along the plane normal (the layout does not promise a stack direction)."""
    normal = {"axial": (0, 0, 1), "coronal": (0, 1, 0), "sagittal": (1, 0, 0)}[plane]
    return slices if axis_directions(m)[layout.slice_axis] @ normal > 0 else slices[::-1]


_REFERENCE: dict[str, np.ndarray] = {}


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_same_picture_for_every_axis_aligned_orientation(plane):
    pictures = []
    for d in _signed_permutations():
        vol, m = _phantom(d)
        layout = slice_layout(m, vol.shape, "auto" if plane == "axial" else plane)
        assert layout.plane == plane
        slices = layout.to_slices(vol)
        np.testing.assert_array_equal(layout.from_slices(slices), vol)
        pictures.append(_ordered(slices, layout, m, plane))
    ref = pictures[0]
    for p in pictures[1:]:
        np.testing.assert_array_equal(p, ref)
    mip = ref.max(axis=0).astype(bool)
    rows, cols = np.nonzero(mip)
    h, w = mip.shape
    if plane in ("axial", "coronal"):
        assert cols.min() >= w / 2, "patient's left must be on the image's right"
    else:
        assert cols.max() < w / 2, "sagittal: anterior on the image's left"
    # axial: anterior at the top; coronal / sagittal: superior at the top
    assert rows.max() < h / 2
    assert mip.shape == {"axial": (20, 24), "coronal": (10, 24), "sagittal": (10, 20)}[plane]


@pytest.mark.parametrize("name, direction, spacing", [
    ("ras", np.eye(3), (1.0, 1.0, 1.0)),
    ("lps", np.diag([-1.0, -1.0, 1.0]), (0.5, 0.5, 2.0)),
    ("permuted", np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]]), (1.0, 1.0, 1.0)),
    ("oblique20", _rot_s(20.0) @ np.diag([-1.0, -1.0, 1.0]), (1.0, 1.0, 1.0)),
    ("oblique-20-flipped", _rot_s(-20.0) @ np.diag([1.0, -1.0, -1.0]), (0.5, 1.0, 1.0)),
])
def test_patient_left_lands_on_image_right(name, direction, spacing):
    vol, m = _phantom(direction, spacing)
    layout = slice_layout(m, vol.shape)
    assert layout.plane == "axial"
    assert abs(axis_directions(m)[layout.slice_axis][2]) > 0.99
    slices = layout.to_slices(vol)
    n, h, w = slices.shape
    idx = np.nonzero(slices)
    assert idx[2].min() > w / 2, f"{name}: blob in the patient's left must be in the image's right half"
    assert idx[1].max() < h / 2, f"{name}: anterior blob must be in the image's top half"
    np.testing.assert_array_equal(layout.from_slices(slices), vol)


def test_from_slices_inverts_exactly_any_layout():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 6, 7)).astype(np.float32)
    for slice_axis, row_axis, col_axis in itertools.permutations(range(3)):
        for fr, fc in itertools.product((False, True), repeat=2):
            layout = SliceLayout("axial", slice_axis, row_axis, col_axis, fr, fc, True)
            s = layout.to_slices(x)
            assert s.shape == (x.shape[slice_axis], x.shape[row_axis], x.shape[col_axis])
            back = layout.from_slices(np.array(s))
            assert back.dtype == x.dtype and back.flags.c_contiguous
            np.testing.assert_array_equal(back, x)


# ------------------------------------------------------------------ laterality


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
@pytest.mark.parametrize("model", ["image", "patient"])
@pytest.mark.parametrize("prompt", ["image", "patient"])
def test_needs_left_right_swap_truth_table(plane, model, prompt):
    layout = slice_layout(LPS_IDENTITY, (10, 10, 10), plane)
    expected = plane != "sagittal" and model != prompt
    assert needs_left_right_swap(layout, model, prompt) is expected


@pytest.mark.parametrize("model, prompt", [("Image", "patient"), ("image", "left"), ("", "image"), (None, "image")])
def test_needs_left_right_swap_bad_values(model, prompt):
    with pytest.raises(ValueError, match="laterality"):
        needs_left_right_swap(slice_layout(LPS_IDENTITY, (10, 10, 10)), model, prompt)
