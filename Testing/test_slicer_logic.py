"""The Slicer module's Logic on real MRML (PyPI slicer-core, no Slicer application), the batch
script, and the module's packaging (UI file, CMake file list, Python requirements).

The model is a tiny random TMC: these tests check plumbing (names, colours, tags, voxels,
geometry, all-or-nothing writes), not accuracy. The threshold is set at the median of the
random model's probabilities so that the label maps compared voxel by voxel are not empty.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import threading
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

slicer = pytest.importorskip("slicer", reason="PyPI slicer-core is needed for the Slicer logic tests")
import vtk  # noqa: E402  (slicer-core brings vtk)

from conftest import make_tiny_prolearn_with_bank, make_tiny_svp_config, make_tiny_tmc_config  # noqa: E402
from TextGuidedSegLib.checkpoint import save_pretrained  # noqa: E402
from TextGuidedSegLib.engine import SegmentationCancelled, segment_volume  # noqa: E402
from TextGuidedSegLib.io import read_segmentation, read_volume, sample_path, write_volume  # noqa: E402
from TextGuidedSegLib.model_store import load_model  # noqa: E402
from TextGuidedSegLib.models import build_model  # noqa: E402
from TextGuidedSegLib.terminology import style_for  # noqa: E402
from widget_harness import headless_widget, run_event_loop  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "TextGuidedSeg"
MODULE_FILE = MODULE_DIR / "TextGuidedSeg.py"
BATCH_SCRIPT = MODULE_DIR / "Scripts" / "batch_segment.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "TextGuidedSeg.ui"
ICON_FILE = MODULE_DIR / "Resources" / "Icons" / "TextGuidedSeg.png"

PROMPTS = ["lung infection", "a round structure near the centre, bright"]
NAMES = ["lung infection", "a round structure near the centre"]


def _element(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _tag(segment, name: str) -> str | None:
    value = vtk.reference("")
    return value.get() if segment.GetTag(name, value) else None


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tgs():
    """The module file, imported in plain Python (its Logic must not need slicer.app)."""
    sys.path.insert(0, str(MODULE_DIR))
    try:
        import TextGuidedSeg
    finally:
        sys.path.remove(str(MODULE_DIR))
    assert not TextGuidedSeg.IN_SLICER_APP
    return TextGuidedSeg


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_pretrained(build_model(make_tiny_tmc_config()), tmp_path_factory.mktemp("models") / "tiny-tmc")


@pytest.fixture(scope="module")
def brain1():
    return read_volume(sample_path("brain1_image.nrrd"))


@pytest.fixture(scope="module")
def reference(brain1, tiny_model_dir):
    """(threshold, engine results) for PROMPTS: the engine run directly, the ground truth of the Logic."""
    model = load_model(str(tiny_model_dir), device="cpu")
    probe = segment_volume(brain1.array, brain1.ijk_to_ras, PROMPTS[:1], model, device="cpu", return_probability=True)
    threshold = float(np.median(probe[0].probability))
    results = segment_volume(brain1.array, brain1.ijk_to_ras, PROMPTS, model, device="cpu", threshold=threshold,
                             return_probability=True)
    for r in results:  # the comparison means something only when labels are mixed
        assert 0.05 < r.labels.mean() < 0.95
    return threshold, results


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    yield scene
    scene.Clear(1)


@pytest.fixture
def logic(tgs):
    return tgs.TextGuidedSegLogic()


@pytest.fixture
def volume_node(scene, logic, brain1):
    return logic.addVolumeFromArray(scene, brain1.array, brain1.ijk_to_ras, "brain1")


def _run(logic, volume_node, tiny_model_dir, threshold, segmentation_node=None, **kwargs):
    return logic.process(volume_node, PROMPTS, str(tiny_model_dir), segmentation_node, threshold=threshold,
                         device="cpu", **kwargs)


def _segment_ids(segmentation_node) -> list[str]:
    return list(segmentation_node.GetSegmentation().GetSegmentIDs())


def _export(scene, tgs, segmentation_node, segment_id, volume_node) -> tuple[np.ndarray, np.ndarray]:
    """A segment as a (k, j, i) array on the volume's grid, through the Segmentations module logic,
    leaving the scene as it was. Returns (array, the labelmap's IJK->RAS)."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    try:
        assert tgs.TextGuidedSegLogic.segmentationsLogic(scene).ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, volume_node)
        array = slicer.util.arrayFromVolume(labelmap).copy()
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetIJKToRASMatrix(matrix)
        return array, _element(matrix)
    finally:
        for node_id in [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]:
            if node_id not in before:
                scene.RemoveNode(scene.GetNodeByID(node_id))


# --------------------------------------------------------------------------------------------
# the Logic on real MRML
# --------------------------------------------------------------------------------------------


