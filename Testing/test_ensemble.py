"""Ensembles (several models averaged before the threshold) and the text-aware test-time flip.

Values, not shapes: an ensemble's probability is checked against its members' own runs, and the
flip against a hand-made mirrored run; fake models whose output is a fixed function of position and
prompt show that the flip swaps 'left' and 'right' where it must.
"""

from __future__ import annotations

import json
import logging
import threading
import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_tiny_tmc_config
from test_engine import LPS_IDENTITY, HalfModel, WordEncoder, _blobby_volume, _half_model, _image_model, _patient_left
from TextGuidedSegLib import io, model_store
from TextGuidedSegLib.checkpoint import LoadedModel, save_pretrained
from TextGuidedSegLib.engine import SegmentationCancelled, segment_volume
from TextGuidedSegLib.ensemble import Ensemble, members_of, parse_model_spec, spec_text
from TextGuidedSegLib.models import ModelConfig, build_model

QATA_MODELS = ["tmc-qata-cpu", "ssa-qata-cpu", "svp-cvae-qata-cpu", "tgcnet-qata-cpu"]
XRAY = "cxr_s11242-e20020-r1"
REPORT_RIGHT = "unilateral pulmonary infection, one infected area, lower right lung."


def save_tiny(directory, seed: int, scale: float = 200.0):
    """A random tiny TMC whose probabilities spread around 0.5 (as test_engine.save_tiny_model)."""
    torch.manual_seed(seed)
    model = build_model(make_tiny_tmc_config()).eval()
    with torch.no_grad():
        model.head.weight.mul_(scale)
        model.head.bias.add_(0.488)
    return save_pretrained(model, directory, metadata={"name": f"tiny-{seed}"})


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    return save_tiny(root / "tiny_a", 0), save_tiny(root / "tiny_b", 1, scale=120.0)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTGUIDEDSEG_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# ------------------------------------------------------------------ the weighted mean


def test_ensemble_of_two_tiny_models_is_the_weighted_mean(tiny_dirs):
    a, b = (model_store.load_model(str(d)) for d in tiny_dirs)
    brain = io.read_volume(io.sample_path("brain1_image.nrrd"))
    vol, m = brain.array[:5], brain.ijk_to_ras
    prompts = ["brain tumour", "left lung"]
    ensemble = Ensemble([a, b], [0.7, 0.3])
    together = segment_volume(vol, m, prompts, ensemble, batch_size=2, device="cpu", return_probability=True)
    for j, r in enumerate(together):
        pa = segment_volume(vol, m, [prompts[j]], a, device="cpu", return_probability=True)[0].probability
        pb = segment_volume(vol, m, [prompts[j]], b, device="cpu", return_probability=True)[0].probability
        assert not np.allclose(pa, pb, atol=1e-3), "the members must disagree for the test to mean something"
        mean = 0.7 * pa.astype(np.float64) + 0.3 * pb
        np.testing.assert_allclose(r.probability, mean, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(r.labels, (r.probability >= 0.5).astype(np.uint8))
        assert 0 < r.labels.sum() < r.labels.size
        # uncertainty: the members' disagreement (weighted variance of their probabilities)
        spread = 0.7 * (pa - mean) ** 2 + 0.3 * (pb - mean) ** 2
        np.testing.assert_allclose(r.uncertainty, spread, atol=1e-6, rtol=0)
        assert r.voxels == int(r.labels.sum())
        assert r.confidence == pytest.approx(float(r.probability[r.labels > 0].mean()), rel=1e-5)
        assert r.model_prompt == ("brain tumour", "right lung")[j]  # both read image sides


class PatientHalfModel(HalfModel):
    """A patient-convention HalfModel: 'left' marks the patient's left, the picture's right half."""

    def forward(self, image, text):
        out = super().forward(image, text)
        return {**out, "logits": out["logits"].flip(-1)}


def test_members_keep_their_own_input_size_and_laterality():
    """Members of different input sizes and laterality conventions: each reads the prompt in its own
    convention, so both mark the patient's left, and so does their mean."""
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(3, 24, 32)).astype(np.float32)
    m = np.diag([-0.8, -0.8, 3.0, 1.0])
    image_side = _half_model(image_size=32)
    patient_side = LoadedModel(model=PatientHalfModel(),
                               config=ModelConfig(model_type="half", image_size=16, laterality="patient"),
                               metadata={"name": "half-patient"}, _text_encoder=WordEncoder())
    ensemble = Ensemble([image_side, patient_side])
    assert ensemble.name == "half,half-patient" and ensemble.weights == [0.5, 0.5]
    [r] = segment_volume(vol, m, ["left lung"], ensemble, prompt_laterality="patient", device="cpu",
                         return_probability=True)
    assert image_side._text_encoder.seen == ["right lung"] and patient_side._text_encoder.seen == ["left lung"]
    assert r.model_prompt == "right lung | left lung"
    np.testing.assert_array_equal(r.labels, _patient_left(m, vol.shape).astype(np.uint8))


