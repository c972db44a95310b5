"""Where models live: the ones shipped in the package, and a per-user cache for imported and downloaded ones.

``Models.json`` (next to this file; schema in ``Models-schema.json``) is the manifest: name, version,
model type, licence, and the SHA-256 and size of each model's weights file (``model.safetensors``),
checked on every load. An entry has either a ``path`` (shipped in the package) or a ``url`` (a
``.zip`` of a model directory, downloaded on request by :func:`download_model`), or it is an
ensemble: ``members`` names other models of the manifest with their weights (no weights of its own;
see :mod:`TextGuidedSegLib.ensemble`). A downloaded model counts as installed only while its weights'
SHA-256 matches the manifest. Wherever a model name is taken, ``a,b`` or ``a:0.6,b:0.4`` names an
ensemble on the spot. The cache location is
``$TEXTGUIDEDSEG_HOME/models`` when that variable is set, else ``~/.cache/textguidedseg/models``.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import os
import shutil
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .checkpoint import (PICKLE_SUFFIXES, WEIGHTS_NAME, CheckpointError, LoadedModel, load_pretrained, read_config,
                         sha256_of)
from .ensemble import Ensemble, is_ensemble_spec, parse_model_spec, spec_text

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
MANIFEST = PACKAGE_DIR / "Models.json"
#: The ensemble of the four text-guided chest X-ray models: on QaTa val 0.8977 / 0.8267 Dice (global / per-image)
#: against 0.8921 / 0.8188 for the best single model (tmc-qata-cpu), at about 5x its time per image (README).
DEFAULT_MODEL = "qata-ensemble-cpu"
DOWNLOAD_CHUNK_SIZE = 1 << 20
DOWNLOAD_TIMEOUT_S = 60.0


class DownloadCancelled(RuntimeError):
    """Raised when a download's ``cancel`` event is set; nothing is left in the cache."""


@dataclass
class ModelEntry:
    """A model :func:`list_models` knows. ``path`` is None for a manifest model not downloaded (yet) and
    for an ensemble, whose ``members`` are ``((name, weight), ...)`` (see :func:`domain_folder`)."""

    name: str
    path: Path | None
    source: str  # "shipped", "manifest" (downloadable), "cache" (imported), "path", "ensemble"
    model_type: str = ""
    sha256: str | None = None
    description: str = ""
    licence: str = ""
    version: str = ""
    url: str | None = None
    size: int | None = None
    archive: str = ""
    text_free: bool = False  # segments without a prompt (ProLearn); the widget allows an empty prompt box
    members: tuple = ()  # an ensemble's ((model name, weight), ...)


def cache_dir() -> Path:
    home = os.environ.get("TEXTGUIDEDSEG_HOME")
    base = Path(home) if home else Path.home() / ".cache" / "textguidedseg"
    return base / "models"


def manifest_entries() -> list[ModelEntry]:
    """The manifest as written: ``url`` entries have ``path`` None (see :func:`list_models`)."""
    if not MANIFEST.is_file():
        return []
    entries = []
    for item in json.loads(MANIFEST.read_text(encoding="utf-8"))["models"]:
        path = PACKAGE_DIR / item["path"] if item.get("path") else None
        members = tuple((m["name"], float(m["weight"])) for m in item.get("members", ()))
        source = "ensemble" if members else "shipped" if path else "manifest"
        entries.append(ModelEntry(item["name"], path, source, item.get("model_type", "ensemble" if members else ""),
                                  item.get("sha256"), item.get("description", ""), item.get("licence", ""),
                                  version=item.get("version", ""), url=item.get("url"), size=item.get("size"),
                                  archive=item.get("archive", ""), text_free=bool(item.get("text_free", False)),
                                  members=members))
    by_name = {e.name: e for e in entries}
    for e in entries:  # an ensemble is text-free when its members are (they must agree: see resolve_model)
        if e.members:
            e.text_free = all(by_name[n].text_free for n, _ in e.members if n in by_name)
    return entries


_HASHES: dict[tuple[str, int, int], str] = {}


def _weights_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered per (path, mtime, size): list_models() runs often."""
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _HASHES:
        _HASHES[key] = sha256_of(path)
    return _HASHES[key]


def installed_copy(entry: ModelEntry) -> Path | None:
    """``cache_dir()/<name>`` when it holds weights of the manifest's size and SHA-256, else None."""
    weights = cache_dir() / entry.name / WEIGHTS_NAME
    if not weights.is_file() or not entry.sha256:
        return None
    if entry.size is not None and weights.stat().st_size != entry.size:
        return None
    return weights.parent if _weights_sha256(weights) == entry.sha256.lower() else None