def test_volume_node_geometry(logic, volume_node, brain1):
    np.testing.assert_allclose(logic.ijkToRasArray(volume_node), brain1.ijk_to_ras, atol=1e-9)
    np.testing.assert_array_equal(logic.volumeArray(volume_node), brain1.array)
    # voxel (i, j, k) lands where SimpleITK (LPS) puts it, x and y negated
    image = sitk.ReadImage(str(sample_path("brain1_image.nrrd")))
    matrix = logic.ijkToRasArray(volume_node)
    for ijk in [(0, 0, 0), (255, 0, 0), (0, 255, 12), (17, 200, 5)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose((matrix @ (*ijk, 1))[:3], lps * [-1, -1, 1], atol=1e-6)


def test_process_segments_match_engine(tgs, scene, logic, volume_node, tiny_model_dir, reference):
    threshold, expected = reference
    steps = []
    node = _run(logic, volume_node, tiny_model_dir, threshold, progress=lambda d, t: steps.append((d, t)))
    assert node.GetScene() is scene
    assert steps[-1] == (26, 26)  # 13 slices x 2 prompts

    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    ids = _segment_ids(node)
    for index, (segment_id, prompt, name, result) in enumerate(zip(ids, PROMPTS, NAMES, expected)):
        segment = segmentation.GetSegment(segment_id)
        assert segment.GetName() == name
        np.testing.assert_allclose(segment.GetColor(), style_for(prompt, index).color, atol=1e-6)
        assert _tag(segment, tgs.PROMPT_TAG) == prompt
        assert _tag(segment, tgs.MODEL_TAG) == "tiny-tmc"
        # the answer: mean probability of the labelled voxels, and the verdict it gives
        confidence = float(result.probability[result.labels != 0].mean())
        assert abs(float(_tag(segment, tgs.CONFIDENCE_TAG)) - confidence) < 1e-3
        assert _tag(segment, tgs.VERDICT_TAG) == ("found" if confidence >= 0.6 else "not found") == result.verdict
        array, matrix = _export(scene, tgs, node, segment_id, volume_node)
        assert array.shape == result.labels.shape
        np.testing.assert_array_equal(array != 0, result.labels != 0)
        np.testing.assert_allclose(matrix, logic.ijkToRasArray(volume_node), atol=1e-9)

    terminology = _tag(segmentation.GetSegment(ids[0]), "TerminologyEntry")
    assert terminology is not None and terminology.startswith(
        "Segmentation category and type - DICOM master list~SCT^49755003^Morphologically Altered Structure~"
        "SCT^23583003^Inflammation~")
    assert terminology.startswith("Segmentation category and type")
    assert len(terminology.split("~")) == 7
    # no known structure in the prompt: no coded type of ours (Slicer may add its generic default)
    assert "23583003" not in (_tag(segmentation.GetSegment(ids[1]), "TerminologyEntry") or "")

    # reference image geometry = the input volume (matrix and extent)
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    assert node.GetNodeReference(role) is volume_node
    geometry = segmentation.GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    values = [float(v) for v in geometry.strip(";").split(";")]
    np.testing.assert_allclose(np.reshape(values[:16], (4, 4)), logic.ijkToRasArray(volume_node), atol=1e-9)
    assert values[16:] == [0, 255, 0, 255, 0, 12]


def test_second_run_adds_unique_segments(tgs, scene, logic, volume_node, tiny_model_dir, reference):
    threshold, _ = reference
    node = _run(logic, volume_node, tiny_model_dir, threshold)
    first_ids = _segment_ids(node)
    before = {i: _export(scene, tgs, node, i, volume_node)[0] for i in first_ids}
    colours = {i: node.GetSegmentation().GetSegment(i).GetColor() for i in first_ids}

    assert _run(logic, volume_node, tiny_model_dir, threshold, node) is node
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 4
    ids = _segment_ids(node)
    assert ids[:2] == first_ids
    names = [segmentation.GetSegment(i).GetName() for i in ids]
    assert names == NAMES + [f"{n} (2)" for n in NAMES]
    for segment_id in first_ids:  # untouched
        segment = segmentation.GetSegment(segment_id)
        np.testing.assert_array_equal(_export(scene, tgs, node, segment_id, volume_node)[0], before[segment_id])
        assert segment.GetColor() == colours[segment_id]
    # same prompts, same model: the new segments hold the same voxels
    for old, new in zip(first_ids, ids[2:]):
        np.testing.assert_array_equal(_export(scene, tgs, node, new, volume_node)[0], before[old])


def test_cancel_leaves_scene_unchanged(scene, logic, volume_node, tiny_model_dir, reference):
    threshold, _ = reference
    node = _run(logic, volume_node, tiny_model_dir, threshold)
    nodes, ids = scene.GetNumberOfNodes(), _segment_ids(node)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(SegmentationCancelled):
        _run(logic, volume_node, tiny_model_dir, threshold, node, cancel=cancel)
    with pytest.raises(SegmentationCancelled):  # into a new segmentation: none is created
        _run(logic, volume_node, tiny_model_dir, threshold, probability=True, cancel=cancel)
    assert scene.GetNumberOfNodes() == nodes
    assert _segment_ids(node) == ids


def test_cancel_midway_from_progress(scene, logic, volume_node, tiny_model_dir, reference):
    """Cancel set while running (as the GUI's Cancel does): stops after the current batch."""
    threshold, _ = reference
    nodes = scene.GetNumberOfNodes()
    cancel = threading.Event()
    calls = []

    def progress(done, total):
        calls.append(done)
        cancel.set()

    with pytest.raises(SegmentationCancelled):
        logic.process(volume_node, PROMPTS, str(tiny_model_dir), threshold=threshold, device="cpu",
                      progress=progress, cancel=cancel)
    assert len(calls) == 1 and scene.GetNumberOfNodes() == nodes


def test_probability_volumes(tgs, scene, logic, volume_node, tiny_model_dir, reference):
    threshold, expected = reference
    before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    node = _run(logic, volume_node, tiny_model_dir, threshold, probability=True)
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == before + 2
    assert node.GetNumberOfNodeReferences(tgs.PROBABILITY_REFERENCE_ROLE) == 2
    for index, (segment_id, result) in enumerate(zip(_segment_ids(node), expected)):
        volume = node.GetNthNodeReference(tgs.PROBABILITY_REFERENCE_ROLE, index)
        assert volume.IsA("vtkMRMLScalarVolumeNode") and not volume.IsA("vtkMRMLLabelMapVolumeNode")
        assert volume.GetAttribute(tgs.SEGMENT_ID_ATTRIBUTE) == segment_id
        assert volume.GetAttribute(tgs.PROMPT_TAG) == PROMPTS[index]
        np.testing.assert_allclose(logic.ijkToRasArray(volume), logic.ijkToRasArray(volume_node), atol=1e-12)
        np.testing.assert_array_equal(logic.volumeArray(volume), result.probability)


def test_uncertainty_volumes(tgs, scene, logic, volume_node, reference):
    """Models that sample (SVP-CVAE) return an uncertainty map: it becomes a volume like the probability."""
    import dataclasses

    _, expected = reference
    sampled = [dataclasses.replace(r, probability=None, uncertainty=np.full(r.labels.shape, 0.25, np.float32))
               for r in expected]
    written = logic.write_results(volume_node, sampled)
    assert written.probabilityNodes == [None, None]
    node = written.segmentationNode
    assert node.GetNumberOfNodeReferences(tgs.UNCERTAINTY_REFERENCE_ROLE) == 2
    for volume, segment_id in zip(written.uncertaintyNodes, written.segmentIds):
        assert volume.GetAttribute(tgs.SEGMENT_ID_ATTRIBUTE) == segment_id
        assert np.all(logic.volumeArray(volume) == 0.25)
        np.testing.assert_allclose(logic.ijkToRasArray(volume), logic.ijkToRasArray(volume_node), atol=1e-12)


def test_process_with_a_sampling_model(tgs, scene, logic, volume_node, brain1, tmp_path):
    """A model that samples masks (SVP-CVAE) gives each prompt an uncertainty volume equal to the
    engine's, on the input's geometry; the panel's sample count reaches the engine."""
    torch.manual_seed(0)
    model_dir = save_pretrained(build_model(make_tiny_svp_config()).eval(), tmp_path / "tiny-svp")
    node = logic.process(volume_node, ["tumour"], str(model_dir), threshold=0.4, device="cpu", samples=3)
    expected = segment_volume(brain1.array, brain1.ijk_to_ras, ["tumour"], load_model(str(model_dir), device="cpu"),
                              threshold=0.4, device="cpu", samples=3)[0]
    assert node.GetNumberOfNodeReferences(tgs.UNCERTAINTY_REFERENCE_ROLE) == 1
    volume = node.GetNthNodeReference(tgs.UNCERTAINTY_REFERENCE_ROLE, 0)
    np.testing.assert_allclose(logic.volumeArray(volume), expected.uncertainty, atol=1e-7)
    np.testing.assert_allclose(logic.ijkToRasArray(volume), logic.ijkToRasArray(volume_node), atol=1e-12)
    # a model that does not sample ignores the sample count (no error, no uncertainty volume)
    tmc_dir = save_pretrained(build_model(make_tiny_tmc_config()).eval(), tmp_path / "tiny-tmc")
    node = logic.process(volume_node, ["tumour"], str(tmc_dir), device="cpu", samples=3)
    assert node.GetNumberOfNodeReferences(tgs.UNCERTAINTY_REFERENCE_ROLE) == 0


def test_text_free_model_runs_without_a_prompt(tgs, scene, logic, volume_node, brain1, tiny_model_dir, tmp_path):
    """An empty prompt list is accepted for text-free models (ProLearn) only: one segment named
    'segmentation', voxel for voxel the engine's; a text-guided model refuses and writes nothing."""
    model_dir = save_pretrained(make_tiny_prolearn_with_bank(), tmp_path / "tiny-prolearn")
    assert logic.modelIsTextFree(str(model_dir))
    assert not logic.modelIsTextFree(str(tiny_model_dir)) and not logic.modelIsTextFree(None)
    loaded = load_model(str(model_dir), device="cpu")
    probe = segment_volume(brain1.array, brain1.ijk_to_ras, None, loaded, device="cpu", return_probability=True)[0]
    threshold = float(np.median(probe.probability))
    node = logic.process(volume_node, "", str(model_dir), device="cpu", threshold=threshold)
    [segment_id] = _segment_ids(node)
    segment = node.GetSegmentation().GetSegment(segment_id)
    assert segment.GetName() == "segmentation" and (_tag(segment, tgs.PROMPT_TAG) or "") == ""
    array, _ = _export(scene, tgs, node, segment_id, volume_node)
    expected = segment_volume(brain1.array, brain1.ijk_to_ras, None, loaded, device="cpu", threshold=threshold)[0]
    assert 0.05 < expected.labels.mean() < 0.95
    np.testing.assert_array_equal(array != 0, expected.labels != 0)
    before = scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="needs a text prompt"):
        logic.process(volume_node, [], str(tiny_model_dir), device="cpu")
    assert scene.GetNumberOfNodes() == before


