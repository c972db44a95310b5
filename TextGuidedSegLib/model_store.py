"""Where models live: the ones shipped in the package, and a per-user cache for imported ones.

``Models.json`` (next to this file) is the manifest: name, version, model type, licence, and the
SHA-256 of each model's weights, checked on every load. The cache location is
``$TEXTGUIDEDSEG_HOME/models`` when that variable is set, else ``~/.cache/textguidedseg/models``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import (PICKLE_SUFFIXES, WEIGHTS_NAME, CheckpointError, LoadedModel, load_pretrained, read_config,
                         sha256_of)

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
MANIFEST = PACKAGE_DIR / "Models.json"
DEFAULT_MODEL = "tmc-qata-cpu"


@dataclass
class ModelEntry:
    name: str
    path: Path | None
    source: str  # "shipped", "cache", "manifest"
    model_type: str = ""
    sha256: str | None = None
    description: str = ""
    licence: str = ""


def cache_dir() -> Path:
    home = os.environ.get("TEXTGUIDEDSEG_HOME")
    base = Path(home) if home else Path.home() / ".cache" / "textguidedseg"
    return base / "models"


def manifest_entries() -> list[ModelEntry]:
    if not MANIFEST.is_file():
        return []
    entries = []
    for item in json.loads(MANIFEST.read_text(encoding="utf-8"))["models"]:
        path = PACKAGE_DIR / item["path"] if item.get("path") else None
        entries.append(ModelEntry(item["name"], path, "shipped" if path else "manifest", item.get("model_type", ""),
                                  item.get("sha256"), item.get("description", ""), item.get("licence", "")))
    return entries


def list_models() -> list[ModelEntry]:
    """Shipped models (manifest) first, then every valid model directory in the user cache."""
    entries = [e for e in manifest_entries() if e.path is None or e.path.is_dir()]
    root = cache_dir()
    if root.is_dir():
        for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                cfg = read_config(d)
            except CheckpointError:
                continue
            entries.append(ModelEntry(d.name, d, "cache", cfg.get("model_type", ""),
                                      description=cfg.get("metadata", {}).get("name", "")))
    return entries


def resolve_model(name_or_path: str | None) -> ModelEntry:
    """A model directory, or a name from :func:`list_models`; unknown names list what exists."""
    name_or_path = name_or_path or DEFAULT_MODEL
    path = Path(name_or_path)
    if path.is_dir():
        return ModelEntry(path.name, path, "path")
    for entry in list_models():
        if entry.name == name_or_path:
            if entry.path is None:
                raise CheckpointError(f"model {entry.name!r} is listed in the manifest but not installed")
            return entry
    known = ", ".join(e.name for e in list_models()) or "none"
    raise CheckpointError(f"model {name_or_path!r} not found: not a directory and not an installed model "
                          f"(installed: {known}). Import one with 'textguidedseg models import PATH'.")


_LOADED: dict[tuple[str, str], LoadedModel] = {}


def load_model(name_or_path: str | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load (and keep, per path and device) a model by name or directory, checking the manifest's SHA-256."""
    entry = resolve_model(name_or_path)
    key = (str(entry.path.resolve()), str(device))
    if key not in _LOADED:
        _LOADED[key] = load_pretrained(entry.path, device=device, expected_sha256=entry.sha256)
        _LOADED[key].metadata.setdefault("name", entry.name)
    return _LOADED[key]


def import_model(source: str | Path, name: str | None = None, overwrite: bool = False) -> Path:
    """Copy a model directory or ``.zip`` into the user cache after checking that it loads."""
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


def describe(entry: ModelEntry) -> dict:
    payload = read_config(entry.path)
    weights = entry.path / WEIGHTS_NAME
    return {"name": entry.name, "source": entry.source, "path": str(entry.path), "model_type": payload["model_type"],
            "size_mb": round(weights.stat().st_size / 1e6, 2) if weights.is_file() else None,
            "sha256": sha256_of(weights) if weights.is_file() else None,
            "metadata": payload.get("metadata", {}), "config": payload["config"]}