def list_models() -> list[ModelEntry]:
    """Manifest models first (shipped, then downloadable: ``path`` None until downloaded), then every
    other valid model directory in the user cache (imported)."""
    entries = []
    for e in manifest_entries():
        if e.url:
            entries.append(dataclasses.replace(e, path=installed_copy(e)))
        elif e.members or (e.path is not None and e.path.is_dir()):
            entries.append(e)
    downloadable = {e.name for e in entries if e.url or e.members}
    root = cache_dir()
    if root.is_dir():
        for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                        and p.name not in downloadable):
            try:
                cfg = read_config(d)
            except CheckpointError:
                continue
            entries.append(ModelEntry(d.name, d, "cache", cfg.get("model_type", ""),
                                      description=cfg.get("metadata", {}).get("name", ""),
                                      text_free=bool(cfg.get("config", {}).get("text_free", False))))
    return entries


def _spec_members(name_or_path: str) -> list[tuple[str, float]] | None:
    """The members of an ensemble written on the spot (``a,b`` / ``a:0.6,b:0.4``) or named in the
    manifest; None for a single model. Nothing is resolved or loaded."""
    if Path(name_or_path).is_dir():
        return None
    if is_ensemble_spec(name_or_path):
        try:
            return parse_model_spec(name_or_path)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
    entry = next((e for e in manifest_entries() if e.name == name_or_path), None)
    return list(entry.members) if entry is not None and entry.members else None


def _ensemble_entry(name: str, members: list[tuple[str, float]], template: ModelEntry | None) -> ModelEntry:
    """Check an ensemble's members (each an installed single model; all text models or all text-free;
    one domain) and describe it."""
    from .domain import read_domain

    resolved = []
    for member, _ in members:
        if _spec_members(member) is not None:
            raise CheckpointError(f"ensemble {name!r}: member {member!r} is itself an ensemble; list its members "
                                  "instead")
        try:
            resolved.append(resolve_model(member))
        except CheckpointError as exc:
            raise CheckpointError(f"ensemble {name!r}: {exc}") from None
    free = [e.name for e in resolved if e.text_free]
    if free and len(free) != len(resolved):
        raise CheckpointError(f"ensemble {name!r}: {', '.join(free)} {'is' if len(free) == 1 else 'are'} text-free "
                              "and the other members read text; mixing them is not supported")
    domains = {}
    for e in resolved:
        found = read_domain(e.path)
        if found is not None:
            d = found[0]
            domains[e.name] = (d.body_region, d.modality, d.dimensionality, d.colour)
    if len(set(domains.values())) > 1:
        raise CheckpointError(f"ensemble {name!r}: its members are made for different inputs ("
                              + "; ".join(f"{n}: {' '.join(v)}" for n, v in domains.items())
                              + "); combine models of one domain")
    weights = ", ".join(f"{m} {w:g}" for m, w in members)
    base = template or ModelEntry(name, None, "ensemble", "ensemble",
                                  description=f"ensemble of {len(members)} models (weights: {weights})")
    return dataclasses.replace(base, name=name, path=None, source="ensemble", model_type="ensemble",
                               members=tuple(members), text_free=bool(free))


def member_entries(entry: ModelEntry) -> list[tuple[ModelEntry, float]]:
    """An ensemble's members, resolved, with their weights; ``[(entry, 1.0)]`` for a single model."""
    if not entry.members:
        return [(entry, 1.0)]
    return [(resolve_model(name), weight) for name, weight in entry.members]


def domain_folder(entry: ModelEntry) -> Path | None:
    """The folder whose ``domain.json`` the input is checked against: the model's own; for an
    ensemble, its first member that states a domain (:func:`resolve_model` made sure they agree)."""
    if not entry.members:
        return entry.path
    from .domain import DOMAIN_JSON

    folders = [e.path for e, _ in member_entries(entry) if e.path is not None]
    return next((f for f in folders if (f / DOMAIN_JSON).is_file()), folders[0] if folders else None)


def resolve_model(name_or_path: str | None) -> ModelEntry:
    """A model directory, a name from :func:`list_models`, or an ensemble (a manifest name, or
    ``a,b`` / ``a:0.6,b:0.4``: see :mod:`TextGuidedSegLib.ensemble`); unknown names list what exists."""
    name_or_path = name_or_path or DEFAULT_MODEL
    path = Path(name_or_path)
    if path.is_dir():
        try:
            text_free = bool(read_config(path).get("config", {}).get("text_free", False))
        except CheckpointError:
            text_free = False  # load_model reports what is wrong with the directory
        return ModelEntry(path.name, path, "path", text_free=text_free)
    if is_ensemble_spec(name_or_path):
        members = _spec_members(name_or_path)
        if len(members) == 1:  # 'name:1'
            return resolve_model(members[0][0])
        return _ensemble_entry(spec_text(members), members, None)
    for entry in list_models():
        if entry.name == name_or_path:
            if entry.members:
                return _ensemble_entry(entry.name, list(entry.members), entry)
            if entry.path is None:
                raise CheckpointError(f"model {entry.name!r} is listed in the manifest but not downloaded (or its "
                                      f"copy does not match the manifest's SHA-256): download it with "
                                      f"'textguidedseg models download {entry.name}'")
            return entry
    known = ", ".join(e.name for e in list_models()) or "none"
    raise CheckpointError(f"model {name_or_path!r} not found: not a directory and not an installed model "
                          f"(installed: {known}). Import one with 'textguidedseg models import PATH'.")