def test_brain_prompts_give_named_coloured_coded_segments(tgs, scene, logic):
    """Several brain prompts, several segments (issue 20): each named after its prompt (made unique),
    with Slicer's colour where it has one and the TerminologyEntry tag with the side modifier; a
    structure Slicer has no entry for gets no coded type. Synthetic results on a small volume: the
    naming and styling of write_results, without a brain model."""
    from TextGuidedSegLib.engine import SegmentResult

    prompts = ["left hippocampus", "right hippocampus", "hippocampus, left side", "both thalami", "right putamen",
               "3rd ventricle", "left ventral DC"]
    shape = (3, 8, 8)
    volume = logic.addVolumeFromArray(scene, np.zeros(shape, np.float32), np.diag([-1.0, -1.0, 1.0, 1.0]), "small")
    results = []
    for value, prompt in enumerate(prompts, 1):
        labels = np.zeros(shape, np.uint8)
        labels.flat[value * 7] = 1
        results.append(SegmentResult(prompt=prompt, model_prompt=prompt, labels=labels, voxels=1, confidence=0.9))
    node = logic.write_results(volume, results).segmentationNode
    segmentation = node.GetSegmentation()
    ids = _segment_ids(node)
    assert [segmentation.GetSegment(i).GetName() for i in ids] == [
        "left hippocampus", "right hippocampus", "left hippocampus (2)", "both thalami", "right putamen",
        "3rd ventricle", "left ventral DC"]
    entries = []
    for index, (segment_id, prompt) in enumerate(zip(ids, prompts)):
        segment = segmentation.GetSegment(segment_id)
        style = style_for(prompt, index)
        np.testing.assert_allclose(segment.GetColor(), style.color, atol=1e-6)
        assert _tag(segment, tgs.PROMPT_TAG) == prompt
        entries.append(_tag(segment, "TerminologyEntry"))
        if style.terminology:
            assert entries[-1] == style.terminology
    assert "~SCT^5366008^Hippocampus~SCT^7771000^Left~" in entries[0]
    assert "~SCT^5366008^Hippocampus~SCT^24028007^Right~" in entries[1]
    assert entries[2] == entries[0]
    assert "~SCT^42695009^Thalamus~SCT^51440002^Right and left~" in entries[3]
    assert "~SCT^89278009^Putamen~SCT^24028007^Right~" in entries[4]
    np.testing.assert_allclose(segmentation.GetSegment(ids[4]).GetColor(), np.array([210, 157, 166]) / 255, atol=1e-6)
    assert "~SCT^49841001^Third ventricle~^^~" in entries[5]
    assert "123037004" not in (entries[6] or "")  # ventral DC: no coded type of ours
    for segment_id, result in zip(ids, results):
        array, _ = _export(scene, tgs, node, segment_id, volume)
        np.testing.assert_array_equal(array != 0, result.labels != 0)


def test_write_results_is_all_or_nothing(scene, logic, volume_node, reference, monkeypatch):
    _, expected = reference
    node = logic.write_results(volume_node, expected[:1]).segmentationNode
    nodes, ids = scene.GetNumberOfNodes(), _segment_ids(node)
    original = logic._setSegmentLabelmap
    calls = []

    def fail_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        original(*args)

    monkeypatch.setattr(logic, "_setSegmentLabelmap", fail_second)
    with pytest.raises(RuntimeError, match="disk full"):  # into the existing segmentation
        logic.write_results(volume_node, expected, node)
    assert _segment_ids(node) == ids and scene.GetNumberOfNodes() == nodes
    calls.clear()
    with pytest.raises(RuntimeError, match="disk full"):  # into a new one, with probability volumes
        logic.write_results(volume_node, expected)
    assert scene.GetNumberOfNodes() == nodes


def test_bad_inputs_fail_clearly(scene, logic, volume_node, tiny_model_dir, reference):
    threshold, expected = reference
    nodes = scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="no input volume"):
        logic.process(None, PROMPTS, str(tiny_model_dir))
    with pytest.raises(ValueError, match="prompt"):
        logic.process(volume_node, ["", "  "], str(tiny_model_dir), device="cpu")
    other = slicer.vtkMRMLScene().AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(ValueError, match="scene"):
        logic.write_results(volume_node, expected, other)
    wrong = [type(expected[0])(prompt="x", model_prompt="x", labels=np.zeros((2, 3, 4), np.uint8))]
    with pytest.raises(ValueError, match="shape"):
        logic.write_results(volume_node, wrong)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    moved = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    moved.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(ValueError, match="different transforms"):  # refused before inference
        logic.process(volume_node, PROMPTS, str(tiny_model_dir), moved, device="cpu")
    scene.RemoveNode(moved)
    scene.RemoveNode(transform)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(ValueError, match="no voxels"):
        logic.process(empty, PROMPTS, str(tiny_model_dir))
    scene.RemoveNode(empty)
    assert scene.GetNumberOfNodes() == nodes


def test_single_slice_xray(tgs, scene, logic, tiny_model_dir):
    """A 2D chest X-ray (read as a one-slice volume) goes through the same path."""
    xray = read_volume(sample_path("qata/cxr_s11242-e20020-r1.png"))
    node = logic.addVolumeFromArray(scene, xray.array, xray.ijk_to_ras, "cxr")
    model = load_model(str(tiny_model_dir), device="cpu")
    prompt = "unilateral pulmonary infection, lower left lung"
    expected = segment_volume(xray.array, xray.ijk_to_ras, [prompt], model, device="cpu", threshold=0.466,
                              prompt_laterality="image")[0]
    segmentation_node = logic.process(node, prompt, str(tiny_model_dir), threshold=0.466, device="cpu",
                                      laterality="image")
    segment_id = _segment_ids(segmentation_node)[0]
    assert segmentation_node.GetSegmentation().GetSegment(segment_id).GetName() == "unilateral pulmonary infection"
    array, _ = _export(scene, tgs, segmentation_node, segment_id, node)
    assert array.shape == (1, 224, 224)
    np.testing.assert_array_equal(array != 0, expected.labels != 0)


