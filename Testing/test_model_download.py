"""Downloading manifest models (model_store.download_model, ``textguidedseg models download``) from a
local HTTP server, and the manifest's JSON schema.

The server runs on 127.0.0.1 (port chosen by the OS) in a thread and serves a zip of a tiny random
model; ``model_store.MANIFEST`` points at a temporary Models.json naming it, and
``TEXTGUIDEDSEG_HOME`` at a temporary folder. Nothing here reaches the network.
"""

from __future__ import annotations

import functools
import http.server
import json
import sys
import threading
import zipfile
from pathlib import Path

import jsonschema
import pytest

from test_engine import save_tiny_model
from TextGuidedSegLib import model_store
from TextGuidedSegLib.checkpoint import WEIGHTS_NAME, CheckpointError, sha256_of
from TextGuidedSegLib.model_store import (DownloadCancelled, download_model, list_models, load_model,
                                          resolve_model)

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "TextGuidedSegLib" / "Models-schema.json"
NAME = "tiny-remote"
CHUNK = 4096


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002  (the base class's name)
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, zip path, weights SHA-256, weights size) of a tiny model served over HTTP."""
    root = tmp_path_factory.mktemp("served")
    model_dir = save_tiny_model(tmp_path_factory.mktemp("src") / "tiny")
    archive = root / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(model_dir.iterdir()):
            zf.write(f, f"tiny/{f.name}")
    weights = model_dir / WEIGHTS_NAME
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", archive, sha256_of(weights), weights.stat().st_size
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("TEXTGUIDEDSEG_HOME", str(home))
    return home


def _manifest(tmp_path, monkeypatch, served, **overrides) -> dict:
    """A Models.json: the shipped entries plus NAME at the test server; installed as model_store.MANIFEST."""
    base, archive, sha256, size = served
    shipped = json.loads(model_store.MANIFEST.read_text(encoding="utf-8"))
    entry = {"name": NAME, "version": "0.1.0", "model_type": "tmc", "description": "tiny random model",
             "url": f"{base}/{archive.name}", "archive": "zip", "sha256": sha256, "size": size,
             "licence": "Apache-2.0"}
    entry.update(overrides)
    manifest = {"schema_version": 1, "models": shipped["models"] + [entry]}
    path = tmp_path / "Models.json"
    path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    monkeypatch.setattr(model_store, "MANIFEST", path)
    return manifest


def _cache_contents(home: Path) -> list[str]:
    """Everything under the cache, hidden temp folders included."""
    root = home / "models"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


# ------------------------------------------------------------------ schema


def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_shipped_manifest_matches_schema():
    manifest = json.loads(model_store.MANIFEST.read_text(encoding="utf-8"))
    _validator().validate(manifest)
    names = [m["name"] for m in manifest["models"]]
    assert len(names) == len(set(names)), "model names must be unique"


@pytest.mark.parametrize("change", [
    {"url": "https://example.org/m.zip"},  # both path and url
    {"path": None},  # neither
    {"sha256": "ABC"},
    {"sha256": "g" * 64},
    {"size": "9344440"},
    {"licence": None},
    {"version": None},
    {"path": "../outside"},
    {"path": "/abs/model"},
    {"archive": "zip"},  # a shipped model is a directory
    {"path": None, "url": "ftp://example.org/m.zip"},
    {"path": None, "url": "https://example.org/m", "archive": "dir"},  # dir only from file://
    {"unknown_field": 1},
])
def test_schema_rejects_bad_entries(change):
    entry = dict(json.loads(model_store.MANIFEST.read_text(encoding="utf-8"))["models"][0])
    for key, value in change.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    with pytest.raises(jsonschema.ValidationError):
        _validator().validate({"schema_version": 1, "models": [entry]})


def test_test_manifest_matches_schema(tmp_path, monkeypatch, served):
    _validator().validate(_manifest(tmp_path, monkeypatch, served))


# ------------------------------------------------------------------ download


def test_download_installs_verified_model(tmp_path, monkeypatch, served, home):
    _manifest(tmp_path, monkeypatch, served)
    entry = {e.name: e for e in list_models()}[NAME]
    assert entry.source == "manifest" and entry.path is None and entry.url.startswith("http://127.0.0.1:")
    with pytest.raises(CheckpointError, match=f"models download {NAME}"):
        resolve_model(NAME)

    calls: list[tuple[int, int]] = []
    target = download_model(NAME, progress=lambda done, total: calls.append((done, total)), chunk_size=CHUNK)
    assert target == home / "models" / NAME
    zip_size = served[1].stat().st_size
    assert len(calls) == -(-zip_size // CHUNK)  # one call per chunk
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and all(t == zip_size for _, t in calls)
    assert calls[-1] == (zip_size, zip_size)
    assert [p for p in _cache_contents(home) if "/" not in p] == [NAME]  # no temp file or folder left

    entry = {e.name: e for e in list_models()}[NAME]
    assert entry.source == "manifest" and entry.path == target
    assert sha256_of(target / WEIGHTS_NAME) == served[2]
    model = load_model(NAME, device="cpu")
    assert model.config.model_type == "tmc" and model.path == target

    again: list = []  # installed and matching: nothing is fetched
    assert download_model(NAME, progress=lambda *a: again.append(a)) == target and again == []


def test_tampered_copy_is_not_installed(tmp_path, monkeypatch, served, home):
    _manifest(tmp_path, monkeypatch, served)
    target = download_model(NAME, chunk_size=1 << 16)
    weights = target / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert {e.name: e for e in list_models()}[NAME].path is None  # "installed" means the hash matched
    assert NAME not in [e.name for e in list_models() if e.source == "cache"]
    assert download_model(NAME) == target  # downloading again repairs it
    assert sha256_of(weights) == served[2]


def test_wrong_sha256_leaves_nothing(tmp_path, monkeypatch, served, home):
    wrong = "0" * 64
    _manifest(tmp_path, monkeypatch, served, sha256=wrong)
    with pytest.raises(CheckpointError) as info:
        download_model(NAME, chunk_size=CHUNK)
    assert wrong in str(info.value) and served[2] in str(info.value)
    assert _cache_contents(home) == []


def test_wrong_size_leaves_nothing(tmp_path, monkeypatch, served, home):
    _manifest(tmp_path, monkeypatch, served, size=served[3] + 1)
    with pytest.raises(CheckpointError, match=f"{served[3]} bytes.*expects {served[3] + 1}"):
        download_model(NAME, chunk_size=CHUNK)
    assert _cache_contents(home) == []


def test_cancel_after_first_chunk_leaves_nothing(tmp_path, monkeypatch, served, home):
    _manifest(tmp_path, monkeypatch, served)
    cancel = threading.Event()
    calls: list = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        cancel.set()

    with pytest.raises(DownloadCancelled):
        download_model(NAME, progress=progress, cancel=cancel, chunk_size=CHUNK)
    assert calls == [CHUNK]
    assert _cache_contents(home) == []


def test_unknown_name_lists_downloadable_models(tmp_path, monkeypatch, served, home):
    _manifest(tmp_path, monkeypatch, served)
    with pytest.raises(CheckpointError, match=f"'nope'.*downloadable: {NAME}"):
        download_model("nope")
    assert _cache_contents(home) == []


def test_missing_file_on_server(tmp_path, monkeypatch, served, home):
    _manifest(tmp_path, monkeypatch, served, url=f"{served[0]}/missing.zip")
    with pytest.raises(CheckpointError, match="could not download .*404"):
        download_model(NAME)
    assert _cache_contents(home) == []


def test_file_url_and_dir_archive(tmp_path, monkeypatch, served, home):
    _manifest(tmp_path, monkeypatch, served, url=served[1].as_uri())
    assert download_model(NAME) == home / "models" / NAME
    model_dir = tmp_path / "share" / "tiny"
    with zipfile.ZipFile(served[1]) as zf:
        zf.extractall(tmp_path / "share")
    _manifest(tmp_path, monkeypatch, served, name="tiny-dir", url=model_dir.as_uri(), archive="dir")
    assert download_model("tiny-dir") == home / "models" / "tiny-dir"
    assert sorted(p for p in _cache_contents(home) if "/" not in p) == sorted([NAME, "tiny-dir"])


# ------------------------------------------------------------------ CLI


def test_cli_download_and_list(tmp_path, monkeypatch, served, home, cli):
    _manifest(tmp_path, monkeypatch, served)
    rc, out, err = cli("models", "list")
    assert rc == 0 and f"not downloaded: textguidedseg models download {NAME}" in out
    rc, out, err = cli("models", "download", NAME)
    assert rc == 0, err
    assert f"downloaded {NAME}" in out
    rc, out, err = cli("models", "list")
    row = next(line.split() for line in out.splitlines() if line.startswith(NAME))
    assert row[1:3] == ["tmc", "manifest"] and row[-1] == str(home / "models" / NAME)
    rc, out, err = cli("models", "download", "nope")
    assert rc == 2 and "nope" in err and NAME in err


def test_cli_download_ctrl_c(tmp_path, monkeypatch, served, home, cli):
    _manifest(tmp_path, monkeypatch, served)
    import tqdm

    def interrupt(self, n=1):
        raise KeyboardInterrupt

    monkeypatch.setattr(tqdm.tqdm, "update", interrupt)
    rc, out, err = cli("models", "download", NAME)
    assert rc == 130
    assert "interrupted" in err and "Traceback" not in err
    assert _cache_contents(home) == []


# ------------------------------------------------------------------ Slicer module logic


def test_slicer_logic_downloads_on_demand(tmp_path, monkeypatch, served, home):
    pytest.importorskip("slicer", reason="PyPI slicer-core is needed for the Slicer logic")
    module_dir = REPO / "TextGuidedSeg"
    sys.path.insert(0, str(module_dir))
    try:
        import TextGuidedSeg
    finally:
        sys.path.remove(str(module_dir))
    _manifest(tmp_path, monkeypatch, served)
    logic = TextGuidedSeg.TextGuidedSegLogic()
    assert logic.modelNeedsDownload(NAME)
    assert not logic.modelNeedsDownload(None)  # the default model is shipped
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(DownloadCancelled):
        logic.downloadModel(NAME, cancel=cancel)
    assert _cache_contents(home) == []
    calls: list = []
    assert logic.downloadModel(NAME, progress=lambda d, t: calls.append((d, t))) == str(home / "models" / NAME)
    assert calls and calls[-1][0] == calls[-1][1]
    assert not logic.modelNeedsDownload(NAME)
