"""segment_volume: shapes, thresholds, batching, progress / cancel, bad input, prompt handling, laterality."""

from __future__ import annotations

import logging
import re
import threading
import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_tiny_tmc_config
from TextGuidedSegLib import io
from TextGuidedSegLib.checkpoint import LoadedModel, load_pretrained, save_pretrained
from TextGuidedSegLib.engine import SegmentationCancelled, auto_batch_size, segment_volume
from TextGuidedSegLib.models import ModelConfig, build_model, encode_prompts
from TextGuidedSegLib.orientation import slice_layout
from TextGuidedSegLib.preprocessing import PERCENTILE_SAMPLES, intensity_range, resize_images, resize_probabilities
from TextGuidedSegLib.text import TextFeatures

LPS_IDENTITY = np.diag([-1.0, -1.0, 1.0, 1.0])


def save_tiny_model(directory):
    """A random tiny TMC whose head is scaled so its probabilities spread around 0.5 on real images
    (a plain random init outputs ~0.47 everywhere and labels nothing)."""
    torch.manual_seed(0)
    model = build_model(make_tiny_tmc_config()).eval()
    with torch.no_grad():
        model.head.weight.mul_(200.0)
        model.head.bias.add_(0.488)
    return save_pretrained(model, directory, metadata={"name": "tiny-engine"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> LoadedModel:
    loaded = load_pretrained(save_tiny_model(tmp_path_factory.mktemp("engine") / "tiny"))
    assert not loaded.model.training
    return loaded


@pytest.fixture(scope="module")
def brain():
    return io.read_volume(io.sample_path("brain1_image.nrrd"))


def _run(vol, model, prompts=("brain tumour",), m=LPS_IDENTITY, **kw):
    kw.setdefault("device", "cpu")
    return segment_volume(vol, m, list(prompts) if prompts is not None else None, model, **kw)


# ------------------------------------------------------------------ real volume


def test_brain_volume_labels_and_probability(tiny, brain):
    results = _run(brain.array, tiny, ["brain tumour", "left lung"], m=brain.ijk_to_ras, return_probability=True,
                   batch_size=4)
    assert [r.prompt for r in results] == ["brain tumour", "left lung"]
    # the tiny model reads 'image' laterality: the patient's left is the image's right
    assert [r.model_prompt for r in results] == ["brain tumour", "right lung"]
    for r in results:
        assert r.labels.shape == brain.array.shape == (13, 256, 256)
        assert r.labels.dtype == np.uint8
        assert set(np.unique(r.labels)) == {0, 1}
        assert r.probability.dtype == np.float32 and r.probability.shape == brain.array.shape
        assert 0.0 <= r.probability.min() and r.probability.max() <= 1.0
        np.testing.assert_array_equal(r.labels, (r.probability >= 0.5).astype(np.uint8))
        assert r.slices == 13 and r.layout.plane == "axial" and r.layout.slice_axis == 0
        assert r.uncertainty is None
    assert not np.array_equal(results[0].probability, results[1].probability), "the text must change the output"
    assert _run(brain.array, tiny, m=brain.ijk_to_ras)[0].probability is None


def test_threshold_is_applied(tiny, brain):
    r = _run(brain.array, tiny, m=brain.ijk_to_ras, threshold=0.9, return_probability=True)[0]
    np.testing.assert_array_equal(r.labels, (r.probability >= 0.9).astype(np.uint8))
    low = _run(brain.array, tiny, m=brain.ijk_to_ras, threshold=0.2)[0]
    assert r.labels.sum() < low.labels.sum()


def test_progress_after_every_batch(tiny, brain):
    calls = []
    _run(brain.array, tiny, ["brain tumour", "left lung"], m=brain.ijk_to_ras, batch_size=4,
         progress=lambda done, total: calls.append((done, total)))
    expected_done = [4, 8, 12, 13, 17, 21, 25, 26]
    assert calls == [(d, 26) for d in expected_done]


def test_batch_size_does_not_change_probabilities(tiny, brain):
    tiny.model.train()  # the engine must switch to eval mode itself (BatchNorm statistics, dropout)
    one = _run(brain.array, tiny, m=brain.ijk_to_ras, batch_size=1, return_probability=True)[0]
    assert not tiny.model.training
    tiny.model.train()
    five = _run(brain.array, tiny, m=brain.ijk_to_ras, batch_size=5, return_probability=True)[0]
    np.testing.assert_allclose(one.probability, five.probability, atol=1e-5, rtol=0)
    assert not tiny.model.training


def test_cancel_from_progress_callback(tiny, brain):
    cancel = threading.Event()
    calls = []

    def progress(done, total):
        calls.append(done)
        cancel.set()

    with pytest.raises(SegmentationCancelled):
        _run(brain.array, tiny, m=brain.ijk_to_ras, batch_size=2, progress=progress, cancel=cancel)
    assert calls == [2], "the run must stop after the batch during which cancel was set"


def test_cancel_before_start(tiny):
    cancel = threading.Event()
    cancel.set()
    calls = []
    with pytest.raises(SegmentationCancelled):
        _run(np.zeros((2, 8, 8)), tiny, cancel=cancel, progress=lambda d, t: calls.append(d))
    assert calls == []


# ------------------------------------------------------------------ input handling


def test_2d_image_is_a_one_slice_volume(tiny):
    image = io.read_volume(io.sample_path("qata/cxr_s11234-e19977-r1.png")).array[0]
    assert image.shape == (224, 224)
    flat = _run(image, tiny, ["bilateral pulmonary infection"], return_probability=True)[0]
    vol = _run(image[None], tiny, ["bilateral pulmonary infection"], return_probability=True)[0]
    assert flat.labels.shape == (1, 224, 224) and flat.slices == 1
    np.testing.assert_array_equal(flat.probability, vol.probability)
    assert 0 < flat.labels.sum() < flat.labels.size


def test_dtypes_give_identical_labels(tiny):
    rng = np.random.default_rng(3)
    values = rng.integers(0, 200, size=(3, 48, 40))
    values[:, 10:30, 5:20] += 50
    results = [_run(values.astype(dt), tiny, return_probability=True)[0] for dt in (np.int16, np.uint8, np.float64)]
    for r in results[1:]:
        np.testing.assert_array_equal(r.labels, results[0].labels)
        np.testing.assert_array_equal(r.probability, results[0].probability)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels_refused(tiny, bad):
    vol = np.ones((2, 16, 16), dtype=np.float32)
    vol[1, 3, 4] = bad
    with pytest.raises(ValueError, match="NaN"):
        _run(vol, tiny)


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (16,), (0, 16, 16)])
def test_wrong_dimensionality_refused(tiny, shape):
    with pytest.raises(ValueError):
        _run(np.zeros(shape), tiny)