class SamplingModel(nn.Module):
    """Samples masks without randomness: sample s adds (s - (S-1)/2) / 2 to the picture's logits."""

    requires_text = True
    samples_masks = True

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(6.0))

    def logits(self, image):
        return self.gain * (image.mean(1, keepdim=True) - 0.5)

    def forward(self, image, text):
        return {"logits": self.logits(image), "losses": {}}

    def sample(self, image, text, n, generator=None):
        offsets = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) / 2
        return torch.sigmoid(self.logits(image)[None] + offsets[:, None, None, None, None])


def _sampler(image_size: int, samples: int) -> LoadedModel:
    config = ModelConfig(model_type="sampler", image_size=image_size)
    config.samples = samples  # the models that sample have this in their own config
    return LoadedModel(model=SamplingModel(), config=config, metadata={"name": "sampler"},
                       _text_encoder=WordEncoder())


def test_uncertainty_of_an_ensemble_with_a_sampling_member():
    """Law of total variance: sum of w * (member's own variance + (member mean - ensemble mean)^2)."""
    vol = _blobby_volume((4, 20, 26))
    sampler = _sampler(20, 4)
    plain = _image_model(image_size=24)
    alone = [segment_volume(vol, LPS_IDENTITY, ["lung"], x, device="cpu", return_probability=True)[0]
             for x in (sampler, plain)]
    assert alone[0].uncertainty is not None and alone[1].uncertainty is None
    ens = Ensemble([sampler, plain], [0.4, 0.6])
    assert ens.samples_masks and ens.requires_text
    [r] = segment_volume(vol, LPS_IDENTITY, ["lung"], ens, device="cpu", return_probability=True)
    mean = 0.4 * alone[0].probability.astype(np.float64) + 0.6 * alone[1].probability
    np.testing.assert_allclose(r.probability, mean, atol=1e-6, rtol=0)
    expected = (0.4 * (alone[0].uncertainty + (alone[0].probability - mean) ** 2)
                + 0.6 * (alone[1].probability - mean) ** 2)
    np.testing.assert_allclose(r.uncertainty, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="one mask per prompt"):  # no member samples: --samples refused
        segment_volume(vol, LPS_IDENTITY, ["lung"], Ensemble([plain, _image_model()]), samples=4, device="cpu")


def test_progress_and_cancel_across_members():
    vol = _blobby_volume((13, 20, 26))
    a, b = _image_model(), _image_model(image_size=16)
    calls = []
    segment_volume(vol, LPS_IDENTITY, ["lung", "left lung"], Ensemble([a, b]), batch_size=4, device="cpu",
                   progress=lambda done, total: calls.append((done, total)))
    assert calls == [(d, 26) for d in (4, 8, 12, 13, 17, 21, 25, 26)]  # slices, as for one model

    cancel = threading.Event()

    class Cancelling(nn.Module):  # the first member asks to stop during its forward pass
        requires_text = True

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor(1.0))

        def forward(self, image, text):
            cancel.set()
            return {"logits": self.w * image.mean(1, keepdim=True), "losses": {}}

    first = LoadedModel(model=Cancelling(), config=ModelConfig(model_type="c", image_size=16),
                        metadata={"name": "c"}, _text_encoder=WordEncoder())
    second = _image_model()
    with pytest.raises(SegmentationCancelled):
        segment_volume(vol, LPS_IDENTITY, ["lung"], Ensemble([first, second]), batch_size=4, device="cpu",
                       cancel=cancel)
    assert second.model.seen == [], "the next member must not run once cancel is set"


