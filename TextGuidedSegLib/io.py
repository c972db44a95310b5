"""Reading and writing images, label maps and Slicer segmentations.

Why this module exists
----------------------
* **LPS vs RAS.** ITK / SimpleITK (and therefore NRRD, NIfTI, MHA and DICOM as SimpleITK reads them)
  describe physical space in LPS (x grows to the patient's Left, y to Posterior, z to Superior).
  3D Slicer nodes use RAS. Every volume handed to the rest of the library carries a 4x4
  ``ijk_to_ras`` matrix in **Slicer's RAS convention**, so the engine, ``orientation.py`` and the
  Slicer module all reason in one frame::

      ijk_to_ras = diag(-1, -1, 1, 1) @ [[direction * spacing, origin], [0, 0, 0, 1]]

  (``direction * spacing`` scales the columns of the direction matrix.) ``volume_to_sitk`` is the
  exact inverse, oblique directions included. Voxel arrays are indexed ``(k, j, i)`` like
  ``sitk.GetArrayFromImage`` and ``slicer.util.arrayFromVolume``.
* **Atomic writes.** Outputs are written to a temporary file in the destination folder and moved
  into place with ``os.replace``. A crash, a full disk or a validation error therefore never leaves
  a half-written ``.seg.nrrd`` that Slicer (or a batch pipeline) would later pick up as a result.
* **Segmentations** are written as Slicer ``.seg.nrrd`` through ``slicerio`` (no Slicer needed):
  one segment per prompt, with name, colour, optional terminology, and the full prompt kept in the
  segment tag ``TextGuidedSeg.Prompt`` (shown by Slicer as a segment tag after loading).

Nothing here imports Slicer; SimpleITK, numpy and slicerio only.
"""

from __future__ import annotations

import logging
import os
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: LPS <-> RAS: flips the first two physical axes (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Segment tag holding the full prompt in a ``.seg.nrrd``.
PROMPT_TAG = "TextGuidedSeg.Prompt"
#: Segment tags with the model's answer: "found" / "not found", and the mean probability of the segment's voxels.
VERDICT_TAG = "TextGuidedSeg.Verdict"
CONFIDENCE_TAG = "TextGuidedSeg.Confidence"
#: Mean probability of its voxels below which a segment is reported "not found" (a faint answer).
CONFIDENCE_FOUND = 0.6


def verdict(voxels: int, confidence: float) -> str:
    """The answer reported with a segment (CLI summary, segment tags, Slicer panel): ``found``, or ``not
    found`` when no voxel passed the threshold or the voxels' mean probability is below CONFIDENCE_FOUND."""
    return "found" if voxels > 0 and confidence >= CONFIDENCE_FOUND else "not found"

#: Terminology context used when a terminology string comes without one (6 instead of 7 fields):
#: Slicer's "DICOM master list" (SegmentationCategoryTypeModifier-DICOM-Master.term.json, loaded by
#: default), the context of every entry terminology.py writes. Slicer documents the "3D Slicer
#: General Anatomy list" as a subset of it, and it has types that list lacks (Neoplasm,
#: Inflammation); Slicer matches codes on scheme + value, so either list's codes are found in it.
DEFAULT_TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"

VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".mha")
LABELMAP_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".mha")

_SAMPLES_DIR = Path(__file__).resolve().parent / "samples"

# ITU-R BT.601 luma weights, the ones PIL uses for RGB -> "L".
_LUMA = np.array([0.299, 0.587, 0.114])