def test_complex_voxels_refused(tiny):
    with pytest.raises(ValueError, match="not supported"):
        _run(np.zeros((1, 8, 8), dtype=np.complex64), tiny)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_empty_prompt_refused(tiny, prompt):
    with pytest.raises(ValueError, match="empty prompt"):
        _run(np.zeros((1, 16, 16)), tiny, ["lung", prompt])


def test_very_long_prompt_is_truncated_with_warning(tiny, caplog):
    prompt = ("left lower lobe opacity " * 500)[:10_000]
    with caplog.at_level(logging.WARNING):
        r = _run(np.arange(256.0).reshape(1, 16, 16), tiny, [prompt])[0]
    assert r.labels.shape == (1, 16, 16)
    assert len(r.prompt) == 2000 and prompt.startswith(r.prompt)
    assert any("truncated" in rec.getMessage() for rec in caplog.records)


def test_non_ascii_prompt(tiny):
    r = _run(np.arange(256.0).reshape(1, 16, 16), tiny, ["infección pulmonar izquierda, 左肺 ü"],
             return_probability=True)[0]
    assert r.prompt == "infección pulmonar izquierda, 左肺 ü"
    assert r.labels.shape == (1, 16, 16) and np.isfinite(r.probability).all()


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.1, 1.5])
def test_threshold_outside_open_interval(tiny, threshold):
    with pytest.raises(ValueError, match="threshold"):
        _run(np.zeros((1, 16, 16)), tiny, threshold=threshold)