def _numpy_peak_bytes(vol, model, **kw):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        segment_volume(vol, LPS_IDENTITY, ["lung"], model, device="cpu", batch_size=4, **kw)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_ensemble_memory_follows_the_batch_not_the_members():
    """Three members hold no probability volume of their own: beyond the uint8 labels and the float32
    uncertainty, what a call holds does not grow with the volume."""
    ensemble = Ensemble([_image_model(), _image_model(image_size=16), _image_model(image_size=32)])
    small, large = _blobby_volume((20, 256, 256)), _blobby_volume((80, 256, 256))
    extra = {}
    for name, vol in (("small", small), ("large", large)):
        _numpy_peak_bytes(vol[:2], ensemble)
        extra[name] = _numpy_peak_bytes(vol, ensemble) - 5 * vol.size  # labels (1 byte) + uncertainty (4)
    growth = extra["large"] - extra["small"]
    assert growth < 0.05 * (large.size - small.size) * 4, extra


# ------------------------------------------------------------------ the text-aware flip


def test_flip_swaps_the_words_with_the_picture():
    """A model that marks the left half of the picture when the prompt says left: the mirrored picture
    with 'left' swapped for 'right' gives the same answer mirrored, so the flip changes nothing; had
    the words not been swapped, the two views would cancel out (0.5 everywhere)."""
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(3, 24, 32)).astype(np.float32)
    m = np.diag([-0.8, -0.8, 3.0, 1.0])
    for prompt, laterality in (("left lung", "patient"), ("Right lower lung", "image"), ("LEFT lung", "image")):
        model = _half_model()
        plain = segment_volume(vol, m, [prompt], model, prompt_laterality=laterality, device="cpu",
                               return_probability=True)[0]
        flipped = segment_volume(vol, m, [prompt], model, prompt_laterality=laterality, device="cpu",
                                 return_probability=True, flip=True)[0]
        np.testing.assert_array_equal(flipped.labels, plain.labels)
        np.testing.assert_allclose(flipped.probability, plain.probability, atol=1e-6)
        assert plain.labels.sum() == plain.labels.size // 2
        assert flipped.model_prompt == plain.model_prompt  # what the direct view read
    # the mirrored view read the other side's word
    assert model._text_encoder.seen == ["LEFT lung", "LEFT lung", "RIGHT lung"]
    model = _half_model()
    segment_volume(vol, m, ["left lung"], model, device="cpu", flip=True)
    assert model._text_encoder.seen == ["right lung", "left lung"]


def _mirror(vol, m, axis="auto"):
    """The volume mirrored left-right as the engine lays out its slices."""
    from TextGuidedSegLib.orientation import slice_layout

    layout = slice_layout(m, vol.shape, axis)
    return layout.from_slices(np.ascontiguousarray(layout.to_slices(vol)[:, :, ::-1]))