# --------------------------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Volume:
    """A scalar image with its geometry.

    ``array`` is indexed ``(k, j, i)``; 2D images have shape ``(1, H, W)``. ``ijk_to_ras`` is a
    4x4 float64 matrix mapping ``(i, j, k, 1)`` to ``(R, A, S, 1)`` (millimetres, Slicer's RAS).
    The array keeps the file's dtype (no intensity scaling or casting).
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray
    source: str = ""
    colour: bool = False  # the file was a colour picture (converted to grey on reading)

    @property
    def spacing(self) -> Tuple[float, float, float]:
        """Voxel size (i, j, k) in mm: the column norms of ``ijk_to_ras``."""
        s = np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)
        return (float(s[0]), float(s[1]), float(s[2]))


class ImageReadError(ValueError):
    """An image could not be read or is not usable as a scalar volume.

    The message names the file and says what to do about it.
    """


def _has_suffix(path: Path, suffixes: Sequence[str]) -> Optional[str]:
    name = path.name.lower()
    for suffix in sorted(suffixes, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def _sitk_geometry_to_ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """4x4 IJK->RAS from a 2D or 3D SimpleITK image (LPS)."""
    dim = image.GetDimension()
    spacing = np.ones(3)
    origin = np.zeros(3)
    direction = np.eye(3)
    spacing[:dim] = image.GetSpacing()
    origin[:dim] = image.GetOrigin()
    direction[:dim, :dim] = np.array(image.GetDirection(), dtype=float).reshape(dim, dim)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * spacing[np.newaxis, :]
    ijk_to_lps[:3, 3] = origin
    return LPS_TO_RAS @ ijk_to_lps


def _check_ijk_to_ras(ijk_to_ras: np.ndarray) -> np.ndarray:
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"ijk_to_ras must be a 4x4 matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("ijk_to_ras contains NaN or infinite values")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"ijk_to_ras last row must be [0, 0, 0, 1], got {m[3].tolist()}")
    if np.any(np.linalg.norm(m[:3, :3], axis=0) <= 0) or abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise ValueError("ijk_to_ras is singular (a voxel axis has zero length or axes are parallel)")
    return m


def _ras_to_lps_geometry(ijk_to_ras: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(spacing, direction 3x3, origin) in LPS from a RAS IJK->RAS matrix."""
    ijk_to_lps = LPS_TO_RAS @ _check_ijk_to_ras(ijk_to_ras)
    columns = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    direction = columns / spacing[np.newaxis, :]
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        logger.warning("ijk_to_ras has non-orthogonal axes (sheared grid); some file formats "
                       "(NIfTI) and Slicer cannot represent it exactly")
    return spacing, direction, ijk_to_lps[:3, 3].copy()


def volume_to_sitk(array: np.ndarray, ijk_to_ras: np.ndarray) -> sitk.Image:
    """SimpleITK image (LPS geometry) from a ``(k, j, i)`` array and a RAS ``ijk_to_ras``.

    The exact inverse of the geometry ``read_volume`` computes: spacing = column norms of the 3x3
    part, direction = normalised columns (oblique directions are kept), origin = translation, all
    with x and y negated (RAS -> LPS). A 2D ``(H, W)`` array is treated as ``(1, H, W)``.
    bool arrays are stored as uint8 and float16 as float32 (SimpleITK has neither type).
    """
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3:
        raise ValueError(f"expected a (k, j, i) array, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    spacing, direction, origin = _ras_to_lps_geometry(ijk_to_ras)
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=False)
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in direction.ravel()])
    image.SetOrigin([float(v) for v in origin])
    return image


def _to_grey(image: sitk.Image, path: Path) -> sitk.Image:
    """Luminance (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B) of an RGB/RGBA image; alpha dropped.

    Integer inputs are rounded and stay in their dtype, so an 8-bit RGB JPEG gives uint8 grey
    (the same values as PIL's ``convert("L")`` up to rounding).
    """
    arr = sitk.GetArrayFromImage(image)  # (..., C)
    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp == 2:  # grey + alpha
        grey = arr[..., 0]
    else:
        grey = arr[..., :3].astype(np.float64) @ _LUMA
        if np.issubdtype(arr.dtype, np.integer):
            info = np.iinfo(arr.dtype)
            grey = np.clip(np.rint(grey), info.min, info.max).astype(arr.dtype)
        else:
            grey = grey.astype(arr.dtype)
    out = sitk.GetImageFromArray(grey, isVector=False)
    out.CopyInformation(image)
    logger.info("%s: %d-component colour image converted to luminance grey", path, ncomp)
    return out