def needs_download(name_or_path: str | None) -> bool:
    """True when ``name_or_path`` (None: the default model) is a manifest model with a ``url`` whose
    verified copy is not in the cache yet (:func:`download_model` fetches it). Reads no weights."""
    name = name_or_path or DEFAULT_MODEL
    if Path(name).is_dir():
        return False
    try:
        members = _spec_members(name)
    except CheckpointError:
        return False  # resolving it reports the problem
    if members is not None:  # an ensemble: when a member needs one
        return any(needs_download(member) for member, _ in members)
    return any(e.name == name and e.url and e.path is None for e in list_models())


_LOADED: dict[tuple[str, str], LoadedModel] = {}


def load_model(name_or_path: str | None = None, device: str | torch.device = "cpu") -> LoadedModel | Ensemble:
    """Load (and keep, per path and device) a model by name or directory, checking the manifest's SHA-256.
    An ensemble's name (or ``a,b`` / ``a:0.6,b:0.4``) gives an :class:`~TextGuidedSegLib.ensemble.Ensemble`
    of its loaded members."""
    entry = resolve_model(name_or_path)
    if entry.members:
        return Ensemble([load_model(name, device=device) for name, _ in entry.members],
                        [weight for _, weight in entry.members], name=entry.name)
    key = (str(entry.path.resolve()), str(device))
    if key not in _LOADED:
        _LOADED[key] = load_pretrained(entry.path, device=device, expected_sha256=entry.sha256)
    # the name users type and see in 'models list' (not the training run's), in messages and segment tags
    _LOADED[key].metadata["name"] = entry.name
    return _LOADED[key]


def forget_loaded_models() -> None:
    """Drop the models :func:`load_model` keeps, so that their memory can be freed."""
    _LOADED.clear()


def _check_weights(weights: Path, size: int | None, sha256: str | None, what: str) -> None:
    if not weights.is_file():
        raise CheckpointError(f"{what}: no {WEIGHTS_NAME}")
    actual_size = weights.stat().st_size
    if size is not None and actual_size != size:
        raise CheckpointError(f"{what}: {WEIGHTS_NAME} is {actual_size} bytes, the manifest expects {size}; "
                              "the file is corrupt or not the published one")
    if sha256 is not None:
        actual = sha256_of(weights)
        if actual != sha256.lower():
            raise CheckpointError(f"{what}: {WEIGHTS_NAME} has SHA-256 {actual}, the manifest expects {sha256}; "
                                  "the file is corrupt or not the published one")


