"""The child-process worker on its own (no Slicer): what the panel relies on, on every Python it runs on."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import torch

from conftest import make_tiny_tmc_config
from TextGuidedSegLib.checkpoint import save_pretrained
from TextGuidedSegLib.engine import segment_volume
from TextGuidedSegLib.model_store import load_model
from TextGuidedSegLib.models import build_model
from TextGuidedSegLib.worker import RESULTS_DIR, WorkerJob, WorkerProcess, main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_pretrained(build_model(make_tiny_tmc_config()), tmp_path_factory.mktemp("models") / "tiny-tmc")


def _volume() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    volume = rng.normal(100, 30, size=(5, 40, 48)).astype(np.int16)
    ijk_to_ras = np.diag([-0.8, -0.8, 2.5, 1.0])  # LPS-stored axial volume: left/right from the matrix
    return volume, ijk_to_ras


def _run_to_end(job: WorkerJob, timeout: float = 120.0) -> list[dict]:
    events, start = [], time.monotonic()
    while job.final is None:
        assert time.monotonic() - start < timeout, f"worker did not finish: {job.log_tail()}"
        events += job.poll()
        time.sleep(0.02)
    return events


def test_worker_results_equal_the_engine(tiny_model_dir, tmp_path):
    volume, ijk_to_ras = _volume()
    prompts = ["lung infection, lower left lobe", "spleen"]
    model = load_model(str(tiny_model_dir), device="cpu")
    probe = segment_volume(volume, ijk_to_ras, prompts[:1], model, device="cpu", return_probability=True)
    threshold = float(np.median(probe[0].probability))  # mixed labels: the comparison means something
    expected = segment_volume(volume, ijk_to_ras, prompts, model, device="cpu", threshold=threshold,
                              return_probability=True)

    worker = WorkerProcess(temp_root=str(tmp_path))
    job = WorkerJob.start(volume, ijk_to_ras, prompts, str(tiny_model_dir), temp_root=str(tmp_path), worker=worker,
                          options=dict(device="cpu", threshold=threshold, return_probability=True, batch_size=2))
    events = _run_to_end(job)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "done" and events[0]["pid"] == job.pid == worker.pid
    assert events[0]["python"] == "%d.%d.%d" % sys.version_info[:3] and events[0]["warm"] is False
    progress = [(e["done"], e["total"]) for e in events if e["event"] == "progress"]
    assert progress == [(2, 10), (4, 10), (5, 10), (7, 10), (9, 10), (10, 10)]  # batches of 2 slices, 2 prompts
    results = job.results()
    assert [r.prompt for r in results] == prompts
    assert results[0].model_prompt == expected[0].model_prompt
    for got, want in zip(results, expected):
        assert 0.05 < want.labels.mean() < 0.95
        assert got.labels.dtype == np.uint8 and got.labels.shape == volume.shape
        np.testing.assert_array_equal(got.labels, want.labels)
        np.testing.assert_allclose(got.probability, want.probability, atol=1e-6)
        assert got.uncertainty is None
        assert got.voxels == want.voxels and got.confidence == pytest.approx(want.confidence, rel=1e-6)
        assert got.verdict == want.verdict
    json.loads((job.job_dir / RESULTS_DIR / "results.json").read_text())  # complete, not .partial
    job.cleanup()
    assert not job.job_dir.exists() and worker.alive

    again = WorkerJob.start(volume, ijk_to_ras, prompts[1:], str(tiny_model_dir), temp_root=str(tmp_path),
                            worker=worker, options=dict(device="cpu", threshold=threshold))
    events = _run_to_end(again)
    assert events[0]["event"] == "started" and events[0]["pid"] == worker.pid and events[0]["warm"] is True
    np.testing.assert_array_equal(again.results()[0].labels, expected[1].labels)
    again.cleanup()
    worker.close(timeout=60)  # stdin closed: the child exits by itself
    assert worker.process.returncode == 0 and list(tmp_path.iterdir()) == []


def test_idle_worker_exits_by_itself_and_on_sigterm(tmp_path):
    idle = WorkerProcess(temp_root=str(tmp_path), idle_seconds=1.0)
    assert idle.process.wait(60) == 0
    assert idle.log_tail().endswith("no job for 1 s: exiting")
    idle.close()
    waiting = WorkerProcess(temp_root=str(tmp_path))
    start = time.monotonic()
    while "TextGuidedSeg inference worker" not in waiting.log_tail():  # logged once its SIGTERM handler is set
        assert time.monotonic() - start < 60, waiting.log_tail()
        time.sleep(0.05)
    waiting.interrupt()  # no job running: it just exits
    assert waiting.process.wait(60) == 0
    waiting.close()
    assert list(tmp_path.iterdir()) == []


def test_worker_error_is_one_event_with_the_traceback(tmp_path):
    volume, ijk_to_ras = _volume()
    job = WorkerJob.start(volume, ijk_to_ras, ["liver"], str(tmp_path / "missing-model"), temp_root=str(tmp_path),
                          options={"device": "cpu"})
    events = _run_to_end(job)
    final = events[-1]
    assert final["event"] == "error" and final["type"] == "CheckpointError"
    assert "missing-model" in final["message"] and "not found" in final["message"]
    assert final["traceback"].startswith("Traceback") and job.worker.alive  # an error ends the job, not the child
    with pytest.raises(RuntimeError, match="has not finished successfully"):
        job.results()
    job.cleanup()
    job.worker.close()
    assert list(tmp_path.iterdir()) == []


def test_bad_job_options_are_refused_before_anything_is_written(tmp_path):
    volume, ijk_to_ras = _volume()
    with pytest.raises(ValueError, match="unknown worker option.*colour; known: threshold"):
        WorkerJob.start(volume, ijk_to_ras, ["liver"], None, temp_root=str(tmp_path), options={"colour": "red"})
    with pytest.raises(ValueError, match=r"IJK->RAS must be a 4x4 matrix, got shape \(3, 3\)"):
        WorkerJob.start(volume, np.eye(3), ["liver"], None, temp_root=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_worker_skips_a_line_that_is_not_a_job_folder(tmp_path, monkeypatch, caplog):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{tmp_path / 'nope'}\n"))
    with caplog.at_level("ERROR"):
        assert main(["--idle-seconds", "5"]) == 0  # stdin ends after the bad line: a clean exit
    assert f"{tmp_path / 'nope'} is not a job folder (no request.json): skipped" in caplog.text