def test_module_self_test_runs_without_slicer_app(tgs, tiny_model_dir):
    """TextGuidedSegTest (Slicer's 'Reload and Test') also runs in plain Python."""
    test = tgs.TextGuidedSegTest()
    test.modelPath = str(tiny_model_dir)
    test.runTest()
    assert not test.plumbingOnly


def test_module_self_test_without_torch_skips_with_message(tgs, monkeypatch, caplog):
    real = tgs.importlib.util.find_spec
    monkeypatch.setattr(tgs.importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    test = tgs.TextGuidedSegTest()
    with caplog.at_level("INFO", logger=tgs.logger.name):
        test.runTest()  # 'Reload and Test': returns, does not fail
        with pytest.raises(unittest.SkipTest, match="torch is not installed: install the PyTorch extension"):
            test.test_TextGuidedSeg_brain1()  # unittest / ctest: a skip
    assert "torch is not installed: install the PyTorch extension" in caplog.text


def test_module_self_test_says_random_model_is_plumbing_only(tgs, monkeypatch, caplog, tmp_path):
    from TextGuidedSegLib import model_store

    monkeypatch.setattr(model_store, "list_models", lambda: [])  # the default model is "not installed"
    test = tgs.TextGuidedSegTest()
    with caplog.at_level("INFO", logger=tgs.logger.name):
        path = test._model(str(tmp_path))
    assert Path(path).is_dir() and test.plumbingOnly
    assert "tiny RANDOM model" in caplog.text and "plumbing check only" in caplog.text


# --------------------------------------------------------------------------------------------
# the Widget's run path without Qt: Apply -> child process -> polled events -> nodes
# --------------------------------------------------------------------------------------------


@pytest.fixture
def app_scene(scene, monkeypatch):
    """``scene`` as the application's scene (the widget looks nodes up in ``slicer.mrmlScene``)."""
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    return scene


@pytest.fixture
def errors_shown(monkeypatch) -> list:
    """What ``slicer.util.errorDisplay`` would have shown: (text, keyword arguments) per call."""
    shown = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: shown.append((text, kw)), raising=False)
    return shown


def _node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def test_opening_the_panel_does_not_import_torch():
    """The panel lists the models and checks the default one as it opens (setup / enter): none of that
    may import torch, which freezes the GUI for seconds; torch loads in the child process at Apply."""
    code = ("import sys; sys.path.insert(0, 'TextGuidedSeg'); import TextGuidedSeg as m; "
            "from TextGuidedSegLib.model_store import DEFAULT_MODEL, list_models; "
            "L = m.TextGuidedSegLogic; "
            "names = [e.name for e in list_models()]; "
            "print(DEFAULT_MODEL in names, L.modelIsTextFree(None), L.modelIsTextFree('prolearn-qata-cpu-1pct'), "
            "L.modelNeedsDownload(None), L.missingPythonRequirements(), 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False", "True", "False", "[]", "False"]


def _wrap_worker_poll(monkeypatch) -> list:
    """Every event the panel reads from its child processes, in order."""
    from TextGuidedSegLib.worker import WorkerJob

    seen = []
    poll = WorkerJob.poll
    monkeypatch.setattr(WorkerJob, "poll", lambda self: (lambda events: (seen.extend(events), events)[1])(poll(self)))
    return seen


@pytest.fixture
def make_widget(tgs):
    """``headless_widget`` for this module; each widget's child process is ended (and checked gone) afterwards."""
    made = []

    def make(*args, **kwargs):
        widget = headless_widget(tgs, *args, **kwargs)
        made.append(widget)
        return widget

    yield make
    for widget in made:
        worker = widget.logic._worker
        widget.logic.stopWorker()
        if worker is not None:
            assert not worker.alive and not worker.folder.exists()


def _started(events: list) -> list:
    return [e for e in events if e["event"] == "started"]


def test_widget_segments_in_a_child_process(tgs, app_scene, errors_shown, volume_node, tiny_model_dir, reference,
                                            monkeypatch, make_widget):
    """Apply runs inference in another Python process; the polls (here between 20 ms waits that keep the
    GIL, as Slicer's event loop does) report its progress and, at the end, write the same segments as
    the in-process engine, voxel for voxel. The child stays loaded: a second Apply reuses it."""
    threshold, expected = reference
    events = _wrap_worker_poll(monkeypatch)
    widget = make_widget(volume_node, str(tiny_model_dir), "\n".join(PROMPTS), threshold=threshold)

    widget.onApplyButton()
    run = widget._job.run
    assert widget._timer.active and run.pid != os.getpid()
    assert widget.ui.applyButton.text == "Cancel" and widget.ui.progressBar.visible
    loop = run_event_loop(widget, gil_held_between_polls=0.02, timeout=120)

    (started,) = _started(events)
    assert started["pid"] == run.pid != os.getpid() and started["warm"] is False
    assert started["python"] == "%d.%d.%d" % sys.version_info[:3]
    assert not run.job_dir.exists() and run.worker.alive  # job folder gone, child kept for the next run
    assert widget._job is None and not widget._timer.active and not widget.ui.progressBar.visible
    assert widget.ui.applyButton.text == "Apply" and widget.ui.applyButton.enabled
    answers = ", ".join(f"{n} ({r.verdict})" for n, r in zip(NAMES, expected))
    assert widget.ui.statusLabel.text.startswith("Done in ") and widget.ui.statusLabel.text.endswith(answers)
    assert "Loading model…" in widget.ui.statusLabel.history
    values = [v for v, _ in widget.ui.progressBar.history if v]
    assert values == sorted(values) and widget.ui.progressBar.history[-1] == (26, 26)  # 13 slices x 2 prompts
    assert loop.polls >= 2

    node = widget._parameterNode.outputSegmentation  # the new segmentation becomes the panel's output
    assert node is not None and node.GetScene() is app_scene
    ids = _segment_ids(node)
    segments = [node.GetSegmentation().GetSegment(i) for i in ids]
    assert [s.GetName() for s in segments] == NAMES
    assert [_tag(s, tgs.PROMPT_TAG) for s in segments] == PROMPTS
    assert _tag(segments[0], tgs.MODEL_TAG) == load_model(str(tiny_model_dir)).name
    for segment_id, result in zip(ids, expected):
        np.testing.assert_array_equal(_export(app_scene, tgs, node, segment_id, volume_node)[0] != 0,
                                      result.labels != 0)
    assert not errors_shown

    widget.onApplyButton()  # a second Apply adds to the same segmentation, never overwrites ...
    run_event_loop(widget, timeout=120)
    assert [node.GetSegmentation().GetSegment(i).GetName() for i in _segment_ids(node)] == (
        NAMES + [f"{n} (2)" for n in NAMES])
    second = _started(events)[1]  # ... in the same, already loaded child
    assert second["pid"] == started["pid"] and second["warm"] is True


