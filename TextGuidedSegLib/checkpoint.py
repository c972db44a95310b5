"""Model directories: ``config.json`` + ``model.safetensors`` (+ ``README.md`` card, + ``text_encoder/``).

Never pickle: weights are safetensors only, and a directory holding only pickle weights is
refused. Loading builds the model through the registry and loads with ``strict=True`` after
checking every tensor's name and shape, so a wrong file fails with a message, not a traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__

# torch, safetensors and the model registry are imported by the functions that load or save a model,
# not here: the model catalog (model_store) imports this module, and the Slicer panel lists the models
# as it opens, which must not cost the seconds of importing torch.
if TYPE_CHECKING:
    import torch
    from torch import nn

    from .models import ModelConfig
    from .text import TextEncoder

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
TEXT_ENCODER_DIR = "text_encoder"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class CheckpointError(ValueError):
    """A model directory that cannot be used, with the reason and what to do."""


@dataclass
class LoadedModel:
    """A model ready for inference: the network, its config, its text encoder and where it came from."""

    model: nn.Module
    config: ModelConfig
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    _text_encoder: TextEncoder | None = None

    def parameter_counts(self) -> dict[str, int]:
        """Trainable vs frozen parameters of the image model, and the text encoder's (frozen unless
        it was fine-tuned; a LoRA encoder counts its merged weights)."""
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.model.parameters() if not p.requires_grad)
        text = sum(p.numel() for p in self.text_encoder.parameters())
        return {"image_model_trainable": trainable, "image_model_frozen": frozen, "text_encoder": text}

    @property
    def text_encoder(self) -> TextEncoder:
        """Loaded on first use (text-free models never pay for it)."""
        if self._text_encoder is None:
            from .text import TextEncoder

            self._text_encoder = TextEncoder(self.config.text).to(next(self.model.parameters()).device)
        return self._text_encoder

    @property
    def name(self) -> str:
        return self.metadata.get("name") or (self.path.name if self.path else self.config.model_type)

    @property
    def requires_text(self) -> bool:
        """False for text-free models (ProLearn), which segment without a prompt."""
        return bool(getattr(self.model, "requires_text", True))

    @property
    def samples_masks(self) -> bool:
        """True for models that sample masks (SVP-CVAE): ``samples`` and an uncertainty apply to them."""
        return bool(getattr(self.model, "samples_masks", False))


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_pretrained(model: nn.Module, directory: str | Path, *, metadata: dict[str, Any] | None = None,
                    card: str | None = None, half: bool = False,
                    text_encoder: TextEncoder | None = None) -> Path:
    """Write a model directory atomically (a temp dir renamed into place: never half-written).

    ``half`` stores floating-point weights as fp16 (shipped models stay under 25 MB); they are
    cast back to fp32 on load. A trainable / LoRA text encoder is saved in ``text_encoder/``.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    config: ModelConfig = model.config
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    payload = {"format_version": FORMAT_VERSION, "library_version": __version__,
               "model_type": config.model_type, "config": config.to_dict(), "metadata": metadata or {}}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        local_frozen = (text_encoder is not None and text_encoder.config.uses_cache
                        and not text_encoder.config.adapter_path
                        and Path(text_encoder.config.name_or_path).is_dir())
        if local_frozen:
            # a frozen encoder from a local directory (e.g. the CLIP pre-trained for TGC-Net): copy it, so
            # the model directory works on another machine
            text_encoder.model.save_pretrained(tmp / TEXT_ENCODER_DIR, safe_serialization=True)
            text_encoder.tokenizer.save_pretrained(tmp / TEXT_ENCODER_DIR)
            payload["text_encoder_dir"] = TEXT_ENCODER_DIR
        elif text_encoder is not None and not text_encoder.config.uses_cache:
            if text_encoder.config.lora_layers and not text_encoder.config.trainable:
                # LoRA: only the adapter (peft format); the base encoder is named in the config
                text_encoder.model.save_pretrained(tmp / TEXT_ENCODER_DIR, safe_serialization=True)
                (tmp / TEXT_ENCODER_DIR / CARD_NAME).unlink(missing_ok=True)  # peft's empty card template
                payload["text_adapter_dir"] = TEXT_ENCODER_DIR
            else:  # a fine-tuned encoder: its own full copy
                text_encoder.model.save_pretrained(tmp / TEXT_ENCODER_DIR, safe_serialization=True)
                text_encoder.tokenizer.save_pretrained(tmp / TEXT_ENCODER_DIR)
                payload["text_encoder_dir"] = TEXT_ENCODER_DIR
        (tmp / CONFIG_NAME).write_text(encoding="utf-8", data=json.dumps(payload, indent=2) + "\n")
        if card:
            (tmp / CARD_NAME).write_text(encoding="utf-8", data=card)
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0700: give the usual permissions
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    """Read and validate ``config.json`` (version, model type) without touching the weights."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model directory {directory} does not exist (give a directory holding "
                              f"{CONFIG_NAME} and {WEIGHTS_NAME}, or a model name from 'textguidedseg models list')")
    path = directory / CONFIG_NAME
    if not path.is_file():
        pickles = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = (f"; it holds pickle weights ({', '.join(pickles)}), which are refused because loading them "
                f"can run arbitrary code") if pickles else ""
        raise CheckpointError(f"{directory} has no {CONFIG_NAME}: not a TextGuidedSeg model directory{hint}")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is not supported by this "
                              f"library (reads up to {FORMAT_VERSION}); upgrade textguidedseg")
    return payload


def load_pretrained(directory: str | Path, *, device: str | torch.device = "cpu",
                    expected_sha256: str | None = None) -> LoadedModel:
    """Load a model directory. ``expected_sha256`` (from a manifest) is checked on the weights file."""
    from safetensors.torch import load_file

    from .models import build_model, config_from_dict

    directory = Path(directory)
    payload = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(f"{directory} holds pickle weights ({', '.join(pickles)}), which are refused "
                                  f"because loading them can run arbitrary code; convert them to {WEIGHTS_NAME}")
        raise CheckpointError(f"{directory} has no {WEIGHTS_NAME}")
    if expected_sha256 is not None:
        actual = sha256_of(weights)
        if actual != expected_sha256.lower():
            raise CheckpointError(f"{weights}: SHA-256 {actual} does not match the manifest's {expected_sha256}; "
                                  "the file is corrupt or not the published one: download it again")
    try:
        config = config_from_dict(payload["config"])
    except KeyError as exc:
        raise CheckpointError(f"{directory}: {exc.args[0]}") from None
    if payload.get("text_encoder_dir"):
        config.text.name_or_path = str(directory / payload["text_encoder_dir"])
        config.text.trainable, config.text.lora_layers = False, []
    if payload.get("text_adapter_dir"):
        config.text.adapter_path = str(directory / payload["text_adapter_dir"])
    model = build_model(config)
    state = load_file(str(weights))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} mis-shaped tensors (e.g. {'; '.join(wrong[:3])})")
        raise CheckpointError(f"{weights} does not fit a {config.model_type} built from its config.json: "
                              + "; ".join(parts))
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    return LoadedModel(model=model, config=config, metadata=payload.get("metadata", {}), path=directory)
