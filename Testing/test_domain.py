"""Each model's domain and the input check: metadata rules, the learned score, the CLI's refusal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from TextGuidedSegLib import io
from TextGuidedSegLib.domain import (DOMAIN_JSON, DomainStatistics, ModelDomain, check_input, describe_slices,
                                     describe_thumbnail, fitting_models, metadata_problems, read_domain)
from TextGuidedSegLib.model_store import DEFAULT_MODEL, domain_folder, list_models, resolve_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
XRAY = ModelDomain("X-ray", "2D", "chest", "lung infection")
QATA_SAMPLES = sorted(p for p in (REPO / "TextGuidedSegLib" / "samples" / "qata").glob("*.png") if "_mask" not in p.name)


def _ct_volume() -> tuple[np.ndarray, np.ndarray]:
    """A CT-like int16 volume in Hounsfield units: air outside a water-density body with bone."""
    z, y, x = np.mgrid[:20, :64, :64]
    body = ((y - 32) ** 2 / 28 ** 2 + (x - 32) ** 2 / 22 ** 2) < 1
    volume = np.where(body, 40, -1000).astype(np.int16)
    volume[(body) & ((y - 45) ** 2 + (x - 32) ** 2 < 16)] = 700  # spine
    return volume, np.diag([-0.8, -0.8, 3.0, 1.0])


def test_thumbnail_descriptor_values():
    flat = describe_thumbnail(np.full((24, 24), 0.25, dtype=np.float32))
    assert flat.shape == (135,) and flat.dtype == np.float32
    np.testing.assert_allclose(flat[:64], 0.25)  # 8 x 8 block means
    np.testing.assert_allclose(flat[64:118], 0.0)  # no gradients: empty orientation histograms
    histogram = flat[118:134]
    assert histogram[4] == 1.0 and histogram.sum() == 1.0  # every pixel in the bin [0.25, 0.3125)
    assert flat[134] == 0.0  # left-right symmetric
    ramp = describe_thumbnail(np.tile(np.linspace(0, 1, 24, dtype=np.float32), (24, 1)))
    cells = ramp[64:118].reshape(9, 6)
    np.testing.assert_allclose(cells[:, 0], 1.0, atol=1e-5)  # horizontal gradients only: orientation bin 0
    assert ramp[134] > 0.4  # a ramp is far from symmetric


def test_statistics_score_in_and_out_of_distribution(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, (500, 20)) @ rng.normal(0, 1, (20, 20))
    stats = DomainStatistics.fit(train, components=4)
    inside = stats.score(rng.normal(0, 1, (200, 20)) @ rng.normal(0, 1, (20, 20)))
    near = stats.score(train[:200])
    shifted = stats.score(train[:200] + 10 * train.std(0))
    assert np.median(near) < 1.5 and shifted.min() > near.max()
    assert inside.shape == (200,)
    stats.save(tmp_path / "s.safetensors")
    again = DomainStatistics.load(tmp_path / "s.safetensors")
    np.testing.assert_allclose(again.score(train[:50]), stats.score(train[:50]), rtol=1e-5)
    with pytest.raises(ValueError, match="need more than 4 descriptors"):
        DomainStatistics.fit(train[:3], components=4)


def test_metadata_rules_name_the_problem():
    ct, _ = _ct_volume()
    problems = metadata_problems(XRAY, ct)
    assert problems[0] == "the input is a 3D volume (20 x 64 x 64 voxels), not a single picture"
    assert problems[1].startswith("its intensities look like CT Hounsfield units (") and "minimum -1000" in problems[1]
    assert metadata_problems(XRAY, np.zeros((1, 50, 60), np.uint8), colour=True) == [
        "it is a colour picture, and the model was trained on grey X-ray images"]
    assert metadata_problems(XRAY, np.zeros((1, 50, 60), np.uint8)) == []
    volume_model = ModelDomain("MR", "3D", "brain", "hippocampus")
    assert metadata_problems(volume_model, np.zeros((1, 50, 60), np.uint8)) == [
        "the input is a single 2D picture (50 x 60 pixels), not a volume"]
    assert metadata_problems(ModelDomain("CT", "3D", "abdomen", "organs"), ct) == []  # CT values for a CT model
    with pytest.raises(ValueError, match="modality must be one of"):
        ModelDomain("ultrasound", "2D", "heart", "")


def test_every_shipped_model_states_its_domain():
    for entry in list_models():
        if entry.source != "shipped":
            continue
        found = read_domain(entry.path)
        assert found is not None, f"{entry.name} has no {DOMAIN_JSON}"
        domain, stats = found
        assert domain.calibration["detection_rate"], entry.name
        if stats is None:  # rules only: allowed when the card says why, and they must not refuse the own kind
            assert domain.threshold is None and domain.calibration["learned_score"].startswith("not fitted: ")
            assert domain.calibration["validation_false_alarm_rate"]["metadata_rules"] == 0.0, entry.name
            assert domain.summary().startswith("brain MR, 3D volumes")
            continue
        assert domain.threshold is not None and domain.threshold > 0
        rates = domain.calibration["validation_false_alarm_rate"]
        # the threshold is the 99th percentile of validation: about 1 %, or one input of a small
        # validation set (hippocampus-mr-cpu: 1 of 26 volumes)
        n_val = int(re.search(r"\((\d+) ", domain.calibration["threshold_from"]).group(1))
        assert 0.0 < rates["learned_score"] <= max(0.02, 1.0 / n_val + 1e-9), entry.name
        assert domain.summary().startswith(("chest X-ray, 2D pictures", "colon endoscopy, 2D pictures",
                                            "brain (medial temporal lobe) MR, 3D volumes"))


def test_default_model_accepts_chest_xrays_and_refuses_other_domains():
    entry = resolve_model(DEFAULT_MODEL)
    for sample in QATA_SAMPLES:  # validation X-rays shipped with the package
        vol = io.read_volume(sample)
        check = check_input(entry.name, domain_folder(entry), vol.array, vol.ijk_to_ras, colour=vol.colour)
        assert check.ok, (sample.name, check.problems)
    brain = io.read_volume(io.sample_path("brain1_image.nrrd"))  # an MR volume
    check = check_input(entry.name, domain_folder(entry), brain.array, brain.ijk_to_ras)
    assert not check.ok and check.problems[0].startswith("the input is a 3D volume (13 x 256 x 256 voxels)")
    assert any(p.startswith("it looks unlike the model's training images") for p in check.problems)
    ct, matrix = _ct_volume()
    check = check_input(entry.name, domain_folder(entry), ct, matrix)
    assert any("CT Hounsfield units" in p for p in check.problems)
    message = check.message(fits=[])
    assert message.startswith(f"model '{DEFAULT_MODEL}' is for chest X-ray, 2D pictures; prompts: ")
    assert message.endswith("; no installed model fits this input. Nothing was written; use --force to segment anyway")


@pytest.mark.skipif(not (SHARED / "kvasir").is_dir(), reason="needs ../shared/data/kvasir (the dataset bundle)")
def test_colonoscopy_frame_goes_to_the_polyp_model():
    frame = sorted((SHARED / "kvasir" / "images").glob("*.jpg"))[0]
    vol = io.read_volume(frame)
    assert vol.colour
    check = check_input(DEFAULT_MODEL, domain_folder(resolve_model(DEFAULT_MODEL)), vol.array, vol.ijk_to_ras,
                        colour=True)
    assert "it is a colour picture, and the model was trained on grey X-ray images" in check.problems
    assert fitting_models(list_models(), vol.array, vol.ijk_to_ras, colour=True) == ["tmc-kvasir-cpu"]


def test_learned_score_alone_separates_a_colonoscopy_like_frame(tmp_path):
    """Without metadata (a grey single picture), the learned score still flags a frame unlike X-rays: a dark
    lumen in a bright ring, as in colonoscopy."""
    entry = resolve_model(DEFAULT_MODEL)
    y, x = np.mgrid[:224, :224]
    r = np.hypot(y - 112, x - 112)
    frame = (200 * np.exp(-((r - 70) / 30) ** 2) + 20).astype(np.uint8)[None]
    check = check_input(entry.name, domain_folder(entry), frame, np.diag([-1.0, -1.0, 1.0, 1.0]))
    assert metadata_problems(check.domain, frame) == []
    assert check.score > check.domain.threshold and not check.ok
    xray = io.read_volume(QATA_SAMPLES[0])
    assert describe_slices(xray.array, xray.ijk_to_ras).shape == (1, 135)


# ------------------------------------------------------------------ the CLI


def _predict(cli, out, *inputs, extra=()):
    return cli("predict", *inputs, "--output", out, "--prompt", "lung infection", "--device", "cpu", "--quiet",
               *extra)


def test_cli_refuses_a_volume_for_the_xray_model_and_force_overrides(cli, tmp_path):
    out = tmp_path / "out"
    brain = io.sample_path("brain1_image.nrrd")
    rc, stdout, err = _predict(cli, out, brain)
    assert rc == 2 and not out.exists(), err  # no output, not even an empty folder
    line, = err.strip().splitlines()
    assert line.startswith(f"textguidedseg: error: {brain}: model '{DEFAULT_MODEL}' is for chest X-ray, 2D pictures")
    assert "the input is a 3D volume (13 x 256 x 256 voxels), not a single picture" in line
    assert line.endswith("Nothing was written; use --force to segment anyway")

    rc, stdout, err = _predict(cli, out, brain, extra=("--force",))
    assert rc == 0, err
    assert "warning:" in err and "segmenting anyway (--force)" in err
    assert (out / "brain1_image.seg.nrrd").is_file()


def _ct_file(folder: Path) -> Path:
    volume, matrix = _ct_volume()
    return io.write_volume(folder / "abdomen_ct.nii.gz", volume, matrix)


def _colonoscopy_frame(folder: Path) -> Path:
    frames = sorted((SHARED / "kvasir" / "images").glob("*.jpg"))
    if not frames:
        pytest.skip("needs ../shared/data/kvasir (the dataset bundle)")
    return frames[0]


@pytest.mark.parametrize("make_input, problem", [
    (_ct_file, "its intensities look like CT Hounsfield units"),
    (_colonoscopy_frame, "it is a colour picture, and the model was trained on grey X-ray images"),
])
def test_cli_refuses_ct_and_colonoscopy_for_the_xray_model(cli, tmp_path, make_input, problem):
    source = make_input(tmp_path)
    out = tmp_path / "out"
    rc, _, err = _predict(cli, out, source)
    assert rc == 2 and not out.exists(), err
    line, = err.strip().splitlines()
    assert line.startswith(f"textguidedseg: error: {source}: model '{DEFAULT_MODEL}' is for chest X-ray")
    assert problem in line
    if make_input is _colonoscopy_frame:  # the polyp model fits it, and the message says so
        assert "installed models that fit this input: tmc-kvasir-cpu" in line


def test_cli_runs_a_chest_xray_without_warning_and_never_overwrites(cli, tmp_path):
    out = tmp_path / "out"
    rc, stdout, err = _predict(cli, out, QATA_SAMPLES[0])
    assert rc == 0 and "warning" not in err.lower(), err
    target = out / (QATA_SAMPLES[0].name[:-4] + ".seg.nrrd")
    before = target.stat().st_mtime_ns
    rc, _, err = _predict(cli, out, QATA_SAMPLES[0])
    assert rc == 2 and err.strip() == (f"textguidedseg: error: {target} already exists (1 of the outputs do); pass "
                                       "--overwrite to replace them, or choose another --output")
    assert target.stat().st_mtime_ns == before
    rc, _, err = _predict(cli, out, QATA_SAMPLES[0], extra=("--overwrite",))
    assert rc == 0, err


def test_cli_cheap_checks_come_first_and_leave_no_folder(cli, tmp_path, monkeypatch):
    import TextGuidedSegLib.model_store as store

    loads = []
    monkeypatch.setattr(store, "load_model", lambda *a, **k: loads.append(a))
    out = tmp_path / "out"
    for args, words in (
            (("--prompt", "  "), "--prompt number 1 is an empty prompt"),
            (("--prompt", "lung", "--threshold", "1.5"), "--threshold must be between 0 and 1"),
            (("--prompt", "lung", "--model", "no-such-model"), "model 'no-such-model' not found")):
        rc, _, err = cli("predict", QATA_SAMPLES[0], "--output", out, *args)
        assert rc == 2 and words in err and not out.exists(), err
    assert loads == []  # refused before any model was loaded


def test_cli_help_gives_every_option_a_help_and_its_default(capsys):
    from TextGuidedSegLib.cli import build_parser

    parser = build_parser()
    for command in ("predict", "evaluate", "models"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = capsys.readouterr().out
        sub = parser._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            assert action.help, (command, action.dest)
            if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
                assert "default" in (action.help or "").lower() or f"(default: {action.default})" in text, (
                    command, action.dest)
    with pytest.raises(SystemExit):
        parser.parse_args(["predict", "--help"])
    assert "probability at or above which a voxel is labelled (default: 0.5)" in " ".join(
        capsys.readouterr().out.split())


def test_models_list_and_info_state_the_domain(cli):
    rc, out, _ = cli("models", "list")
    assert rc == 0
    line = next(l for l in out.splitlines() if l.startswith("tmc-qata-cpu"))
    assert line.startswith("tmc-qata-cpu ") and "chest X-ray, 2D pictures" in line
    line = next(l for l in out.splitlines() if l.startswith(DEFAULT_MODEL))
    assert line.startswith(f"{DEFAULT_MODEL} (default)") and "chest X-ray, 2D pictures" in line
    assert "colon endoscopy, 2D pictures" in next(l for l in out.splitlines() if l.startswith("tmc-kvasir-cpu"))
    rc, out, _ = cli("models", "info", "tmc-qata-cpu")
    lines = out.splitlines()
    assert lines[0].startswith("tmc-qata-cpu: TMC")
    assert lines[1] == "  for: chest X-ray, 2D pictures (grey)"
    assert any(l.startswith("  input check: threshold ") and "false alarms on validation" in l for l in lines)
    assert json.loads(out[out.index("{"):])["name"] == "tmc-qata-cpu"


def test_loaded_model_carries_the_name_users_type():
    from TextGuidedSegLib.model_store import load_model

    assert load_model("tmc-qata-cpu").name == "tmc-qata-cpu"


def test_batch_script_without_slicer_says_what_to_install(tmp_path):
    blocker = tmp_path / "slicer"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError(\"No module named 'slicer'\")\n", encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(REPO / "TextGuidedSeg" / "Scripts" / "batch_segment.py"), "--input",
                           str(QATA_SAMPLES[0]), "--prompt", "lung", "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert line.startswith("batch_segment: error: this script needs Slicer's Python")
    assert "pip install slicer-core" in line and "textguidedseg predict" in line
    assert not (tmp_path / "out").exists()