@pytest.mark.skipif(not os.environ.get("TEXTGUIDEDSEG_TEST_PYTHON39"),
                    reason="set TEXTGUIDEDSEG_TEST_PYTHON39 to a Python 3.9 with the library's requirements "
                           "(.ci/run does) to run the panel's child process on Slicer 5.6 / 5.8's Python")
def test_widget_child_process_on_python39(tgs, app_scene, errors_shown, volume_node, tiny_model_dir, reference,
                                          monkeypatch, make_widget):
    """The panel with its child on Python 3.9, numpy < 2 (what Slicer 5.6 / 5.8 run): same voxels."""
    threshold, expected = reference
    monkeypatch.setenv(tgs.TextGuidedSegLogic.WORKER_PYTHON_VARIABLE, os.environ["TEXTGUIDEDSEG_TEST_PYTHON39"])
    events = _wrap_worker_poll(monkeypatch)
    widget = make_widget(volume_node, str(tiny_model_dir), "\n".join(PROMPTS), threshold=threshold)
    widget.onApplyButton()
    run_event_loop(widget, timeout=300)
    assert not errors_shown, errors_shown
    assert _started(events)[0]["python"].startswith("3.9.")
    node = widget._parameterNode.outputSegmentation
    for segment_id, result in zip(_segment_ids(node), expected):
        np.testing.assert_array_equal(_export(app_scene, tgs, node, segment_id, volume_node)[0] != 0,
                                      result.labels != 0)


def _one_slice_per_batch(widget) -> None:
    """Many small batches, so that a run is still going when the test acts on its first progress event."""
    start = widget.logic.startInference
    widget.logic.startInference = lambda *a, **kw: start(*a, **dict(kw, batchSize=1))


def test_widget_cancel_mid_run_stops_the_child(tgs, app_scene, errors_shown, volume_node, tiny_model_dir,
                                               reference, monkeypatch, make_widget):
    threshold, _ = reference
    events = _wrap_worker_poll(monkeypatch)
    widget = make_widget(volume_node, str(tiny_model_dir), "\n".join(PROMPTS), threshold=threshold)
    _one_slice_per_batch(widget)
    before = _node_ids(app_scene)

    def cancel_at_first_batch(w) -> None:
        if w._job is not None and w.ui.applyButton.text == "Cancel" and w.ui.applyButton.enabled and any(
                e["event"] == "progress" for e in events):
            w.onApplyButton()  # the button reads "Cancel"
            assert w._job.run.cancelled and not w.ui.applyButton.enabled
            assert w.ui.statusLabel.text == "Cancelling…"

    widget.onApplyButton()
    run = widget._job.run
    run_event_loop(widget, timeout=120, on_poll=cancel_at_first_batch)

    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["done"] < progress[-1]["total"] == 26  # it stopped part-way
    assert events[-1] == {"event": "cancelled"} and not run.job_dir.exists()
    assert widget.ui.statusLabel.text == "Cancelled: the scene was not changed."
    assert widget.ui.applyButton.text == "Apply" and widget.ui.applyButton.enabled
    assert _node_ids(app_scene) == before and widget._parameterNode.outputSegmentation is None
    assert not errors_shown

    widget.onApplyButton()  # the child stopped its job cleanly and serves the next one
    run_event_loop(widget, timeout=120)
    assert widget.ui.statusLabel.text.startswith("Done in ")
    assert _started(events)[1]["pid"] == _started(events)[0]["pid"]


_CRASHING_WORKER = """
import ctypes, os, signal, sys
from TextGuidedSegLib import engine, worker

segment_volume = engine.segment_volume

def crash_after_first_batch(*args, progress=None, **kwargs):
    def report(done, total):
        progress(done, total)
        if {how!r} == "segfault":
            ctypes.string_at(0)  # reads address 0: SIGSEGV, as a crashing native library would
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
    return segment_volume(*args, progress=report, **kwargs)

engine.segment_volume = crash_after_first_batch
sys.exit(worker.main())
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("how, expected, detail", [
    ("segfault", "Segmentation failed: the inference process crashed (SIGSEGV) before it finished; "
                 "the scene was not changed", "Fatal Python error: Segmentation fault"),
    ("sigkill", "Segmentation failed: the inference process was killed (SIGKILL) before it finished, most likely "
                "by the system because memory ran out: close other programs, segment fewer prompts at a time, "
                "or use another device; the scene was not changed", "TextGuidedSeg inference worker"),
])
def test_widget_survives_a_child_that_crashes(tgs, app_scene, errors_shown, volume_node, tiny_model_dir, reference,
                                              tmp_path, monkeypatch, make_widget, how, expected, detail):
    """The real worker dies mid-run (a segfault, or SIGKILL as from the out-of-memory killer): one clear
    message with the end of the child's log, nothing written, existing segments untouched, Apply again."""
    threshold, _ = reference
    script = tmp_path / "crashing_worker.py"
    script.write_text(_CRASHING_WORKER.format(how=how), encoding="utf-8")
    monkeypatch.setattr(tgs.TextGuidedSegLogic, "workerCommand", classmethod(lambda cls: [sys.executable, str(script)]))
    events = _wrap_worker_poll(monkeypatch)
    segmentation = app_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "existing")
    segmentation.GetSegmentation().AddEmptySegment("kept", "kept")
    before = _node_ids(app_scene)
    widget = make_widget(volume_node, str(tiny_model_dir), "\n".join(PROMPTS), threshold=threshold,
                         outputSegmentation=segmentation)
    widget.onApplyButton()
    run = widget._job.run
    run_event_loop(widget, timeout=120)

    assert any(e["event"] == "progress" for e in events)  # it died mid-run, after the first batch
    (text, kw), = errors_shown
    assert text == expected
    assert detail in kw["detailedText"]  # the end of the child's log: its crash report, or its last words
    assert widget.ui.statusLabel.text == "Failed: " + expected[len("Segmentation failed: "):]
    assert widget.ui.applyButton.text == "Apply" and widget.ui.applyButton.enabled
    assert not run.worker.alive and not run.job_dir.exists()
    assert _node_ids(app_scene) == before and _segment_ids(segmentation) == ["kept"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_widget_survives_a_child_killed_from_outside(tgs, app_scene, errors_shown, volume_node, tiny_model_dir,
                                                     reference, monkeypatch, make_widget):
    threshold, _ = reference
    events = _wrap_worker_poll(monkeypatch)
    widget = make_widget(volume_node, str(tiny_model_dir), "\n".join(PROMPTS), threshold=threshold)
    _one_slice_per_batch(widget)
    before = _node_ids(app_scene)
    killed = []

    def kill_at_first_batch(w) -> None:
        if not killed and w._job is not None and any(e["event"] == "progress" for e in events):
            os.kill(w._job.run.pid, 9)
            killed.append(w._job.run)

    widget.onApplyButton()
    run_event_loop(widget, timeout=120, on_poll=kill_at_first_batch)
    (text, kw), = errors_shown
    assert text.startswith("Segmentation failed: the inference process was killed (SIGKILL) before it finished")
    assert not killed[0].worker.alive and not killed[0].job_dir.exists()
    assert _node_ids(app_scene) == before and widget._parameterNode.outputSegmentation is None
    widget.onApplyButton()  # the panel works again afterwards, in a new child
    run_event_loop(widget, timeout=120)
    assert widget.ui.statusLabel.text.startswith("Done in ")
    assert _started(events)[-1]["pid"] != killed[0].pid and not killed[0].worker.folder.exists()


@pytest.mark.parametrize("answer", [False, True])
def test_widget_asks_before_segmenting_an_input_the_model_does_not_fit(tgs, app_scene, errors_shown, volume_node,
                                                                       monkeypatch, make_widget, answer):
    """brain1 is an MR volume; the default model reads chest X-rays: the panel asks first (no torch needed
    for the check), and runs only if the user says so."""
    asked = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, title="", **kw: (
        asked.append((text, title)), answer)[1], raising=False)
    before = _node_ids(app_scene)
    widget = make_widget(volume_node, "tmc-qata-cpu", "brain tumour")
    widget.onApplyButton()
    (text, title), = asked
    assert title == "Input does not fit the model"
    assert text.startswith("model 'tmc-qata-cpu' is for chest X-ray, 2D pictures; prompts: ")
    assert "the input is a 3D volume (13 x 256 x 256 voxels), not a single picture" in text
    assert text.endswith("Segment anyway?")
    if not answer:
        assert widget._job is None and not widget._timer.active and not errors_shown
        assert widget.ui.statusLabel.text == "Not run: the input does not fit model 'tmc-qata-cpu'."
        assert _node_ids(app_scene) == before
        return
    run_event_loop(widget, timeout=300)
    assert widget.ui.statusLabel.text.startswith("Done in ") and not errors_shown
    node = widget._parameterNode.outputSegmentation
    assert _tag(node.GetSegmentation().GetNthSegment(0), tgs.MODEL_TAG) == "tmc-qata-cpu"  # the name users type