@pytest.mark.parametrize("prompts", [None, []])
def test_text_model_needs_a_prompt(tiny, prompts):
    with pytest.raises(ValueError, match="prompt"):
        _run(np.zeros((1, 16, 16)), tiny, prompts)


def test_bad_batch_size(tiny):
    with pytest.raises(ValueError, match="batch size"):
        _run(np.zeros((1, 16, 16)), tiny, batch_size=0)


def test_strongly_anisotropic_volume(tiny):
    rng = np.random.default_rng(1)
    vol = rng.normal(size=(3, 40, 200)).astype(np.float32)
    m = np.diag([-0.3, -0.3, 5.0, 1.0])
    r = _run(vol, tiny, m=m, return_probability=True)[0]
    assert r.labels.shape == (3, 40, 200) and r.slices == 3
    assert np.isfinite(r.probability).all()
    np.testing.assert_array_equal(r.labels, (r.probability >= 0.5).astype(np.uint8))


def test_each_prompt_encoded_once_per_volume(tiny, brain, monkeypatch):
    enc = tiny.text_encoder
    runs, encodes = [], []
    real_run, real_encode = enc._run, enc.encode
    monkeypatch.setattr(enc, "_run", lambda prompts: runs.append(list(prompts)) or real_run(prompts))
    monkeypatch.setattr(enc, "encode", lambda prompts: encodes.append(list(prompts)) or real_encode(prompts))
    prompts = ["once-only prompt alpha", "once-only prompt beta"]
    _run(brain.array, tiny, prompts, m=brain.ijk_to_ras, batch_size=1)
    assert encodes == [[prompts[0]], [prompts[1]]], "one encode per prompt, not one per batch"
    assert runs == [[prompts[0]], [prompts[1]]]
    _run(brain.array, tiny, prompts, m=brain.ijk_to_ras, batch_size=1)
    assert len(encodes) == 4
    assert len(runs) == 2, "a frozen encoder answers repeated prompts from its cache"


def test_auto_batch_size_cpu(tiny):
    bs = auto_batch_size(tiny, torch.device("cpu"))
    assert isinstance(bs, int) and bs == 32  # 64 px: the budget allows far more, capped at 32
    assert auto_batch_size(_half_model(image_size=224), torch.device("cpu")) == 18
    assert auto_batch_size(_half_model(image_size=2048), torch.device("cpu")) == 1


# ------------------------------------------------------------------ laterality with a fake model


class WordEncoder:
    """Stub text encoder: feature 1.0 when the prompt contains the word 'left'."""

    def __init__(self):
        self.seen: list[str] = []

    def encode(self, prompts):
        self.seen += list(prompts)
        flags = torch.tensor([[1.0 if re.search(r"\bleft\b", p, re.IGNORECASE) else 0.0] for p in prompts])
        return TextFeatures(tokens=flags[:, None, :], mask=torch.ones(len(prompts), 1, dtype=torch.long),
                            pooled=flags)


class HalfModel(nn.Module):
    """Logits +10 on the image's left half (columns < W/2) when the text says 'left', else on the right half."""

    requires_text = True

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, image, text):
        b, _, h, w = image.shape
        left_half = torch.arange(w) < w // 2
        wants_left = text.pooled[:, 0] > 0.5
        on = torch.where(wants_left[:, None], left_half[None, :], ~left_half[None, :])
        logits = torch.where(on, self.scale, -self.scale)[:, None, None, :].expand(b, 1, h, w)
        return {"logits": logits, "losses": {}}


def _half_model(image_size=32):
    return LoadedModel(model=HalfModel(), config=ModelConfig(model_type="half", image_size=image_size,
                                                             laterality="image"),
                       metadata={"name": "half"}, _text_encoder=WordEncoder())