def _read_dicom_series(path: Path) -> sitk.Image:
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    except RuntimeError as exc:
        raise ImageReadError(f"{path}: could not scan the folder for DICOM files ({exc})") from exc
    if not series_ids:
        raise ImageReadError(
            f"{path}: folder contains no DICOM series; give a DICOM folder or an image file "
            f"(NIfTI, NRRD, MHA, PNG, JPEG, TIFF)")
    if len(series_ids) > 1:
        logger.warning("%s: %d DICOM series found, reading the first (%s); put each series in "
                       "its own folder to choose", path, len(series_ids), series_ids[0])
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series_ids[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise ImageReadError(f"{path}: DICOM series {series_ids[0]} could not be read: "
                             f"{_short_itk_message(exc)}") from exc


def _short_itk_message(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with a file/line location; the useful part is usually the last line.
    return lines[-1] if lines else type(exc).__name__


def read_volume(path: PathLike) -> Volume:
    """Read a scalar image as a :class:`Volume` (array ``(k, j, i)``, RAS ``ijk_to_ras``).

    Formats: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``,
    ``.mhd``), PNG / JPEG / BMP / TIFF (2D: shape ``(1, H, W)``, spacing ``(sx, sy, 1)``), and a
    DICOM series given as a folder (the first series in the folder).

    2D RGB / RGBA images (photographs, endoscopy frames, screenshots of X-rays) are converted to
    luminance grey (0.299 R + 0.587 G + 0.114 B, alpha ignored); 2D grey+alpha images keep the
    grey channel. A 4D image whose 4th axis has length 1 is read as 3D.

    The dtype of the file is kept. Raises :class:`ImageReadError` for a missing or unreadable
    file, a 4D image, a multi-component 3D image, an empty image, or NaN / infinite voxels.
    """
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p}: file not found; check the path")
    if p.is_dir():
        image = _read_dicom_series(p)
    else:
        try:
            image = sitk.ReadImage(str(p))
        except RuntimeError as exc:
            raise ImageReadError(
                f"{p}: could not read the image ({_short_itk_message(exc)}); the file may be "
                f"corrupt, truncated or in an unsupported format. Supported: NIfTI, NRRD, MHA/MHD, "
                f"PNG, JPEG, BMP, TIFF, or a DICOM folder") from exc

    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 4:
        if size[3] == 1:
            image = sitk.Extract(image, [size[0], size[1], size[2], 0], [0, 0, 0, 0],
                                 sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
            dim = 3
        else:
            raise ImageReadError(
                f"{p}: 4D image (size {size}) is not supported; extract one 3D frame first "
                f"(for example with SimpleITK image[:, :, :, t] or Slicer's Sequences module)")
    if dim not in (2, 3):
        raise ImageReadError(f"{p}: {dim}D image (size {size}) is not supported; "
                             f"give a 2D or 3D scalar image")

    ncomp = image.GetNumberOfComponentsPerPixel()
    colour = ncomp in (3, 4)
    if ncomp > 1:
        is_2d = dim == 2 or size[2] == 1
        if is_2d and ncomp in (2, 3, 4):
            image = _to_grey(image, p)
        else:
            raise ImageReadError(
                f"{p}: image has {ncomp} components per voxel (vector / multi-channel image); "
                f"only scalar volumes and 2D RGB/RGBA images are supported. Extract one channel "
                f"first (for example with SimpleITK VectorIndexSelectionCast)")

    array = sitk.GetArrayFromImage(image)
    if dim == 2:
        array = array[np.newaxis]
    if array.size == 0:
        raise ImageReadError(f"{p}: image is empty (size {size}); check that the file is complete")
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
        n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if n_bad:
            raise ImageReadError(f"{p}: {n_bad} voxels are NaN or infinite; fix or mask them "
                                 f"before segmenting")
    if np.issubdtype(array.dtype, np.complexfloating):
        raise ImageReadError(f"{p}: complex-valued image; convert it to magnitude first")

    ijk_to_ras = _sitk_geometry_to_ijk_to_ras(image)
    logger.debug("read %s: shape %s dtype %s", p, array.shape, array.dtype)
    return Volume(array=array, ijk_to_ras=ijk_to_ras, source=str(p), colour=colour)


# --------------------------------------------------------------------------------------------
# Atomic writing
# --------------------------------------------------------------------------------------------


def _temp_path_for(path: Path, suffix: str) -> Path:
    """A fresh hidden file name in ``path``'s folder, ending with ``suffix`` so the writer picks the
    same format. Not created here (unlike ``mkstemp``), so the file gets the user's normal
    permissions rather than 0600."""
    base = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    return path.parent / f".{base}.{uuid.uuid4().hex[:12]}.tmp{suffix}"


def _atomic_write(path: Path, suffix: str, write) -> Path:
    """Call ``write(tmp_path)`` then move the temp file onto ``path``; clean up on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path_for(path, suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    return path


def _write_sitk(image: sitk.Image, path: Path, allowed: Sequence[str], what: str) -> Path:
    suffix = _has_suffix(path, allowed)
    if suffix is None:
        raise ValueError(f"{path}: cannot write a {what} with this extension; use one of "
                         f"{', '.join(allowed)}")

    def write(tmp: Path) -> None:
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(tmp))
        writer.SetUseCompression(True)
        writer.Execute(image)

    return _atomic_write(path, suffix, write)


def write_volume(path: PathLike, array: np.ndarray, ijk_to_ras: np.ndarray) -> Path:
    """Write a scalar volume (probability / uncertainty map, ...) atomically, compressed.

    Format by extension: ``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha``. The array dtype is kept
    (bool -> uint8, float16 -> float32). Returns the path written.
    """
    p = Path(path)
    arr = np.asarray(array)
    if arr.size == 0:
        raise ValueError(f"{p}: refusing to write an empty array (shape {arr.shape})")
    return _write_sitk(volume_to_sitk(arr, ijk_to_ras), p, VOLUME_EXTENSIONS, "volume")


def write_labelmap(path: PathLike, labels: np.ndarray, ijk_to_ras: np.ndarray) -> Path:
    """Write an integer label map atomically (uint8 if max < 256, else uint16), compressed.

    Format by extension: ``.nii``, ``.nii.gz``, ``.nrrd`` (or ``.mha``). Returns the path written.
    """
    p = Path(path)
    lab = np.asarray(labels)
    if lab.size == 0:
        raise ValueError(f"{p}: refusing to write an empty label map (shape {lab.shape})")
    if not (lab.dtype == np.bool_ or np.issubdtype(lab.dtype, np.integer)):
        if np.issubdtype(lab.dtype, np.floating) and np.all(np.isfinite(lab)) and np.all(lab == np.round(lab)):
            lab = lab.astype(np.int64)
        else:
            raise ValueError(f"{p}: label map must hold integers, got dtype {lab.dtype}")
    lo, hi = int(lab.min()), int(lab.max())
    if lo < 0:
        raise ValueError(f"{p}: label map has negative labels (min {lo})")
    if hi > np.iinfo(np.uint16).max:
        raise ValueError(f"{p}: label value {hi} does not fit in uint16")
    lab = lab.astype(np.uint8 if hi < 256 else np.uint16)
    return _write_sitk(volume_to_sitk(lab, ijk_to_ras), p, LABELMAP_EXTENSIONS, "label map")


# --------------------------------------------------------------------------------------------
# Slicer segmentations (.seg.nrrd)
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class SegmentSpec:
    """One segment of a segmentation.

    ``mask`` is bool / 0-1 with shape ``(k, j, i)`` (the reference volume's). ``color`` is RGB in
    0..1. ``prompt`` is stored in the segment tag ``TextGuidedSeg.Prompt``, ``tags`` as more segment
    tags (name -> text). ``terminology`` is an
    optional Slicer terminology entry string (``contextName~category~type~typeModifier~
    anatomicContextName~anatomicRegion~anatomicRegionModifier``; the form without the leading
    context name is accepted too).
    """

    name: str
    mask: np.ndarray
    color: Tuple[float, float, float] = (1.0, 0.0, 0.0)
    prompt: str = ""
    terminology: Optional[str] = None
    tags: Optional[dict] = None  # more segment tags, e.g. TextGuidedSeg.Verdict / TextGuidedSeg.Confidence


def _header_text(text: str, what: str, *, tag: bool) -> str:
    """Make ``text`` safe for a NRRD header value (ASCII, one line; no '|' inside a tag).

    pynrrd writes headers as ASCII and a newline ends a header field; Slicer splits segment tags
    on '|'. Accented letters are transliterated (é -> e), other non-ASCII characters become '?'.
    """
    out = " ".join(str(text).splitlines())
    if tag:
        out = out.replace("|", "/")
    if not out.isascii():
        decomposed = unicodedata.normalize("NFKD", out)
        out = "".join(c for c in decomposed if not unicodedata.combining(c))
        out = out.encode("ascii", "replace").decode("ascii")
    if out != text:
        logger.warning("%s %r stored as %r (.seg.nrrd headers are single-line ASCII)", what, text, out)
    return out


def _canonical_terminology(term: str, segment_name: str) -> dict:
    import slicerio

    text = term.strip().rstrip("|")
    parts = text.split("~")
    if len(parts) == 6:
        parts = [DEFAULT_TERMINOLOGY_CONTEXT] + parts
    if len(parts) != 7:
        raise ValueError(
            f"segment {segment_name!r}: terminology {term!r} is not a Slicer terminology entry "
            f"(expected 7 '~'-separated fields: context~category~type~typeModifier~"
            f"anatomicContext~anatomicRegion~anatomicRegionModifier)")
    for field_index in (1, 2):
        if len(parts[field_index].split("^")) != 3 or not parts[field_index].split("^")[1]:
            raise ValueError(f"segment {segment_name!r}: terminology {term!r} needs a category and "
                             f"a type coded as scheme^value^meaning")
    return slicerio.segmentation.terminology_entry_from_string("~".join(parts))


def _mask_bool(mask: np.ndarray, name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 2:
        m = m[np.newaxis]
    if m.ndim != 3:
        raise ValueError(f"segment {name!r}: mask must be (k, j, i), got shape {m.shape}")
    if m.dtype == np.bool_:
        return m
    if np.issubdtype(m.dtype, np.integer):
        return m != 0
    if np.issubdtype(m.dtype, np.floating):
        if np.all((m == 0) | (m == 1)):
            return m != 0
        raise ValueError(f"segment {name!r}: float mask has values other than 0 and 1; "
                         f"threshold the probabilities first")
    raise ValueError(f"segment {name!r}: unsupported mask dtype {m.dtype}")


def write_segmentation(path: PathLike, segments: List[SegmentSpec], ijk_to_ras: np.ndarray,
                       *, shape: Optional[Sequence[int]] = None) -> Path:
    """Write segments to a Slicer ``.seg.nrrd`` (via slicerio), atomically.

    Each segment gets its own label value 1..N. Segments that do not overlap share a layer; a
    segment that overlaps one already placed goes to the next layer where it fits (a 4D
    "list domain domain domain" NRRD, as Slicer itself stores overlapping segments), so no
    segment loses voxels. The full prompt goes into the segment tag ``TextGuidedSeg.Prompt``.

    ``shape`` is the reference volume's ``(k, j, i)`` shape; by default the first mask's shape.
    Raises ValueError for no segments, a mask of the wrong shape, an empty or duplicate name,
    a colour outside 0..1, or a malformed terminology string; nothing is written then.
    """
    import slicerio

    p = Path(path)
    if not p.name.lower().endswith(".nrrd"):
        raise ValueError(f"{p}: a Slicer segmentation must be written as .seg.nrrd")
    if not p.name.lower().endswith(".seg.nrrd"):
        logger.warning("%s: Slicer recognises segmentation files by the .seg.nrrd extension", p)
    segments = list(segments)
    if not segments:
        raise ValueError(f"{p}: no segments to write")
    ijk_to_lps = LPS_TO_RAS @ _check_ijk_to_ras(ijk_to_ras)

    masks = [_mask_bool(s.mask, s.name) for s in segments]
    ref_shape = tuple(int(v) for v in shape) if shape is not None else masks[0].shape
    if len(ref_shape) == 2:
        ref_shape = (1,) + ref_shape
    if len(ref_shape) != 3 or min(ref_shape) < 1:
        raise ValueError(f"{p}: reference shape must be (k, j, i), got {ref_shape}")
    seen = set()
    for seg, m in zip(segments, masks):
        if not isinstance(seg.name, str) or not seg.name.strip():
            raise ValueError(f"{p}: segment names must be non-empty (got {seg.name!r})")
        if seg.name in seen:
            raise ValueError(f"{p}: duplicate segment name {seg.name!r}; names must be unique")
        seen.add(seg.name)
        if m.shape != ref_shape:
            raise ValueError(f"{p}: mask of segment {seg.name!r} has shape {m.shape}, "
                             f"expected the reference volume shape {ref_shape} (k, j, i)")
        color = np.asarray(seg.color, dtype=float)
        if color.shape != (3,) or not np.all(np.isfinite(color)) or color.min() < 0 or color.max() > 1:
            raise ValueError(f"{p}: colour of segment {seg.name!r} must be 3 values in 0..1, "
                             f"got {seg.color!r}")

    n = len(segments)
    if n > np.iinfo(np.uint16).max:
        raise ValueError(f"{p}: too many segments ({n})")
    dtype = np.uint8 if n < 256 else np.uint16

    # Greedy layer packing: first layer where the segment overlaps nothing already placed.
    layers: List[np.ndarray] = []  # each (k, j, i)
    layer_of: List[int] = []
    for index, m in enumerate(masks):
        for li, layer in enumerate(layers):
            if not np.any(layer[m]):
                break
        else:
            layers.append(np.zeros(ref_shape, dtype=dtype))
            li = len(layers) - 1
        layers[li][m] = index + 1
        layer_of.append(li)

    # slicerio writes with index_order "F": spatial axes (i, j, k), layer axis first.
    if len(layers) == 1:
        voxels = layers[0].transpose(2, 1, 0)
    else:
        voxels = np.stack(layers).transpose(0, 3, 2, 1)
    full_extent = [0, ref_shape[2] - 1, 0, ref_shape[1] - 1, 0, ref_shape[0] - 1]

    seg_dicts = []
    for index, (seg, li) in enumerate(zip(segments, layer_of)):
        entry = {
            "id": f"Segment_{index + 1}",
            "name": _header_text(seg.name, "segment name", tag=False),
            "nameAutoGenerated": False,
            "color": [float(c) for c in seg.color],
            "colorAutoGenerated": False,
            "labelValue": index + 1,
            "layer": li,
            # Full extent on purpose: older Slicer versions cropped a layer to its first segment's extent.
            "extent": full_extent,
        }
        if seg.terminology:
            entry["terminology"] = _canonical_terminology(seg.terminology, seg.name)
        tags = {PROMPT_TAG: seg.prompt} if seg.prompt else {}
        tags.update(seg.tags or {})
        if tags:
            entry["tags"] = {_header_text(k, "tag name", tag=True): _header_text(str(v), "tag", tag=True)
                             for k, v in tags.items()}
        seg_dicts.append(entry)

    segmentation = {
        "voxels": voxels,
        "ijkToLPS": ijk_to_lps,
        "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": seg_dicts,
    }

    def write(tmp: Path) -> None:
        slicerio.write_segmentation(str(tmp), segmentation)

    suffix = ".seg.nrrd" if p.name.lower().endswith(".seg.nrrd") else ".nrrd"
    _atomic_write(p, suffix, write)
    logger.debug("wrote %s: %d segments in %d layer(s)", p, n, len(layers))
    return p


def read_segmentation(path: PathLike) -> Tuple[List[SegmentSpec], np.ndarray]:
    """Read a ``.seg.nrrd`` (ours or Slicer's) back as ``(segments, ijk_to_ras)``.

    Masks are bool ``(k, j, i)`` on the file's voxel grid; ``ijk_to_ras`` is RAS. The prompt
    comes from the ``TextGuidedSeg.Prompt`` tag ("" when absent), the terminology as a 7-field
    Slicer terminology string (None when absent).
    """
    import slicerio

    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"{p}: segmentation file not found; check the path")
    try:
        seg = slicerio.read_segmentation(str(p))
    except Exception as exc:  # pynrrd / slicerio raise several exception types
        raise ImageReadError(f"{p}: could not read as a Slicer segmentation ({exc})") from exc
    voxels = seg.get("voxels")
    if voxels is None or voxels.ndim not in (3, 4):
        raise ImageReadError(f"{p}: segmentation has no 3D voxel data")
    ijk_to_ras = LPS_TO_RAS @ np.asarray(seg["ijkToLPS"], dtype=np.float64)

    out: List[SegmentSpec] = []
    for entry in seg.get("segments", []):
        mask_ijk = slicerio.segment_mask(seg, entry)
        mask = np.ascontiguousarray(np.asarray(mask_ijk, dtype=bool).transpose(2, 1, 0))
        color = tuple(float(c) for c in entry.get("color", (1.0, 0.0, 0.0)))[:3]
        term = entry.get("terminology")
        term_str = slicerio.segmentation.terminology_entry_to_string(term) if term else None
        out.append(SegmentSpec(
            name=str(entry.get("name", entry.get("id", ""))),
            mask=mask,
            color=color,  # type: ignore[arg-type]
            prompt=str(entry.get("tags", {}).get(PROMPT_TAG, "")),
            terminology=term_str,
            tags={k: str(v) for k, v in entry.get("tags", {}).items() if k != PROMPT_TAG} or None,
        ))
    return out, ijk_to_ras


# --------------------------------------------------------------------------------------------
# Shipped samples
# --------------------------------------------------------------------------------------------


def _available_samples() -> List[str]:
    if not _SAMPLES_DIR.is_dir():
        return []
    return sorted(f.relative_to(_SAMPLES_DIR).as_posix() for f in _SAMPLES_DIR.rglob("*")
                  if f.is_file() and not f.name.startswith("."))


def sample_path(name: str) -> Path:
    """Path of a sample file shipped with the package, e.g. ``sample_path("brain1_image.nrrd")``
    or ``sample_path("qata/cxr_s11242-e20020-r1.png")`` (see ``samples/README.md``).

    Raises FileNotFoundError listing the available samples.
    """
    candidate = (_SAMPLES_DIR / name).resolve()
    inside = candidate == _SAMPLES_DIR or _SAMPLES_DIR in candidate.parents
    if inside and candidate.is_file():
        return candidate
    raise FileNotFoundError(f"no sample named {name!r}; available: {', '.join(_available_samples())}")