@pytest.mark.parametrize("prompt", ["left lung", "lung"])
def test_flip_is_the_mean_of_the_direct_and_the_mirrored_run(prompt):
    """A model that reads the picture itself (and 'left'): flip = mean of the direct answer and the
    answer on the mirrored volume with the words swapped, mirrored back."""
    vol = _blobby_volume((5, 20, 26))
    m = np.diag([-0.9, -0.9, 2.0, 1.0])
    model = _image_model()
    direct = segment_volume(vol, m, [prompt], model, device="cpu", return_probability=True)[0]
    swapped = prompt.replace("left", "right")
    mirrored = segment_volume(_mirror(vol, m), m, [swapped], model, device="cpu", return_probability=True)[0]
    expected = (direct.probability.astype(np.float64) + _mirror(mirrored.probability, m)) / 2
    flipped = segment_volume(vol, m, [prompt], model, device="cpu", return_probability=True, flip=True, batch_size=2)[0]
    # a side word makes the two views differ (this model reads the picture pixel by pixel, so without
    # one its answer is mirror-symmetric)
    assert np.allclose(direct.probability, _mirror(mirrored.probability, m), atol=1e-5) == ("left" not in prompt)
    np.testing.assert_allclose(flipped.probability, expected, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(flipped.labels, (flipped.probability >= 0.5).astype(np.uint8))


def test_flip_on_a_single_xray_and_with_a_sampling_model():
    """A one-slice picture is flipped like an axial / coronal slice; a model that samples draws its
    samples on both views, and its uncertainty is their variance over both."""
    image = io.read_volume(io.sample_path(f"qata/{XRAY}.png"))
    sampler = _sampler(32, 3)
    r = segment_volume(image.array, image.ijk_to_ras, ["lung"], sampler, device="cpu", return_probability=True,
                       flip=True)[0]
    direct = segment_volume(image.array, image.ijk_to_ras, ["lung"], sampler, device="cpu",
                            return_probability=True)[0]
    m = image.ijk_to_ras
    mirrored = segment_volume(_mirror(image.array, m), m, ["lung"], sampler, device="cpu",
                              return_probability=True)[0]
    back_p, back_u = _mirror(mirrored.probability, m), _mirror(mirrored.uncertainty, m)
    mean = (direct.probability.astype(np.float64) + back_p) / 2
    np.testing.assert_allclose(r.probability, mean, atol=1e-6)
    # variance of the union of both sample sets (equal sizes)
    union = (direct.uncertainty + back_u) / 2 + ((direct.probability - back_p) / 2) ** 2
    np.testing.assert_allclose(r.uncertainty, union, atol=1e-6)


def test_sagittal_slices_are_not_flipped(caplog):
    vol = _blobby_volume((16, 24, 32))
    model = _image_model()
    plain = segment_volume(vol, LPS_IDENTITY, ["left lung"], model, axis="sagittal", device="cpu",
                           return_probability=True)[0]
    with caplog.at_level(logging.WARNING, logger="TextGuidedSegLib.engine"):
        flipped = segment_volume(vol, LPS_IDENTITY, ["left lung"], model, axis="sagittal", device="cpu",
                                 return_probability=True, flip=True)[0]
    np.testing.assert_array_equal(flipped.probability, plain.probability)
    assert "no test-time flip on sagittal slices" in caplog.text


def test_flip_with_an_ensemble_is_the_mean_of_the_members_flips(tiny_dirs):
    a, b = (model_store.load_model(str(d)) for d in tiny_dirs)
    image = io.read_volume(io.sample_path(f"qata/{XRAY}.png"))
    run = dict(device="cpu", return_probability=True, flip=True, prompt_laterality="image")
    pa, pb = (segment_volume(image.array, image.ijk_to_ras, ["lower left lung"], x, **run)[0].probability
              for x in (a, b))
    r = segment_volume(image.array, image.ijk_to_ras, ["lower left lung"], Ensemble([a, b], [0.25, 0.75]), **run)[0]
    np.testing.assert_allclose(r.probability, 0.25 * pa.astype(np.float64) + 0.75 * pb, atol=1e-6)


# ------------------------------------------------------------------ spec, manifest, store


@pytest.mark.parametrize("text, expected", [
    ("a,b", [("a", 0.5), ("b", 0.5)]),
    (" a , b ,c", [("a", 1 / 3), ("b", 1 / 3), ("c", 1 / 3)]),
    ("a:0.5,b:0.3,c:0.2", [("a", 0.5), ("b", 0.3), ("c", 0.2)]),
    ("a:0.3333,b:0.3333,c:0.3334", [("a", 0.3333), ("b", 0.3333), ("c", 0.3334)]),
])
def test_parse_model_spec(text, expected):
    parsed = parse_model_spec(text)
    assert [n for n, _ in parsed] == [n for n, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected])
    assert sum(w for _, w in parsed) == pytest.approx(1.0, abs=1e-12)
    assert [n for n, _ in parse_model_spec(spec_text(parsed))] == [n for n, _ in parsed]
    assert spec_text([("a", 0.5), ("b", 0.5)]) == "a,b" and spec_text([("a", 0.6), ("b", 0.4)]) == "a:0.6,b:0.4"


