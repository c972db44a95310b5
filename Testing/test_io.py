"""Tests for TextGuidedSegLib.io: volumes, geometry (LPS vs RAS), label maps, .seg.nrrd, samples."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from TextGuidedSegLib import io as tio
from TextGuidedSegLib.io import ImageReadError, SegmentSpec

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
KVASIR_IMAGES = SHARED / "kvasir" / "images"
PYRADIOMICS = SHARED / "volumes" / "pyradiomics"

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_ijk_to_ras() -> np.ndarray:
    """Oblique, anisotropic, off-origin grid."""
    m = np.eye(4)
    m[:3, :3] = _rotation(0.3, -0.2, 0.5) @ np.diag([0.7, 1.3, 2.5])
    m[:3, 3] = [-12.5, 34.25, -56.0]
    return m


def ras_of(ijk_to_ras: np.ndarray, i: int, j: int, k: int) -> np.ndarray:
    return (ijk_to_ras @ np.array([i, j, k, 1.0]))[:3]


# ------------------------------------------------------------------------------------------
# Volumes and geometry
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz", ".nii", ".mha"])
def test_volume_round_trip_oblique(tmp_path, ext):
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 3000, size=(4, 5, 6)).astype(np.int16)  # (k, j, i)
    m = oblique_ijk_to_ras()
    path = tio.write_volume(tmp_path / f"vol{ext}", array, m)
    assert path == tmp_path / f"vol{ext}"
    assert sorted(os.listdir(tmp_path)) == [f"vol{ext}"]  # no temp file left behind

    vol = tio.read_volume(path)
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, array)
    np.testing.assert_allclose(vol.ijk_to_ras, m, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vol.spacing, [0.7, 1.3, 2.5], rtol=1e-6)

    # Physical points: our RAS == SimpleITK's LPS with x, y negated; and array[k, j, i] == pixel (i, j, k)
    image = sitk.ReadImage(str(path))
    for i, j, k in [(0, 0, 0), (5, 0, 0), (0, 4, 0), (0, 0, 3), (5, 4, 3), (2, 3, 1)]:
        lps = np.array(image.TransformIndexToPhysicalPoint((i, j, k)))
        np.testing.assert_allclose(ras_of(vol.ijk_to_ras, i, j, k), lps * [-1, -1, 1], atol=1e-5)
        np.testing.assert_allclose(ras_of(vol.ijk_to_ras, i, j, k), ras_of(m, i, j, k), atol=1e-4)
        assert vol.array[k, j, i] == image.GetPixel(i, j, k)


def test_volume_to_sitk_inverse_geometry():
    m = oblique_ijk_to_ras()
    image = tio.volume_to_sitk(np.zeros((3, 4, 5), np.float32), m)
    assert image.GetSize() == (5, 4, 3)
    np.testing.assert_allclose(image.GetSpacing(), [0.7, 1.3, 2.5], rtol=1e-12)
    # origin and direction are the RAS ones with x, y negated
    np.testing.assert_allclose(image.GetOrigin(), [12.5, -34.25, -56.0], atol=1e-12)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction, np.diag([-1, -1, 1]) @ _rotation(0.3, -0.2, 0.5), atol=1e-12)
    # and back
    np.testing.assert_allclose(tio._sitk_geometry_to_ijk_to_ras(image), m, atol=1e-12)


def test_write_volume_float_and_bad_extension(tmp_path):
    prob = np.linspace(0, 1, 2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    vol = tio.read_volume(tio.write_volume(tmp_path / "prob.nrrd", prob, np.eye(4)))
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, prob)
    with pytest.raises(ValueError, match="extension"):
        tio.write_volume(tmp_path / "prob.png", prob, np.eye(4))
    assert sorted(os.listdir(tmp_path)) == ["prob.nrrd"]


@pytest.mark.parametrize("max_label, dtype", [(7, np.uint8), (255, np.uint8), (300, np.uint16)])
def test_write_labelmap_dtype(tmp_path, max_label, dtype):
    labels = np.zeros((2, 3, 4), np.int64)
    labels[1, 2, 3] = max_label
    labels[0, 0, 0] = 1
    m = oblique_ijk_to_ras()
    for ext in (".nrrd", ".nii.gz"):
        vol = tio.read_volume(tio.write_labelmap(tmp_path / f"lab{ext}", labels, m))
        assert vol.array.dtype == dtype
        np.testing.assert_array_equal(vol.array, labels)
        np.testing.assert_allclose(vol.ijk_to_ras, m, rtol=1e-6, atol=1e-6)


def test_write_labelmap_rejects_negative_and_float(tmp_path):
    with pytest.raises(ValueError, match="negative"):
        tio.write_labelmap(tmp_path / "l.nrrd", -np.ones((1, 2, 2), np.int16), np.eye(4))
    with pytest.raises(ValueError, match="integers"):
        tio.write_labelmap(tmp_path / "l.nrrd", np.full((1, 2, 2), 0.5), np.eye(4))
    assert os.listdir(tmp_path) == []


def test_read_brain1_sample():
    path = tio.sample_path("brain1_image.nrrd")
    image = sitk.ReadImage(str(path))
    assert image.GetSize() == (256, 256, 13)

    vol = tio.read_volume(path)
    assert vol.array.shape == (13, 256, 256)
    assert vol.array.dtype == np.int16
    assert vol.source == str(path)
    # LPS: spacing 0.78125 x 0.78125 x 6.5, direction 1 0 0 / 0 -1 0 / 0 0 1,
    # origin (-99.609375, 99.609375, -78.0 + 8 * 6.5) (the sample is slices k = 8..20 of the original).
    expected = np.array([
        [-0.78125, 0.0, 0.0, 99.609375],
        [0.0, 0.78125, 0.0, -99.609375],
        [0.0, 0.0, 6.5, -26.0],
        [0.0, 0.0, 0.0, 1.0],
    ])
    np.testing.assert_allclose(vol.ijk_to_ras, expected, atol=1e-9)
    np.testing.assert_allclose(vol.array, sitk.GetArrayFromImage(image))

    label = tio.read_volume(tio.sample_path("brain1_label.nrrd"))
    assert label.array.shape == (13, 256, 256)
    np.testing.assert_allclose(label.ijk_to_ras, expected, atol=1e-9)
    assert set(np.unique(label.array).tolist()) == {0, 1}
    assert int(label.array.sum()) == 4137
    assert np.nonzero(label.array.any(axis=(1, 2)))[0].tolist() == [3, 4, 5, 6, 7, 8, 9]


@pytest.mark.skipif(not (PYRADIOMICS / "brain1_image.nrrd").exists(), reason="shared data bundle not present")
def test_brain1_sample_is_exact_crop_of_original():
    original = tio.read_volume(PYRADIOMICS / "brain1_image.nrrd")
    sample = tio.read_volume(tio.sample_path("brain1_image.nrrd"))
    np.testing.assert_array_equal(sample.array, original.array[8:21])
    # voxel (i, j, 0) of the sample is voxel (i, j, 8) of the original
    np.testing.assert_allclose(ras_of(sample.ijk_to_ras, 10, 20, 0), ras_of(original.ijk_to_ras, 10, 20, 8), atol=1e-9)
    original_label = tio.read_volume(PYRADIOMICS / "brain1_label.nrrd")
    sample_label = tio.read_volume(tio.sample_path("brain1_label.nrrd"))
    np.testing.assert_array_equal(sample_label.array, original_label.array[8:21])
    assert int(original_label.array.sum()) == int(sample_label.array.sum())


QATA_SAMPLES = {
    "cxr_s11242-e20020-r1": "left",
    "cxr_s11234-e19977-r1": "right",
    "cxr_s11247-e20029-r1": "bilateral",
}


@pytest.mark.parametrize("case_id, side", sorted(QATA_SAMPLES.items()))
def test_qata_samples_png(case_id, side):
    vol = tio.read_volume(tio.sample_path(f"qata/{case_id}.png"))
    assert vol.array.shape == (1, 224, 224)
    assert vol.array.dtype == np.uint8
    assert 0 < vol.array.mean() < 255
    np.testing.assert_allclose(vol.ijk_to_ras, LPS_TO_RAS)  # spacing 1, origin 0, identity direction

    mask = tio.read_volume(tio.sample_path(f"qata/{case_id}_mask.png")).array[0]
    assert set(np.unique(mask).tolist()) == {0, 255}
    report = tio.sample_path(f"qata/{case_id}.txt").read_text(encoding="utf-8")
    fg = mask > 127
    left_fraction = fg[:, :112].sum() / fg.sum()  # "left" = image's left half in QaTa reports
    if side == "left":
        assert report.startswith("unilateral") and "left lung" in report and "right lung" not in report
        assert left_fraction > 0.9
    elif side == "right":
        assert report.startswith("unilateral") and "right lung" in report and "left lung" not in report
        assert left_fraction < 0.1
    else:
        assert report.startswith("bilateral")
        assert 0.2 < left_fraction < 0.8


def _kvasir_jpeg() -> Path:
    files = sorted(KVASIR_IMAGES.glob("*.jpg")) if KVASIR_IMAGES.is_dir() else []
    if not files:
        pytest.skip("Kvasir images not present")
    return files[0]


def test_rgb_jpeg_to_grey():
    path = _kvasir_jpeg()
    vol = tio.read_volume(path)
    assert vol.array.shape == (1, 256, 256)
    assert vol.array.dtype == np.uint8
    rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float64)  # (H, W, 3)
    expected = np.rint(0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2])
    diff = np.abs(vol.array[0].astype(np.int32) - expected)
    assert diff.max() <= 1  # 1 = rounding of values that land on .5 up to float error
    assert (diff == 0).mean() > 0.999
    # channels really differ in this image, so grey is not just one channel
    assert not np.array_equal(rgb[..., 0], rgb[..., 1])


def test_rgba_png_to_grey(tmp_path):
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 1] = 100
    rgba[..., 2] = 50
    rgba[..., 3] = 7  # alpha ignored
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(tmp_path / "c.png"))
    vol = tio.read_volume(tmp_path / "c.png")
    assert vol.array.shape == (1, 3, 4)
    assert vol.array.dtype == np.uint8
    assert np.all(vol.array == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50))  # 124


def test_png_2d_geometry(tmp_path):
    grey = (np.arange(12, dtype=np.uint8) * 20).reshape(3, 4)
    image = sitk.GetImageFromArray(grey)
    image.SetSpacing((0.5, 0.25))
    image.SetOrigin((3.0, -4.0))
    sitk.WriteImage(image, str(tmp_path / "g.mha"))  # PNG cannot store geometry; MHA can in 2D
    vol = tio.read_volume(tmp_path / "g.mha")
    assert vol.array.shape == (1, 3, 4)
    np.testing.assert_array_equal(vol.array[0], grey)
    np.testing.assert_allclose(vol.ijk_to_ras, [[-0.5, 0, 0, -3.0], [0, -0.25, 0, 4.0], [0, 0, 1, 0], [0, 0, 0, 1]])


def test_dicom_series_folder(tmp_path):
    array = (np.arange(3 * 6 * 5, dtype=np.int16).reshape(3, 6, 5) * 7)
    series_uid = "1.2.826.0.1.3680043.2.1125.1.42"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(3):
        slice_image = sitk.GetImageFromArray(array[k])
        slice_image.SetSpacing((0.8, 0.9))
        for tag, value in [
            ("0008|0060", "CT"), ("0020|000e", series_uid), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1.41"),
            ("0008|0018", f"{series_uid}.{k + 1}"), ("0020|0013", str(k + 1)),
            ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0032", f"10\\20\\{30 + 2.5 * k}"),
            ("0018|0050", "2.5"), ("0028|0030", "0.9\\0.8"),
        ]:
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"slice{k}.dcm"))
        writer.Execute(slice_image)
    vol = tio.read_volume(tmp_path)
    assert vol.array.shape == (3, 6, 5)
    np.testing.assert_array_equal(vol.array, array)
    np.testing.assert_allclose(vol.ijk_to_ras, [[-0.8, 0, 0, -10], [0, -0.9, 0, -20], [0, 0, 2.5, 30], [0, 0, 0, 1]], atol=1e-4)


def test_empty_folder_is_not_dicom(tmp_path):
    with pytest.raises(ImageReadError, match="no DICOM series") as info:
        tio.read_volume(tmp_path)
    assert str(tmp_path) in str(info.value)


# ------------------------------------------------------------------------------------------
# Read errors
# ------------------------------------------------------------------------------------------


def test_error_missing_file(tmp_path):
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(ImageReadError, match="not found") as info:
        tio.read_volume(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_error_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.nrrd"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ImageReadError, match="could not read") as info:
        tio.read_volume(path)
    assert str(path) in str(info.value)


def test_error_truncated_nrrd(tmp_path):
    good = tio.write_volume(tmp_path / "good.nrrd", np.arange(1000, dtype=np.float32).reshape(10, 10, 10), np.eye(4))
    data = good.read_bytes()
    bad = tmp_path / "truncated.nrrd"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as info:
        tio.read_volume(bad)
    assert str(bad) in str(info.value)


def test_error_4d(tmp_path):
    path = tmp_path / "four.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.float32), isVector=False), str(path))
    assert sitk.ReadImage(str(path)).GetDimension() == 4
    with pytest.raises(ImageReadError, match="4D") as info:
        tio.read_volume(path)
    assert str(path) in str(info.value)


def test_4d_with_single_frame_is_3d(tmp_path):
    path = tmp_path / "one_frame.nrrd"
    data = np.arange(60, dtype=np.int16).reshape(1, 3, 4, 5)
    image = sitk.GetImageFromArray(data, isVector=False)
    image.SetSpacing((0.5, 0.6, 0.7, 1.0))
    image.SetOrigin((1.0, 2.0, 3.0, 0.0))
    sitk.WriteImage(image, str(path))
    assert sitk.ReadImage(str(path)).GetSize() == (5, 4, 3, 1)
    vol = tio.read_volume(path)
    np.testing.assert_array_equal(vol.array, data[0])
    np.testing.assert_allclose(vol.ijk_to_ras, [[-0.5, 0, 0, -1], [0, -0.6, 0, -2], [0, 0, 0.7, 3], [0, 0, 0, 1]])


def test_error_nan(tmp_path):
    data = np.ones((3, 4, 5), np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    path = tmp_path / "nan.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(data), str(path))
    with pytest.raises(ImageReadError, match="2 voxels are NaN or infinite") as info:
        tio.read_volume(path)
    assert str(path) in str(info.value)


def test_error_vector_volume(tmp_path):
    path = tmp_path / "vec.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.float32), isVector=True), str(path))
    with pytest.raises(ImageReadError, match="3 components") as info:
        tio.read_volume(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------------------
# Segmentations (.seg.nrrd)
# ------------------------------------------------------------------------------------------

TERMINOLOGY_IN = ("SCT^123037004^Anatomical Structure~SCT^39607008^Lung~^^~"
                  "Anatomic codes - DICOM master list~^^~^^|")
# a 6-field entry gets Slicer's "DICOM master list" context (the one terminology.py writes)
TERMINOLOGY_OUT = ("Segmentation category and type - DICOM master list~" + TERMINOLOGY_IN.rstrip("|"))


def test_default_terminology_context_is_the_one_style_for_writes():
    from TextGuidedSegLib import terminology

    assert tio.DEFAULT_TERMINOLOGY_CONTEXT == terminology.SEGMENTATION_CONTEXT
    assert TERMINOLOGY_OUT.split("~")[0] == tio.DEFAULT_TERMINOLOGY_CONTEXT


def _two_overlapping_segments(shape=(6, 7, 8)):
    lung = np.zeros(shape, bool)
    lung[1:5, 1:6, 1:4] = True
    lesion = np.zeros(shape, bool)
    lesion[2:4, 2:4, 2:7] = True  # overlaps lung and extends outside it
    assert (lung & lesion).any() and (lesion & ~lung).any()
    return [
        SegmentSpec("left lung", lung, (0.2, 0.4, 0.6), "left lung", TERMINOLOGY_IN),
        SegmentSpec("infection", lesion.astype(np.uint8), (1.0, 0.5, 0.0),
                    "bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."),
    ]


def test_segmentation_round_trip_overlapping(tmp_path):
    segments = _two_overlapping_segments()
    m = oblique_ijk_to_ras()
    path = tio.write_segmentation(tmp_path / "out.seg.nrrd", segments, m)
    assert sorted(os.listdir(tmp_path)) == ["out.seg.nrrd"]

    back, m_back = tio.read_segmentation(path)
    np.testing.assert_allclose(m_back, m, atol=1e-9)
    assert [s.name for s in back] == ["left lung", "infection"]
    assert [s.prompt for s in back] == [s.prompt for s in segments]
    for original, read in zip(segments, back):
        np.testing.assert_allclose(read.color, original.color, atol=1e-6)
        assert read.mask.dtype == np.bool_
        np.testing.assert_array_equal(read.mask, np.asarray(original.mask, bool))
    assert back[0].terminology == TERMINOLOGY_OUT
    assert back[1].terminology is None

    import slicerio
    raw = slicerio.read_segmentation(str(path))
    assert raw["voxels"].ndim == 4  # overlap -> two layers
    assert [s["labelValue"] for s in raw["segments"]] == [1, 2]
    assert raw["segments"][0]["tags"]["TextGuidedSeg.Prompt"] == "left lung"


def test_segmentation_non_overlapping_single_layer(tmp_path):
    a = np.zeros((2, 3, 4), bool)
    a[0] = True
    b = np.zeros((2, 3, 4), bool)
    b[1, 1:, 2:] = True
    path = tio.write_segmentation(tmp_path / "s.seg.nrrd", [SegmentSpec("a", a), SegmentSpec("b", b, (0, 1, 0))], np.eye(4))
    import slicerio
    raw = slicerio.read_segmentation(str(path))
    assert raw["voxels"].ndim == 3
    np.testing.assert_array_equal(raw["voxels"].transpose(2, 1, 0), a * 1 + b * 2)
    back, _ = tio.read_segmentation(path)
    np.testing.assert_array_equal(back[0].mask, a)
    np.testing.assert_array_equal(back[1].mask, b)
    assert back[0].prompt == "" and back[0].color == (1.0, 0.0, 0.0)


def test_segmentation_prompt_made_header_safe(tmp_path):
    mask = np.ones((1, 2, 2), bool)
    path = tio.write_segmentation(tmp_path / "p.seg.nrrd", [SegmentSpec("opacité", mask, prompt="a | b\nc")], np.eye(4))
    back, _ = tio.read_segmentation(path)
    assert back[0].name == "opacite"
    assert back[0].prompt == "a / b c"


def _slicer_scene():
    slicer = pytest.importorskip("slicer", reason="PyPI slicer-core (Python >= 3.10 wheels only) is needed for MRML")
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    seg_logic.SetMRMLScene(scene)
    seg_logic.SetMRMLApplicationLogic(app_logic)
    app_logic.SetModuleLogic("Segmentations", seg_logic)
    return slicer, scene, seg_logic


def test_segmentation_loads_in_slicer_mrml(tmp_path):
    slicer, scene, seg_logic = _slicer_scene()
    import vtk
    from vtk.util import numpy_support

    segments = _two_overlapping_segments()
    m = oblique_ijk_to_ras()
    path = tio.write_segmentation(tmp_path / "out.seg.nrrd", segments, m)

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1

    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    for index, spec in enumerate(segments):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetNthSegment(index)
        assert segment.GetName() == spec.name
        np.testing.assert_allclose(segment.GetColor(), spec.color, atol=1e-6)
        prompt = vtk.reference("")
        assert segment.GetTag("TextGuidedSeg.Prompt", prompt)
        assert str(prompt) == spec.prompt

        # voxels and geometry as Slicer sees them
        image = slicer.vtkOrientedImageData()
        seg_logic.GetSegmentBinaryLabelmapRepresentation(node, segment_id, image, False)
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        image_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        np.testing.assert_allclose(image_to_ras, m, atol=1e-6)
        extent = image.GetExtent()
        assert extent[0::2] == (0, 0, 0)
        dims = image.GetDimensions()
        voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
        np.testing.assert_array_equal(voxels == segment.GetLabelValue(), np.asarray(spec.mask, bool))


def test_segmentation_validation_errors_leave_no_file(tmp_path):
    good = np.zeros((2, 3, 4), bool)
    cases = [
        ([], "no segments"),
        ([SegmentSpec("a", good), SegmentSpec("b", np.zeros((2, 3, 5), bool))], "shape"),
        ([SegmentSpec("  ", good)], "non-empty"),
        ([SegmentSpec("a", good), SegmentSpec("a", good)], "duplicate"),
        ([SegmentSpec("a", good, color=(0, 2, 0))], "colour"),
        ([SegmentSpec("a", good.astype(np.float32) + 0.5)], "threshold"),
        ([SegmentSpec("a", good, terminology="not a terminology")], "terminology"),
    ]
    for segments, message in cases:
        with pytest.raises(ValueError, match=message):
            tio.write_segmentation(tmp_path / "x.seg.nrrd", segments, np.eye(4))
    with pytest.raises(ValueError, match="shape"):
        tio.write_segmentation(tmp_path / "x.seg.nrrd", [SegmentSpec("a", good)], np.eye(4), shape=(2, 3, 5))
    assert os.listdir(tmp_path) == []


def test_segmentation_write_failure_is_atomic(tmp_path, monkeypatch):
    import slicerio

    path = tmp_path / "x.seg.nrrd"
    mask = np.ones((2, 3, 4), bool)
    tio.write_segmentation(path, [SegmentSpec("old", mask)], np.eye(4))
    before = path.read_bytes()

    def failing_write(file, segmentation, **kwargs):
        Path(file).write_bytes(b"NRRD0004\npartial")
        raise OSError("disk full")

    monkeypatch.setattr(slicerio, "write_segmentation", failing_write)
    with pytest.raises(OSError, match="disk full"):
        tio.write_segmentation(path, [SegmentSpec("new", mask)], np.eye(4))
    assert os.listdir(tmp_path) == ["x.seg.nrrd"]
    assert path.read_bytes() == before


# ------------------------------------------------------------------------------------------
# Samples
# ------------------------------------------------------------------------------------------


def test_sample_path():
    assert tio.sample_path("brain1_label.nrrd").is_file()
    assert tio.sample_path("LICENSE.pyradiomics.txt").read_text(encoding="utf-8").startswith("Copyright 2017 Harvard Medical School")
    with pytest.raises(FileNotFoundError, match="brain1_image.nrrd"):
        tio.sample_path("nothing.nrrd")
    with pytest.raises(FileNotFoundError):
        tio.sample_path("../io.py")


def test_samples_small():
    root = tio.sample_path("README.md").parent
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert total < 2 * 1024 * 1024