def test_widget_reports_errors_and_writes_nothing(tgs, app_scene, errors_shown, volume_node, tmp_path, reference,
                                                  make_widget):
    before = _node_ids(app_scene)
    broken = tmp_path / "broken-model"  # a model folder whose config cannot be read: fails in the child
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    widget = make_widget(volume_node, str(broken), PROMPTS[0])
    widget.onApplyButton()
    run = widget._job.run
    run_event_loop(widget, timeout=120)  # the child's traceback is shown on the main thread
    (text, kw), = errors_shown
    assert text.startswith("Segmentation failed: ") and "broken-model" in text and "config.json" in text
    assert kw["detailedText"].startswith("Traceback") and "CheckpointError" in kw["detailedText"]
    assert widget.ui.statusLabel.text.startswith("Failed: ") and widget.ui.applyButton.text == "Apply"
    assert not run.job_dir.exists() and run.worker.alive  # an error ends the run, not the child

    errors_shown.clear()
    widget._parameterNode.modelName = str(tmp_path / "no-such-model")  # refused at Apply, before any process
    widget.onApplyButton()
    assert widget._job is None and not widget._timer.active
    (text, _), = errors_shown
    assert text.startswith("Could not start the segmentation: model ") and "no-such-model' not found" in text

    errors_shown.clear()
    widget._parameterNode.inputVolume = None  # refused before any process starts
    widget.onApplyButton()
    assert widget._job is None and not widget._timer.active
    (text, _), = errors_shown
    assert text == "Could not start the segmentation: no input volume selected"
    assert _node_ids(app_scene) == before


def test_widget_drops_results_when_the_scene_closes(tgs, app_scene, errors_shown, volume_node, tiny_model_dir,
                                                    reference, make_widget):
    threshold, _ = reference
    widget = make_widget(volume_node, str(tiny_model_dir), PROMPTS[0], threshold=threshold)
    before = _node_ids(app_scene)
    widget.onApplyButton()
    run = widget._job.run
    widget.onSceneStartClose(None, None)
    assert run.cancelled and widget._parameterNode is None
    run_event_loop(widget, timeout=60)
    assert widget.ui.statusLabel.text == "Stopped: the scene was closed."
    assert _node_ids(app_scene) == before and not errors_shown
    assert widget.ui.applyButton.text == "Apply" and not widget.ui.applyButton.enabled  # no volume selected now
    assert not run.job_dir.exists()


# --------------------------------------------------------------------------------------------
# batch script
# --------------------------------------------------------------------------------------------


def _batch(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(BATCH_SCRIPT), *args], capture_output=True, text=True, encoding="utf-8", env=env,
                          timeout=300, cwd=str(REPO))


def test_batch_script_writes_seg_nrrd(tmp_path, brain1, tiny_model_dir, reference):
    import slicerio

    threshold, expected = reference
    out = tmp_path / "out"
    proc = _batch("--input", str(sample_path("brain1_image.nrrd")), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                  "--output", str(out), "--model", str(tiny_model_dir), "--threshold", repr(threshold),
                  "--device", "cpu", "--probability")
    assert proc.returncode == 0, proc.stderr
    probability_files = [f"brain1_image_{n.replace(' ', '_').replace(',', '_')}_probability.nrrd" for n in NAMES]
    # no temp file left behind
    assert sorted(p.name for p in out.iterdir()) == sorted(["brain1_image.seg.nrrd", *probability_files])
    for name, result in zip(probability_files, expected):
        volume = read_volume(out / name)
        np.testing.assert_array_equal(volume.array, result.probability)
        np.testing.assert_allclose(volume.ijk_to_ras, brain1.ijk_to_ras, atol=1e-6)
    seg = slicerio.read_segmentation(str(out / "brain1_image.seg.nrrd"))
    assert [s["name"] for s in seg["segments"]] == NAMES
    segments, ijk_to_ras = read_segmentation(out / "brain1_image.seg.nrrd")
    np.testing.assert_allclose(ijk_to_ras, brain1.ijk_to_ras, atol=1e-6)
    for spec, prompt, result in zip(segments, PROMPTS, expected):
        assert spec.prompt == prompt
        np.testing.assert_array_equal(spec.mask, result.labels != 0)
    assert "SCT^23583003^Inflammation" in (segments[0].terminology or "")


def test_batch_script_writes_uncertainty_for_sampling_models(tmp_path, brain1):
    torch.manual_seed(0)
    model_dir = save_pretrained(build_model(make_tiny_svp_config()).eval(), tmp_path / "tiny-svp")
    out = tmp_path / "out"
    proc = _batch("--input", str(sample_path("brain1_image.nrrd")), "--prompt", "tumour", "--output", str(out),
                  "--model", str(model_dir), "--device", "cpu", "--samples", "2")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["brain1_image.seg.nrrd", "brain1_image_tumour_uncertainty.nrrd"]
    volume = read_volume(out / "brain1_image_tumour_uncertainty.nrrd")
    assert volume.array.shape == brain1.array.shape and 0 <= volume.array.min() and volume.array.max() <= 0.25
    np.testing.assert_allclose(volume.ijk_to_ras, brain1.ijk_to_ras, atol=1e-6)