@pytest.mark.parametrize("text, words", [
    ("a,,b", ["empty member"]),
    ("a:0.5,b", ["every member or to none"]),
    ("a:0.5,b:0.4", ["sum to 1", "0.9"]),
    ("a:-0.5,b:1.5", ["positive", "-0.5"]),
    ("a:0,b:1", ["positive"]),
    ("a,a", ["more than once"]),
])
def test_parse_model_spec_refuses(text, words):
    with pytest.raises(ValueError) as info:
        parse_model_spec(text)
    for w in words:
        assert w in str(info.value)


def test_ensemble_object_checks_its_members():
    a, b = _image_model(), _image_model()
    with pytest.raises(ValueError, match="at least two"):
        Ensemble([a])
    with pytest.raises(ValueError, match="sum to 1"):
        Ensemble([a, b], [0.5, 0.6])
    free = LoadedModel(model=a.model.__class__(), config=ModelConfig(model_type="f", image_size=16),
                       metadata={"name": "free"})
    free.model.requires_text = False
    with pytest.raises(ValueError, match="text-free"):
        Ensemble([a, free])
    assert members_of(a) == [(a, 1.0)]


def test_manifest_ensemble_loads():
    entry = model_store.resolve_model("qata-ensemble-cpu")
    assert entry.source == "ensemble" and entry.model_type == "ensemble" and entry.path is None
    assert [n for n, _ in entry.members] == QATA_MODELS and sum(w for _, w in entry.members) == pytest.approx(1)
    assert not entry.text_free
    assert model_store.domain_folder(entry) == model_store.resolve_model("tmc-qata-cpu").path
    assert "qata-ensemble-cpu" in [e.name for e in model_store.list_models()]
    assert not model_store.needs_download("qata-ensemble-cpu")
    ensemble = model_store.load_model("qata-ensemble-cpu")
    assert isinstance(ensemble, Ensemble) and ensemble.name == "qata-ensemble-cpu"
    assert [m.name for m in ensemble.members] == QATA_MODELS
    assert ensemble.members[0] is model_store.load_model("tmc-qata-cpu")  # members are the cached models
    assert ensemble.samples_masks  # SVP-CVAE


def test_shipped_ensemble_is_the_mean_of_the_shipped_models():
    """On a shipped X-ray: the ensemble's probability is the mean of its four members', and it finds
    the infection on the side the report names."""
    image = io.read_volume(io.sample_path(f"qata/{XRAY}.png"))
    truth = io.read_volume(io.sample_path(f"qata/{XRAY}_mask.png")).array > 127
    run = dict(device="cpu", return_probability=True)
    [r] = segment_volume(image.array, image.ijk_to_ras, [REPORT_RIGHT], model_store.load_model("qata-ensemble-cpu"),
                         **run)
    members = [segment_volume(image.array, image.ijk_to_ras, [REPORT_RIGHT], model_store.load_model(n), **run)[0]
               for n in QATA_MODELS]
    mean = np.mean([x.probability.astype(np.float64) for x in members], axis=0)
    np.testing.assert_allclose(r.probability, mean, atol=1e-6, rtol=0)
    assert r.model_prompt == REPORT_RIGHT.replace("right", "left")  # every member reads image sides
    inter = np.logical_and(r.labels > 0, truth).sum()
    assert 2 * inter / ((r.labels > 0).sum() + truth.sum()) > 0.6
    half = image.array.shape[2] // 2
    assert r.labels[0][:, :half].sum() > 0.8 * r.labels.sum()  # the patient's right = the image's left


@pytest.mark.parametrize("spec, words", [
    ("tmc-qata-cpu,no-such-model", ["no-such-model", "not found"]),
    ("tmc-qata-cpu:0.6,ssa-qata-cpu:0.3", ["sum to 1"]),
    ("tmc-qata-cpu:1.2,ssa-qata-cpu:-0.2", ["positive"]),
    ("tmc-qata-cpu,prolearn-qata-cpu-1pct", ["text-free", "not supported"]),
    ("tmc-qata-cpu,tmc-kvasir-cpu", ["different inputs", "chest", "colon"]),
    ("tmc-qata-cpu,qata-ensemble-cpu", ["itself an ensemble"]),
])
def test_store_refuses_bad_ensembles(spec, words):
    with pytest.raises(model_store.CheckpointError) as info:
        model_store.resolve_model(spec)
    for w in words:
        assert w in str(info.value)


