"""Which way a slice faces, from the volume's IJK->RAS matrix, never from array order.

The engine shows every slice to a model in the radiological layout a reader expects:

- axial:    columns run from the patient's right to left, rows from anterior to posterior;
- coronal:  columns right to left, rows superior to inferior;
- sagittal: columns anterior to posterior, rows superior to inferior.

So a flipped, permuted or oblique volume presents the same picture. In that layout the image's
left half is the patient's *right*. A model's training text has a laterality convention
(``image``: "left" = image's left half, as QaTa-COV19's reports; ``patient``: the patient's left);
a prompt has one too (users speak of the patient). :func:`needs_left_right_swap` says when the
words 'left'/'right' must be swapped so the prompt lands where the model's convention expects it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PLANES = ("axial", "coronal", "sagittal")
# Unit RAS vectors of the plane normals and of the desired column / row directions.
_NORMAL = {"axial": (0, 0, 1), "coronal": (0, 1, 0), "sagittal": (1, 0, 0)}
_COLUMNS = {"axial": (-1, 0, 0), "coronal": (-1, 0, 0), "sagittal": (0, -1, 0)}
_ROWS = {"axial": (0, -1, 0), "coronal": (0, 0, -1), "sagittal": (0, 0, -1)}


@dataclass(frozen=True)
class SliceLayout:
    """How to cut a ``(k, j, i)`` array into model slices and put it back.

    Args:
        plane: anatomical plane of the slices (``axial``, ``coronal`` or ``sagittal``; for an
            array axis chosen by number, the plane that axis is closest to).
        slice_axis: array axis (0 = k, 1 = j, 2 = i) the slices are stacked along.
        row_axis, col_axis: array axes that become the slice's rows and columns.
        flip_rows, flip_cols: reverse that axis so rows / columns run in the layout's direction.
        columns_right_to_left: the columns run from the patient's right to left (axial, coronal).
    """

    plane: str
    slice_axis: int
    row_axis: int
    col_axis: int
    flip_rows: bool
    flip_cols: bool
    columns_right_to_left: bool

    def to_slices(self, array: np.ndarray) -> np.ndarray:
        """``(k, j, i)`` -> ``(n_slices, rows, cols)`` in the layout (a view where possible)."""
        out = np.transpose(array, (self.slice_axis, self.row_axis, self.col_axis))
        if self.flip_rows:
            out = out[:, ::-1]
        if self.flip_cols:
            out = out[:, :, ::-1]
        return out

    def from_slices(self, slices: np.ndarray) -> np.ndarray:
        """Exact inverse of :meth:`to_slices`."""
        if self.flip_cols:
            slices = slices[:, :, ::-1]
        if self.flip_rows:
            slices = slices[:, ::-1]
        inverse = np.argsort((self.slice_axis, self.row_axis, self.col_axis))
        return np.ascontiguousarray(np.transpose(slices, inverse))


def axis_directions(ijk_to_ras: np.ndarray) -> np.ndarray:
    """Unit RAS direction of each *array* axis: row 0 = k, row 1 = j, row 2 = i."""
    m = np.asarray(ijk_to_ras, dtype=float)
    if m.shape != (4, 4):
        raise ValueError(f"ijk_to_ras must be a 4x4 matrix, got shape {m.shape}")
    cols = m[:3, :3].T  # rows: directions of i, j, k
    norms = np.linalg.norm(cols, axis=1)
    if np.any(norms == 0) or abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise ValueError("ijk_to_ras is singular: the volume's spacing or direction is broken")
    unit = cols / norms[:, None]
    return unit[::-1]  # (k, j, i)


def slice_layout(ijk_to_ras: np.ndarray, shape: tuple[int, int, int], axis: str | int = "auto") -> SliceLayout:
    """Choose the slice axis and in-plane layout.

    ``axis``: ``auto`` (a one-slice volume is cut along its thin axis, otherwise axial),
    ``axial`` / ``coronal`` / ``sagittal``, or an array axis number 0, 1, 2 (k, j, i).
    """
    dirs = axis_directions(ijk_to_ras)
    if len(shape) != 3:
        raise ValueError(f"expected a (k, j, i) shape, got {shape}")
    if isinstance(axis, (int, np.integer)) or (isinstance(axis, str) and axis.isdigit()):
        slice_axis = int(axis)
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice axis must be 0, 1 or 2 (k, j, i), got {slice_axis}")
        plane = _plane_of(dirs[slice_axis])
    elif axis == "auto":
        thin = [a for a in range(3) if shape[a] == 1]
        if thin:
            slice_axis = thin[0]
            plane = _plane_of(dirs[slice_axis])
        else:
            plane = "axial"
            slice_axis = int(np.argmax(np.abs(dirs @ np.array(_NORMAL["axial"]))))
    elif axis in PLANES:
        plane = axis
        slice_axis = int(np.argmax(np.abs(dirs @ np.array(_NORMAL[plane]))))
    else:
        raise ValueError(f"axis must be 'auto', one of {PLANES} or 0/1/2, got {axis!r}")

    in_plane = [a for a in range(3) if a != slice_axis]
    col_dir, row_dir = np.array(_COLUMNS[plane]), np.array(_ROWS[plane])
    col_scores = [abs(dirs[a] @ col_dir) for a in in_plane]
    col_axis = in_plane[int(np.argmax(col_scores))]
    row_axis = in_plane[0] if col_axis == in_plane[1] else in_plane[1]
    return SliceLayout(plane=plane, slice_axis=slice_axis, row_axis=row_axis, col_axis=col_axis,
                       flip_rows=bool(dirs[row_axis] @ row_dir < 0), flip_cols=bool(dirs[col_axis] @ col_dir < 0),
                       columns_right_to_left=plane in ("axial", "coronal"))


def _plane_of(normal: np.ndarray) -> str:
    scores = {p: abs(float(normal @ np.array(n))) for p, n in _NORMAL.items()}
    return max(scores, key=scores.get)


def needs_left_right_swap(layout: SliceLayout, model_laterality: str, prompt_laterality: str) -> bool:
    """True when 'left'/'right' in the prompt must be swapped before the model reads it.

    In the radiological layout the image's left is the patient's right, so a prompt about the
    patient's sides and a model trained on image sides (or the reverse) disagree on every word.
    Sagittal slices hold no left/right axis: nothing is swapped there.
    """
    for name, value in (("model", model_laterality), ("prompt", prompt_laterality)):
        if value not in ("image", "patient"):
            raise ValueError(f"{name} laterality must be 'image' or 'patient', got {value!r}")
    return layout.columns_right_to_left and model_laterality != prompt_laterality