def _patient_left(m, shape):
    """(k, j, i) bool: voxel centre on the patient's left of the volume centre (R < centre R)."""
    nk, nj, ni = shape
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    r = m[0, 0] * i + m[0, 1] * j + m[0, 2] * k + m[0, 3]
    centre = m[0, :3] @ ((np.array([ni, nj, nk]) - 1) / 2) + m[0, 3]
    return r < centre


@pytest.mark.parametrize("flip_i", [False, True])
def test_laterality_patient_and_image_prompts(flip_i):
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(3, 24, 32)).astype(np.float32)
    m = np.diag([-0.8, -0.8, 3.0, 1.0])
    m[:3, 3] = (12.0, -7.0, 40.0)
    if flip_i:  # same patient, i axis stored the other way round
        m[:3, 3] += m[:3, 0] * (vol.shape[2] - 1)
        m[:3, 0] *= -1
        vol = vol[:, :, ::-1]
    model = _half_model()
    patient_left = _patient_left(m, vol.shape)
    assert patient_left.sum() == patient_left.size // 2

    left_patient = segment_volume(vol, m, ["left lung"], model, prompt_laterality="patient", device="cpu")[0]
    right_patient = segment_volume(vol, m, ["Right lung"], model, prompt_laterality="patient", device="cpu")[0]
    left_image = segment_volume(vol, m, ["left lung"], model, prompt_laterality="image", device="cpu")[0]
    assert model._text_encoder.seen == ["right lung", "Left lung", "left lung"]
    assert left_patient.model_prompt == "right lung" and left_image.model_prompt == "left lung"

    np.testing.assert_array_equal(left_patient.labels, patient_left.astype(np.uint8))
    np.testing.assert_array_equal(right_patient.labels, (~patient_left).astype(np.uint8))
    # 'image' laterality: the left half of the radiological picture, i.e. the patient's right
    np.testing.assert_array_equal(left_image.labels, (~patient_left).astype(np.uint8))
    picture = left_image.layout.to_slices(left_image.labels)
    assert picture[:, :, :16].all() and not picture[:, :, 16:].any()

    # the patient-space answer does not depend on how the array is stored
    canonical = left_patient.labels[:, :, ::-1] if flip_i else left_patient.labels
    assert canonical[:, :, 16:].all() and not canonical[:, :, :16].any()


def test_sagittal_slices_never_swap():
    model = _half_model()
    vol = np.random.default_rng(0).normal(size=(16, 24, 32)).astype(np.float32)
    r = segment_volume(vol, LPS_IDENTITY, ["left lung"], model, axis="sagittal", device="cpu")[0]
    assert r.model_prompt == "left lung" and r.layout.plane == "sagittal"


# ------------------------------------------------------------------ per-batch pipeline vs the whole-volume computation


class ImageModel(nn.Module):
    """Logits from the picture itself (plus 0.3 when the text says 'left'), so any slip in layout,
    normalisation or resizing shows in the labels; records what it was given."""

    requires_text = True

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(9.0))
        self.seen: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def forward(self, image, text):
        self.seen.append((image.dtype, tuple(image.shape)))
        logits = self.gain * (image.mean(1, keepdim=True) - 0.5) + 0.3 * text.pooled[:, :1, None, None]
        return {"logits": logits, "losses": {}}


def _image_model(image_size=24, in_channels=1):
    return LoadedModel(model=ImageModel(), config=ModelConfig(model_type="image", image_size=image_size,
                                                              in_channels=in_channels, laterality="image"),
                       metadata={"name": "image"}, _text_encoder=WordEncoder())