def import_model(source: str | Path, name: str | None = None, overwrite: bool = False, *,
                 sha256: str | None = None, size: int | None = None) -> Path:
    """Copy a model directory or ``.zip`` into the user cache after checking that it loads.

    ``sha256`` / ``size``: what the weights must be (from the manifest); checked before anything is
    moved into the cache.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist (give a model directory or a .zip of one)")
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".import-") as tmp:
        staged = Path(tmp) / "model"
        if source.is_file():
            if not zipfile.is_zipfile(source):
                raise CheckpointError(f"{source} is neither a directory nor a zip archive")
            with zipfile.ZipFile(source) as zf:
                for member in zf.namelist():
                    target = (staged / member).resolve()
                    if not str(target).startswith(str(staged.resolve())):
                        raise CheckpointError(f"{source}: unsafe path {member!r} in the archive")
                zf.extractall(staged)
            configs = list(staged.rglob("config.json"))
            candidates = [c.parent for c in configs if (c.parent / WEIGHTS_NAME).is_file()]
            # a fine-tuned text encoder inside a model (text_encoder/) looks like one too: keep the outer
            candidates = [c for c in candidates if not any(o in c.parents for o in candidates)]
            pickles = [m for m in zf.namelist() if m.lower().endswith(PICKLE_SUFFIXES)]
            if not candidates and pickles:
                raise CheckpointError(f"{source} holds pickle weights ({', '.join(pickles[:3])}) and no "
                                      f"{WEIGHTS_NAME}; pickle files are refused because loading them can run "
                                      f"arbitrary code: convert them to {WEIGHTS_NAME}")
            if len(candidates) != 1:
                raise CheckpointError(f"{source} must hold exactly one model directory "
                                      f"(config.json + {WEIGHTS_NAME}); found {len(candidates)}")
            staged = candidates[0]
        else:
            shutil.copytree(source, staged)
        _check_weights(staged / WEIGHTS_NAME, size, sha256, source.name)
        load_pretrained(staged)  # refuses pickle, unknown models, wrong tensors
        target = root / (name or (source.stem if source.is_file() else source.name))
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"a model named {target.name!r} is already installed; "
                                      "choose another --name or pass --overwrite")
            shutil.rmtree(target)
        os.replace(staged, target)
    logger.info("imported %s as %s", source, target.name)
    return target


def download_model(name: str, *, progress: Callable[[int, int], None] | None = None,
                   cancel: threading.Event | None = None, chunk_size: int = DOWNLOAD_CHUNK_SIZE,
                   timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download a manifest model (an entry with a ``url``) into ``cache_dir()/<name>``; returns that folder.

    The archive is streamed to a temporary folder inside the cache, ``progress(bytes_done, bytes_total)``
    is called after each chunk (``bytes_total`` is 0 when the server does not say), and ``cancel``
    (a ``threading.Event``) is checked before each chunk: when set, :class:`DownloadCancelled` is
    raised (a stalled connection is noticed after ``timeout`` seconds). The archive is then installed like :func:`import_model` (unpacked, weights' size and
    SHA-256 checked against the manifest, loaded once) and moved into place; on any failure nothing
    is left in the cache. A copy that already matches the manifest is returned as is. For an ensemble
    (a manifest name or ``a,b``), each member not installed yet is downloaded in turn, and the cache
    folder is returned.
    """
    members = _spec_members(name)
    if members is not None:
        for member, _ in members:
            if needs_download(member):
                download_model(member, progress=progress, cancel=cancel, chunk_size=chunk_size, timeout=timeout)
        return cache_dir()
    entries = manifest_entries()
    entry = next((e for e in entries if e.name == name), None)
    if entry is None or entry.url is None:
        if entry is not None and entry.path is not None:  # shipped: nothing to download
            return entry.path
        known = ", ".join(e.name for e in entries if e.url) or "none"
        raise CheckpointError(f"model {name!r} is not a downloadable model of the manifest {MANIFEST} "
                              f"(downloadable: {known})")
    installed = installed_copy(entry)
    if installed is not None:
        return installed
    scheme = urllib.parse.urlsplit(entry.url).scheme
    if scheme not in ("https", "http", "file"):
        raise CheckpointError(f"model {name!r}: unsupported URL scheme {scheme!r} in {entry.url}")
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        if entry.archive == "dir":  # a model directory on a (file://) share: copied, no streaming
            if scheme != "file":
                raise CheckpointError(f"model {name!r}: archive 'dir' needs a file:// URL, not {entry.url}")
            source = Path(urllib.request.url2pathname(urllib.parse.urlsplit(entry.url).path))
        else:
            source = Path(tmp) / f"{name}.zip"
            _fetch(entry.url, source, progress, cancel, chunk_size, timeout)
        try:
            target = import_model(source, name=name, overwrite=True, sha256=entry.sha256, size=entry.size)
        except CheckpointError as exc:
            raise CheckpointError(f"model {name!r} from {entry.url}: {exc}") from None
    logger.info("downloaded %s from %s", name, entry.url)
    return target


def _fetch(url: str, destination: Path, progress: Callable[[int, int], None] | None,
           cancel: threading.Event | None, chunk_size: int, timeout: float) -> None:
    """Stream ``url`` to ``destination`` in chunks (the caller removes it on failure)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(destination, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while True:
                if cancel is not None and cancel.is_set():
                    raise DownloadCancelled(f"download of {url} cancelled; nothing was installed")
                chunk = response.read(chunk_size)
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exc:
        plain = isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError)
        raise CheckpointError(f"could not download {url}: {exc.reason if plain else exc}") from None
    if total and done != total:
        raise CheckpointError(f"could not download {url}: got {done} of {total} bytes")


def describe(entry: ModelEntry) -> dict:
    if entry.members:
        return {"name": entry.name, "source": entry.source, "model_type": "ensemble",
                "members": [{"name": n, "weight": w} for n, w in entry.members], "version": entry.version or None,
                "description": entry.description}
    payload = read_config(entry.path)
    weights = entry.path / WEIGHTS_NAME
    return {"name": entry.name, "source": entry.source, "path": str(entry.path), "model_type": payload["model_type"],
            "size_mb": round(weights.stat().st_size / 1e6, 2) if weights.is_file() else None,
            "sha256": sha256_of(weights) if weights.is_file() else None,
            "version": entry.version or None, "url": entry.url,
            "metadata": payload.get("metadata", {}), "config": payload["config"]}