def test_schema_accepts_the_ensemble_and_refuses_bad_ones():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((model_store.PACKAGE_DIR / "Models-schema.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    manifest = json.loads(model_store.MANIFEST.read_text(encoding="utf-8"))
    validator.validate(manifest)
    [entry] = [e for e in manifest["models"] if "members" in e]
    for change in ({"sha256": "0" * 64}, {"model_type": "tmc"}, {"members": entry["members"][:1]},
                   {"members": [{"name": "a", "weight": -1}, {"name": "b", "weight": 2}]},
                   {"path": "pretrained/x"}, {"members": [{"name": "a"}, {"name": "b"}]}):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate({"schema_version": 1, "models": [{**entry, **change}]})


# ------------------------------------------------------------------ command line


def _assert_user_error(rc, err, out_dir, *words):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("textguidedseg: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_cli_predict_with_two_models_writes_a_segmentation(cli, tiny_dirs, tmp_path):
    image = io.sample_path(f"qata/{XRAY}.png")
    spec = f"{tiny_dirs[0]}:0.6,{tiny_dirs[1]}:0.4"
    rc, out, err = cli("predict", image, "--model", spec, "--prompt", "lower left lung", "--output", tmp_path / "o",
                       "--device", "cpu", "--quiet", "--probability", "--force", "--flip")
    assert rc == 0, err
    [segment], _ = io.read_segmentation(tmp_path / "o" / f"{XRAY}.seg.nrrd")
    assert segment.name == "lower left lung"
    probability = io.read_volume(tmp_path / "o" / f"{XRAY}_lower_left_lung_probability.nrrd").array
    assert (tmp_path / "o" / f"{XRAY}_lower_left_lung_uncertainty.nrrd").is_file()  # the members' disagreement
    vol = io.read_volume(image)
    ensemble = model_store.load_model(spec)
    expected = segment_volume(vol.array, vol.ijk_to_ras, ["lower left lung"], ensemble, device="cpu",
                              return_probability=True, flip=True)[0]
    np.testing.assert_allclose(probability, expected.probability, atol=1e-6)
    np.testing.assert_array_equal(segment.mask, expected.labels > 0)


def test_cli_predict_with_the_manifest_ensemble(cli, tmp_path):
    image = io.sample_path(f"qata/{XRAY}.png")
    rc, out, err = cli("predict", image, "--model", "qata-ensemble-cpu", "--prompt", REPORT_RIGHT, "--output",
                       tmp_path, "--device", "cpu", "--quiet")
    assert rc == 0, err
    [segment], _ = io.read_segmentation(tmp_path / f"{XRAY}.seg.nrrd")
    truth = io.read_volume(io.sample_path(f"qata/{XRAY}_mask.png")).array > 127
    assert 2 * np.logical_and(segment.mask, truth).sum() / (segment.mask.sum() + truth.sum()) > 0.6
    # the members' domain: a brain MR volume is refused like it is for each member
    rc, out, err = cli("predict", io.sample_path("brain1_image.nrrd"), "--model", "qata-ensemble-cpu", "--prompt",
                       "lung", "--output", tmp_path / "brain", "--device", "cpu", "--quiet")
    _assert_user_error(rc, err, tmp_path / "brain", "model 'qata-ensemble-cpu' is for chest X-ray")


@pytest.mark.parametrize("spec, words", [
    ("tmc-qata-cpu,no-such-model", ["no-such-model", "not found"]),
    ("tmc-qata-cpu:0.5,ssa-qata-cpu:0.4", ["sum to 1"]),
    ("tmc-qata-cpu:-0.5,ssa-qata-cpu:1.5", ["positive"]),
    ("tmc-qata-cpu,prolearn-qata-cpu-1pct", ["text-free"]),
])
def test_cli_refuses_bad_ensembles_in_one_line(cli, tmp_path, spec, words):
    image = io.sample_path(f"qata/{XRAY}.png")
    out = tmp_path / "out"
    rc, _, err = cli("predict", image, "--model", spec, "--prompt", "lung", "--output", out, "--quiet")
    _assert_user_error(rc, err, out, *words)
    rc, _, err = cli("evaluate", "--model", spec, "--dataset", "csv", "--data-root", tmp_path / "none.csv", "--quiet")
    assert rc == 2 and "Traceback" not in err


def _csv_dataset(tmp_path):
    rows = ["case_id,image,mask,text,split"]
    for cid in ("cxr_s11234-e19977-r1", "cxr_s11242-e20020-r1", "cxr_s11247-e20029-r1"):
        report = io.sample_path(f"qata/{cid}.txt").read_text(encoding="utf-8").strip().replace('"', "'")
        rows.append(f'{cid},{io.sample_path(f"qata/{cid}.png")},{io.sample_path(f"qata/{cid}_mask.png")},'
                    f'"{report}",val')
    path = tmp_path / "cases.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_cli_evaluate_scores_an_ensemble_with_the_flip(cli, tiny_dirs, tmp_path):
    from PIL import Image

    from TextGuidedSegLib.data import read_grey
    from TextGuidedSegLib.evaluation import IMAGE_IJK_TO_RAS

    csv_path = _csv_dataset(tmp_path)
    spec = f"{tiny_dirs[0]},{tiny_dirs[1]}"
    preds, summary_path = tmp_path / "preds", tmp_path / "summary.json"
    rc, out, err = cli("evaluate", "--model", spec, "--dataset", "csv", "--data-root", csv_path, "--flip",
                       "--save-predictions", preds, "--json", summary_path, "--device", "cpu", "--quiet")
    assert rc == 0, err
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    assert summary["flip"] is True and summary["cases"] == 3 and summary["model"] == spec
    for key in ("dice_global", "dice_per_image", "laterality_error_rate", "seconds_per_case", "uncertainty_auroc"):
        assert key in summary, key
    assert "text-aware flip" in out and "ms per image" in out and "members' disagreement" in out
    ensemble = model_store.load_model(spec)
    for cid in ("cxr_s11234-e19977-r1", "cxr_s11242-e20020-r1", "cxr_s11247-e20029-r1"):
        saved = np.asarray(Image.open(preds / f"{cid}.png")) > 127
        report = io.sample_path(f"qata/{cid}.txt").read_text(encoding="utf-8").strip().replace('"', "'")
        expected = segment_volume(read_grey(io.sample_path(f"qata/{cid}.png")), IMAGE_IJK_TO_RAS, [report], ensemble,
                                  batch_size=1, device="cpu", prompt_laterality="image", flip=True)[0]
        np.testing.assert_array_equal(saved, expected.labels[0] > 0)


def test_cli_models_list_and_info_show_the_ensemble(cli):
    rc, out, err = cli("models", "list")
    assert rc == 0, err
    line = next(l for l in out.splitlines() if l.startswith("qata-ensemble-cpu"))
    assert "ensemble of tmc-qata-cpu (0.25)" in line and "chest X-ray" in line
    rc, out, err = cli("models", "info", "qata-ensemble-cpu")
    assert rc == 0, err
    assert "members (weight): tmc-qata-cpu (0.25), ssa-qata-cpu (0.25)" in out
    assert json.loads(out[out.index("{"):])["members"][0] == {"name": "tmc-qata-cpu", "weight": 0.25}


def test_worker_accepts_the_flip_option(tmp_path):
    from TextGuidedSegLib.worker import JOB_OPTIONS, REQUEST_NAME, WorkerJob

    assert "flip" in JOB_OPTIONS

    class NoWorker:  # a job folder is written, nothing is started
        pid = 0

        def submit(self, job_dir):
            self.job_dir = job_dir

    worker = NoWorker()
    job = WorkerJob.start(np.zeros((1, 4, 4)), np.eye(4), ["lung"], "qata-ensemble-cpu", options={"flip": True},
                          worker=worker, temp_root=str(tmp_path))
    request = json.loads((job.job_dir / REQUEST_NAME).read_text(encoding="utf-8"))
    assert request["options"] == {"flip": True} and request["model"] == "qata-ensemble-cpu"