def reference_segmentation(vol, m, model, prompt, axis="auto", threshold=0.5):
    """What the engine computed before it worked per batch, written out plainly: normalise the
    whole volume, lay out every slice, one forward pass, resize back, put the slices back."""
    layout = slice_layout(m, vol.shape, axis)
    lo, hi = intensity_range(vol, model.config.intensity)
    norm = np.clip((vol.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
    slices = np.ascontiguousarray(layout.to_slices(norm))
    n, rows, cols = slices.shape
    x = torch.from_numpy(slices)[:, None]
    if model.config.in_channels == 3:
        x = x.expand(-1, 3, -1, -1)
    x = resize_images(x, (model.config.image_size,) * 2)
    text = encode_prompts(model.model, model.text_encoder, [prompt], plane="coronal" if n == 1 else layout.plane)
    with torch.inference_mode():
        logits = model.model(x, text.index([0] * n))["logits"]
    p = resize_probabilities(torch.sigmoid(logits.float()), (rows, cols))[:, 0].numpy()
    prob = layout.from_slices(p)
    return prob, (prob >= threshold).astype(np.uint8)


def _rotation(axis, degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    r = np.eye(3)
    a, b = [i for i in range(3) if i != axis]
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def _matrix(direction, spacing=(0.8, 0.9, 2.5), origin=(10.0, -20.0, 5.0)):
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction) * np.asarray(spacing)[None, :]
    m[:3, 3] = origin
    return m


GEOMETRIES = {
    "lps": np.diag([-1.0, -1.0, 1.0]),
    "flipped": np.diag([1.0, -1.0, -1.0]),
    "permuted": np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),  # i->S, j->-A, k->-R... columns
    "oblique": _rotation(0, 25) @ _rotation(2, -15) @ np.diag([-1.0, 1.0, -1.0]),
}


def _blobby_volume(shape, seed=0, dtype=np.int16):
    """Smooth structures plus noise, CT-like values: labels are neither empty nor everything."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = 600 * np.cos(3 * i + 1) * np.sin(4 * j) + 300 * k + rng.normal(0, 80, size=shape)
    return body.astype(dtype)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("axis", ["auto", "coronal", "sagittal", 1])
@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_batched_engine_equals_whole_volume_reference(geometry, axis, batch_size):
    vol = _blobby_volume((7, 20, 26))
    m = _matrix(GEOMETRIES[geometry])
    model = _image_model()
    prob_ref, labels_ref = reference_segmentation(vol, m, model, "lung", axis)
    r = segment_volume(vol, m, ["lung"], model, axis=axis, batch_size=batch_size, device="cpu",
                       return_probability=True)[0]
    assert r.layout == slice_layout(m, vol.shape, axis)
    np.testing.assert_array_equal(r.probability, prob_ref)
    np.testing.assert_array_equal(r.labels, labels_ref)
    assert 0 < labels_ref.sum() < labels_ref.size
    assert r.labels.flags.c_contiguous and r.probability.flags.c_contiguous
    assert {dtype for dtype, _ in model.model.seen} == {torch.float32}
    assert sum(shape[0] for _, shape in model.model.seen[1:]) == r.slices  # [0] is the reference's forward


def test_per_batch_layout_gives_the_whole_volume_slices():
    """Batches cut from the laid-out view, and results written back through it, are exactly the
    whole-volume layout and its inverse, for every geometry and axis."""
    vol = _blobby_volume((6, 11, 13))
    for geometry, direction in GEOMETRIES.items():
        for axis in ("auto", "coronal", "sagittal", 0, 2):
            layout = slice_layout(_matrix(direction), vol.shape, axis)
            whole = np.ascontiguousarray(layout.to_slices(vol))
            view = layout.to_slices(vol)
            batches = [np.array(view[s:s + 4]) for s in range(0, len(whole), 4)]
            np.testing.assert_array_equal(np.concatenate(batches), whole, err_msg=f"{geometry} {axis}")
            out = np.empty(vol.shape, dtype=vol.dtype)
            out_view = layout.to_slices(out)
            for s, batch in zip(range(0, len(whole), 4), batches):
                out_view[s:s + 4] = batch
            np.testing.assert_array_equal(out, vol)
            np.testing.assert_array_equal(out, layout.from_slices(whole))


def test_three_channel_models_see_the_same_picture_in_every_channel():
    vol = _blobby_volume((5, 30, 18))
    model = _image_model(in_channels=3)
    prob_ref, labels_ref = reference_segmentation(vol, LPS_IDENTITY, model, "lung")
    r = segment_volume(vol, LPS_IDENTITY, ["lung"], model, batch_size=2, device="cpu", return_probability=True)[0]
    np.testing.assert_array_equal(r.probability, prob_ref)
    np.testing.assert_array_equal(r.labels, labels_ref)
    assert all(shape[1] == 3 for _, shape in model.model.seen)


def test_large_volume_uses_sampled_statistics_and_matches_reference():
    vol = _blobby_volume((20, 240, 240), seed=3)
    assert vol.size > PERCENTILE_SAMPLES
    model = _image_model()
    prob_ref, labels_ref = reference_segmentation(vol, LPS_IDENTITY, model, "left lung")
    r = segment_volume(vol, LPS_IDENTITY, ["left lung"], model, batch_size=8, device="cpu", return_probability=True,
                       prompt_laterality="image")[0]  # the model reads the words as given, like the reference
    np.testing.assert_array_equal(r.probability, prob_ref)
    np.testing.assert_array_equal(r.labels, labels_ref)


def test_tiny_network_matches_reference(tiny, brain):
    prob_ref, labels_ref = reference_segmentation(brain.array, brain.ijk_to_ras, tiny, "brain tumour")
    r = _run(brain.array, tiny, m=brain.ijk_to_ras, batch_size=4, return_probability=True)[0]
    # the reference runs all 13 slices in one forward pass: convolution may round differently
    np.testing.assert_allclose(r.probability, prob_ref, atol=1e-5, rtol=0)
    decided = np.abs(prob_ref - 0.5) > 1e-4
    np.testing.assert_array_equal(r.labels[decided], labels_ref[decided])
    assert decided.mean() > 0.99


def test_outputs_are_float32_and_input_is_untouched(tiny, brain):
    vol = brain.array.astype(np.float32)
    before = vol.copy()
    r = _run(vol, tiny, m=brain.ijk_to_ras, batch_size=5, return_probability=True)[0]
    np.testing.assert_array_equal(vol, before)
    assert r.labels.dtype == np.uint8 and r.probability.dtype == np.float32
    from_int = _run(brain.array, tiny, m=brain.ijk_to_ras, batch_size=5, return_probability=True)[0]
    np.testing.assert_array_equal(from_int.probability, r.probability)


def test_several_prompts_give_what_each_prompt_gives_alone(tiny, brain):
    both = _run(brain.array, tiny, ["brain tumour", "left lung"], m=brain.ijk_to_ras, batch_size=4,
                return_probability=True)
    for r in both:
        alone = _run(brain.array, tiny, [r.prompt], m=brain.ijk_to_ras, batch_size=4, return_probability=True)[0]
        np.testing.assert_array_equal(r.probability, alone.probability)
        np.testing.assert_array_equal(r.labels, alone.labels)


def _numpy_peak_bytes(vol, model, **kw):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        segment_volume(vol, LPS_IDENTITY, ["lung"], model, device="cpu", **kw)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_follows_the_batch_not_the_volume():
    """numpy memory of a call, beyond its uint8 labels, is the same for 20 or 80 slices: no
    whole-volume float copy (the old engine held three: normalised, laid out, probabilities)."""
    model = _image_model()
    small, large = _blobby_volume((20, 256, 256)), _blobby_volume((80, 256, 256))
    extra = {}
    for name, vol in (("small", small), ("large", large)):
        _numpy_peak_bytes(vol[:2], model, batch_size=4)  # first-call allocations (text, caches) out of the way
        extra[name] = _numpy_peak_bytes(vol, model, batch_size=4) - vol.size  # minus the uint8 labels
    growth = extra["large"] - extra["small"]
    float32_growth = (large.size - small.size) * 4
    assert growth < 0.05 * float32_growth, (extra, float32_growth)
    with_prob = _numpy_peak_bytes(large, model, batch_size=4, return_probability=True) - large.size
    assert with_prob - extra["large"] <= large.size * 4 * 1.05  # the float32 probability volume, and only it