def test_batch_script_segments_a_directory(tmp_path, tiny_model_dir):
    """A folder of volumes -> one .seg.nrrd per volume, each on its own volume's grid."""
    import slicerio

    src = tmp_path / "in"
    src.mkdir()
    brain = read_volume(sample_path("brain1_image.nrrd"))
    # a second, differently shaped and oriented volume: 6 slices, i axis flipped
    flipped = brain.ijk_to_ras @ np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped[:3, 3] = brain.ijk_to_ras[:3, :3] @ np.array([255.0, 0.0, 0.0]) + brain.ijk_to_ras[:3, 3]
    write_volume(src / "a.nrrd", brain.array, brain.ijk_to_ras)
    write_volume(src / "b.nii.gz", brain.array[:6, :, ::-1].copy(), flipped)
    out = tmp_path / "out"
    proc = _batch("--input", str(src), "--prompt", "brain tumor", "--output", str(out),
                  "--model", str(tiny_model_dir), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.seg.nrrd", "b.seg.nrrd"]
    for name, shape in (("a", brain.array.shape), ("b", (6,) + brain.array.shape[1:])):
        seg = slicerio.read_segmentation(str(out / f"{name}.seg.nrrd"))
        assert [s["name"] for s in seg["segments"]] == ["brain tumor"]
        segments, ijk_to_ras = read_segmentation(out / f"{name}.seg.nrrd")
        assert segments[0].mask.shape == shape
        np.testing.assert_allclose(ijk_to_ras, (brain.ijk_to_ras if name == "a" else flipped), atol=1e-5)


def test_batch_script_follows_the_domain_check(tmp_path):
    """As 'textguidedseg predict': the chest X-ray default model refuses an MR volume (exit 2, nothing
    written) unless --force."""
    out = tmp_path / "out"
    brain = sample_path("brain1_image.nrrd")
    proc = _batch("--input", str(brain), "--prompt", "tumour", "--output", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"batch_segment: error: {brain}: model 'qata-ensemble-cpu' is for chest X-ray, 2D pictures" in proc.stderr
    assert not out.exists() or not any(out.iterdir())
    proc = _batch("--input", str(brain), "--prompt", "tumour", "--output", str(out), "--force")
    assert proc.returncode == 0, proc.stderr
    assert "segmenting anyway (--force)" in proc.stderr and (out / "brain1_image.seg.nrrd").is_file()


def test_batch_script_missing_input(tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "nope" / "scan.nrrd"
    proc = _batch("--input", str(missing), "--prompt", "lung", "--output", str(out))
    assert proc.returncode == 2
    assert "batch_segment: error:" in proc.stderr and str(missing) in proc.stderr and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_batch_script_unreadable_input_is_skipped(tmp_path, tiny_model_dir):
    broken = tmp_path / "in" / "broken.nrrd"
    broken.parent.mkdir()
    broken.write_text(encoding="utf-8", data="not an image")
    out = tmp_path / "out"
    proc = _batch("--input", str(broken), "--prompt", "lung", "--output", str(out), "--model", str(tiny_model_dir),
                  "--device", "cpu")
    assert proc.returncode == 2
    assert f"{broken}: could not read the image" in proc.stderr and "1 of 1 input(s) failed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


# --------------------------------------------------------------------------------------------
# packaging: module file, UI, CMake, requirements, icon
# --------------------------------------------------------------------------------------------


SLICER_PYTHON_FILES = [MODULE_FILE, BATCH_SCRIPT] + sorted((REPO / "TextGuidedSegLib").rglob("*.py"))


def _annotations(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs + [node.args.vararg, node.args.kwarg]
            yield from (a.annotation for a in args if a is not None and a.annotation is not None)
            if node.returns is not None:
                yield node.returns
        elif isinstance(node, ast.AnnAssign):
            yield node.annotation


@pytest.mark.parametrize("path", SLICER_PYTHON_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_python39_syntax(path):
    """Slicer 5.8 and older embed Python 3.9, and CMake installs the library next to the module:
    every file must parse as 3.9, and 'X | None' annotations (3.10 at run time) need postponed
    evaluation."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path), feature_version=(3, 9))
    postponed = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                    any(a.name == "annotations" for a in n.names) for n in tree.body)
    unions = [a.lineno for a in _annotations(tree)
              if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(a))]
    assert postponed or not unions, f"{path.name}: 'X | Y' annotations on lines {unions} without " \
                                    "'from __future__ import annotations'"


def test_tags_match_library(tgs):
    from TextGuidedSegLib import io as tio

    assert tgs.PROMPT_TAG == tio.PROMPT_TAG  # segments written in Slicer and by the CLI carry the same tags
    assert (tgs.VERDICT_TAG, tgs.CONFIDENCE_TAG) == (tio.VERDICT_TAG, tio.CONFIDENCE_TAG)


def test_parameter_node_annotations_resolve(tgs):
    hints = tgs.TextGuidedSegParameterNode.__annotations__
    assert set(hints) == {"inputVolume", "outputSegmentation", "modelName", "prompts", "threshold", "device",
                          "axis", "laterality", "writeProbability", "samples", "flip"}
    assert hints["inputVolume"] is slicer.vtkMRMLScalarVolumeNode
    assert not any(isinstance(h, str) for h in hints.values())


def test_ui_file_matches_widget(tgs):
    root = ET.parse(UI_FILE).getroot()
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert used and used <= set(widgets), f"missing in the .ui: {used - set(widgets)}"
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    qt_classes = {c for c in widgets.values() if not c.startswith("Q")}
    assert qt_classes <= custom
    expected_class = {"inputVolume": "qMRMLNodeComboBox", "outputSegmentation": "qMRMLNodeComboBox",
                      "threshold": "ctkSliderWidget", "device": "QComboBox", "axis": "QComboBox",
                      "laterality": "QComboBox", "writeProbability": "QCheckBox",
                      "samples": "QSpinBox", "flip": "QCheckBox"}
    bound = {}
    for w in root.iter("widget"):
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = w.get("class")
    assert bound == expected_class
    assert set(bound) <= set(tgs.TextGuidedSegParameterNode.__annotations__)
    for name in ("modelComboBox", "importModelButton", "promptsTextEdit", "applyButton", "progressBar",
                 "statusLabel"):
        assert name in widgets


def test_cmake_lists_every_library_file():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    block = re.search(r"set\(LIB_PYTHON_SCRIPTS\s+(.*?)\)", text, re.S).group(1)
    listed = {line.strip().replace("${LIB_NAME}", "TextGuidedSegLib") for line in block.splitlines() if line.strip()}
    on_disk = {p.relative_to(REPO).as_posix() for p in (REPO / "TextGuidedSegLib").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert listed == on_disk, (f"add to TextGuidedSeg/CMakeLists.txt: {sorted(on_disk - listed)}; "
                               f"listed but missing: {sorted(listed - on_disk)}")
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for needle in ("project(TextGuidedSeg)", 'EXTENSION_DEPENDS "PyTorch"', "find_package(Slicer REQUIRED)",
                   "add_subdirectory(TextGuidedSeg)", "Slicer_EXTENSION_CPACK"):
        assert needle in top


def _cmake_set(text: str, name: str) -> str:
    return re.search(rf'set\({name}\s+"([^"]*)"\)', text).group(1)


def test_extension_catalog_entry_matches_cmake():
    """TextGuidedSeg.json (the Slicer ExtensionsIndex entry) agrees with the top-level CMakeLists.txt."""
    entry = json.loads((REPO / "TextGuidedSeg.json").read_text(encoding="utf-8"))
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                       "slicer-extension-catalog-entry-schema-")
    assert set(entry) <= {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision",
                          "scm_type", "scm_url", "tier"}
    assert entry["category"] == _cmake_set(top, "EXTENSION_CATEGORY")
    assert entry["build_dependencies"] == re.split(r"[;\s]+", _cmake_set(top, "EXTENSION_DEPENDS").strip())
    assert entry["scm_url"] == _cmake_set(top, "EXTENSION_HOMEPAGE") + ".git"
    assert entry["scm_revision"] == "main" and entry["build_subdirectory"] == "."
    assert entry["tier"] in (1, 3, 5)


def test_contributors_and_help_follow_slicer_conventions(tgs):
    """Contributors in Slicer's "Name (Organization)" form, the same in the module and the extension; the
    help text names the batch script where the extension installs it (next to the module file)."""
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    contributors = [c.strip() for c in _cmake_set(top, "EXTENSION_CONTRIBUTORS").split(",")]
    assert contributors == [tgs.CONTRIBUTORS]
    assert all(re.fullmatch(r"[^()]+ \([^()]+\)", c) for c in contributors)
    parent = type("Parent", (), {})()  # the module's parent (a qSlicerScriptedLoadableModule in Slicer)
    module = tgs.TextGuidedSeg.__new__(tgs.TextGuidedSeg)
    module.parent = parent  # what ScriptedLoadableModule.__init__ does in Slicer
    module.__init__(parent)
    assert parent.contributors == [tgs.CONTRIBUTORS]
    assert Path(tgs.BATCH_SCRIPT) == MODULE_DIR.resolve() / "Scripts" / "batch_segment.py"
    assert Path(tgs.BATCH_SCRIPT).is_file() and f'--python-script "{tgs.BATCH_SCRIPT}"' in parent.helpText
    assert "Scripts/batch_segment.py" in (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")


def test_requirements_cover_pyproject(tgs):
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]

    def name(requirement: str) -> str:
        return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")

    assert {name(d) for d in deps} - {"torch"} == {name(r) for _, r in tgs.PYTHON_REQUIREMENTS}
    assert tgs.TextGuidedSegLogic.missingPythonRequirements() == []


def test_icon():
    from PIL import Image

    with Image.open(ICON_FILE) as image:
        assert image.size == (128, 128)
    assert ICON_FILE.stat().st_size < 20_000


@pytest.mark.parametrize("model_name", ["ssa-qata-cpu", "svp-cvae-qata-cpu", "tgcnet-qata-cpu"])
def test_shipped_model_through_logic_on_sample_xray(tgs, scene, logic, model_name):
    """A model trained here segments the shipped chest X-ray through the Slicer Logic as the engine
    does, close to the ground truth (the report in the dataset's own image-side words)."""
    cid = "cxr_s11234-e19977-r1"
    xray = read_volume(sample_path(f"qata/{cid}.png"))
    truth = read_volume(sample_path(f"qata/{cid}_mask.png")).array > 127
    report = sample_path(f"qata/{cid}.txt").read_text(encoding="utf-8")
    node = logic.addVolumeFromArray(scene, xray.array, xray.ijk_to_ras, "cxr")
    segmentation_node = logic.process(node, [report], model_name, device="cpu", laterality="image", samples=4)
    [segment_id] = _segment_ids(segmentation_node)
    sampling = model_name.startswith("svp")  # models that sample also get an uncertainty volume
    assert segmentation_node.GetNumberOfNodeReferences(tgs.UNCERTAINTY_REFERENCE_ROLE) == int(sampling)
    array, _ = _export(scene, tgs, segmentation_node, segment_id, node)
    expected = segment_volume(xray.array, xray.ijk_to_ras, [report], load_model(model_name, device="cpu"),
                              device="cpu", prompt_laterality="image", samples=4 if sampling else None)[0]
    np.testing.assert_array_equal(array != 0, expected.labels != 0)
    inter = np.logical_and(array != 0, truth).sum()
    assert 2 * inter / ((array != 0).sum() + truth.sum()) > 0.6


def test_shipped_ensemble_with_the_flip_through_logic_on_sample_xray(tgs, scene, logic):
    """The panel offers the manifest ensemble like a model: through the Logic (with the text-aware
    flip) it gives the engine's segmentation, plus an uncertainty volume (the members' disagreement)."""
    cid = "cxr_s11234-e19977-r1"
    xray = read_volume(sample_path(f"qata/{cid}.png"))
    report = sample_path(f"qata/{cid}.txt").read_text(encoding="utf-8")
    node = logic.addVolumeFromArray(scene, xray.array, xray.ijk_to_ras, "cxr")
    check, _ = logic.checkDomain(node, "qata-ensemble-cpu")
    assert check is not None and check.ok  # the members' domain
    assert not logic.modelIsTextFree("qata-ensemble-cpu") and not logic.modelNeedsDownload("qata-ensemble-cpu")
    segmentation_node = logic.process(node, [report], "qata-ensemble-cpu", device="cpu", laterality="image",
                                      flip=True)
    [segment_id] = _segment_ids(segmentation_node)
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    assert _tag(segment, tgs.MODEL_TAG) == "qata-ensemble-cpu"
    assert segmentation_node.GetNumberOfNodeReferences(tgs.UNCERTAINTY_REFERENCE_ROLE) == 1
    array, _ = _export(scene, tgs, segmentation_node, segment_id, node)
    expected = segment_volume(xray.array, xray.ijk_to_ras, [report], load_model("qata-ensemble-cpu"), device="cpu",
                              prompt_laterality="image", flip=True)[0]
    np.testing.assert_array_equal(array != 0, expected.labels != 0)


def test_shipped_text_free_model_through_logic_without_a_prompt(tgs, scene, logic):
    """The 1 %-text ProLearn segments the shipped chest X-ray with an empty prompt box, as the engine."""
    cid = "cxr_s11234-e19977-r1"
    xray = read_volume(sample_path(f"qata/{cid}.png"))
    truth = read_volume(sample_path(f"qata/{cid}_mask.png")).array > 127
    assert logic.modelIsTextFree("prolearn-qata-cpu-1pct") and not logic.modelIsTextFree("tmc-qata-cpu")
    node = logic.addVolumeFromArray(scene, xray.array, xray.ijk_to_ras, "cxr")
    segmentation_node = logic.process(node, "", "prolearn-qata-cpu-1pct", device="cpu")
    [segment_id] = _segment_ids(segmentation_node)
    assert segmentation_node.GetSegmentation().GetSegment(segment_id).GetName() == "segmentation"
    array, _ = _export(scene, tgs, segmentation_node, segment_id, node)
    expected = segment_volume(xray.array, xray.ijk_to_ras, None, load_model("prolearn-qata-cpu-1pct"),
                              device="cpu")[0]
    np.testing.assert_array_equal(array != 0, expected.labels != 0)
    inter = np.logical_and(array != 0, truth).sum()
    assert 2 * inter / ((array != 0).sum() + truth.sum()) > 0.6
