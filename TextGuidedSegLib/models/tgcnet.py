"""TGC-Net: a frozen aligned vision-language encoder + a trainable CNN structure branch, an
auxiliary-prompt text encoder, gated vision-language calibration and a cost-aggregation decoder.

- **SSE** (semantic-structural synergy encoder): the frozen CLIP ViT image tower
  (``transformers`` ``CLIPVisionModel``'s transformer, :func:`clip_vision_tower`) beside a light
  trainable CNN. Patch tokens are resampled to the CNN's 1/32 grid and fused,
  F_fused = LayerNorm(P_V(F_clip) + P_C(F_cnn^1/32)); the pyramid
  {F_cnn^1/8, F_cnn^1/16, F_fused} is refined by multi-scale deformable attention
  (:class:`~TextGuidedSegLib.models.blocks.MultiScaleDeformableAttention`, plain PyTorch) -> F_V.
- **DATE** (domain-augmented text encoder): the primary prompt T_p and its auxiliary prompt T_a
  (:mod:`TextGuidedSegLib.text.auxiliary`) through the same frozen text tower;
  F_T = LayerNorm(F_p + CrossAttn(Q = F_a, K = V = F_p)). With T_a = T_p this is a residual
  self-attention over the primary prompt. ``auxiliary``: ``both`` (default) / ``primary`` (F_T =
  LayerNorm(F_p): the "no DATE" ablation) / ``auxiliary`` (F_T = LayerNorm(F_a)).
- **VLCM**: a gate computed from the pooled F_V^1/32 and F_T mixes the two into a shared context
  F_ctx = [g * F_V^1/32 ; (1 - g) * F_T]; then F_V' = F_V + CrossAttn(F_V, F_ctx) at every level and
  F_T' = F_T + CrossAttn(F_T, F_ctx).
- **Cost-aggregation decoder** (CAT-Seg style): the cosine cost volume between F_V'^1/32 and each
  token of F_T' is embedded and aggregated spatially (convolutions over each token's cost map) and
  across tokens (attention pooling over the prompt's tokens), then upsampled with F_V'^1/16,
  F_V'^1/8 and (ours) the CNN's 1/4 feature as guides to the input size; one logit per pixel.

Ablations: ``sse=false`` (CNN only: no CLIP tower), ``auxiliary=primary`` (no DATE),
``vlcm=false`` (no calibration). Only the CNN, the projections, the attention blocks and the
decoder train; the CLIP image tower and the text tower stay frozen (``textguidedseg models info``
prints both counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..text import TextEncoder, TextFeatures
from .blocks import CNNEncoder, ConvBlock, CrossAttentionBlock, FeedForward, MultiScaleDeformableAttention
from .blocks import check_divisible
from .config import ModelConfig
from .registry import register

# OpenAI CLIP image towers (their published config.json values), so the paper configs build offline
KNOWN_CLIP_VISION = {
    "openai/clip-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, image_size=336, patch_size=14),
    "openai/clip-vit-large-patch14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, image_size=224, patch_size=14),
    "openai/clip-vit-base-patch16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                         num_attention_heads=12, image_size=224, patch_size=16),
    "openai/clip-vit-base-patch32": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                         num_attention_heads=12, image_size=224, patch_size=32),
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TGCNetConfig(ModelConfig):
    """TGC-Net hyper-parameters; defaults follow the paper (CLIP ViT-L/14 at 336 px, CNN at 768 px).

    Args:
        clip_name_or_path: the CLIP whose image tower is loaded (HF id or local directory), once,
            before training (``load_pretrained_backbone``); afterwards the weights live in the
            model's own safetensors.
        clip_vision: the tower's ``CLIPVisionConfig`` fields (copied from ``clip_name_or_path`` at
            training start, so a saved model rebuilds without the CLIP directory).
        cnn_channels: the structure CNN's channels at strides 2, 4, 8, 16, 32.
        dim: the shared width of pyramid, text and decoder.
        heads: attention heads (DATE, VLCM, token pooling).
        deform_layers, deform_heads, deform_points: the deformable-attention refinement.
        cost_channels: channels the cost volume is embedded into.
        auxiliary: ``both`` / ``primary`` / ``auxiliary`` (see the module docstring).
        aux_generator: ``knowledge`` (offline expander) or a causal LM (HF id / local directory)
            that writes the auxiliary prompt.
        sse: use the frozen CLIP tower (False: the CNN alone; an ablation).
        vlcm: use the vision-language calibration (False: an ablation).
    """

    model_type: str = "tgcnet"
    clip_name_or_path: str = "openai/clip-vit-large-patch14-336"
    clip_vision: dict = field(default_factory=dict)
    cnn_channels: tuple[int, ...] = (64, 128, 256, 384, 512)
    dim: int = 256
    heads: int = 8
    deform_layers: int = 2
    deform_heads: int = 8
    deform_points: int = 4
    cost_channels: int = 64
    auxiliary: str = "both"
    aux_generator: str = "knowledge"
    sse: bool = True
    vlcm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.cnn_channels = tuple(self.cnn_channels)
        if len(self.cnn_channels) != 5:
            raise ValueError("cnn_channels needs 5 entries (strides 2, 4, 8, 16, 32)")
        if self.auxiliary not in ("both", "primary", "auxiliary"):
            raise ValueError(f"auxiliary must be 'both', 'primary' or 'auxiliary', got {self.auxiliary!r}")
        for name, value in (("heads", self.heads), ("deform_heads", self.deform_heads)):
            if self.dim % value:
                raise ValueError(f"dim {self.dim} is not divisible by {name} {value}")
        if self.image_size % 32:
            raise ValueError(f"TGC-Net image_size must be divisible by 32, got {self.image_size}")
        if self.sse and not self.clip_vision:
            self.clip_vision = self._read_clip_vision()

    def _read_clip_vision(self) -> dict:
        """The image tower's config: OpenAI's known ones, else the CLIP directory's config.json."""
        if self.clip_name_or_path in KNOWN_CLIP_VISION:
            return dict(KNOWN_CLIP_VISION[self.clip_name_or_path])
        from pathlib import Path

        if not (Path(self.clip_name_or_path) / "config.json").is_file():
            raise ValueError(f"TGC-Net: {self.clip_name_or_path!r} is neither a known OpenAI CLIP nor a CLIP "
                             "directory; pre-train one (Training/pretrain_clip.py) or give clip_vision explicitly")
        from transformers import CLIPVisionConfig

        vision = CLIPVisionConfig.from_pretrained(self.clip_name_or_path)
        return {k: getattr(vision, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                "num_attention_heads", "image_size", "patch_size")}


def clip_vision_tower(model: nn.Module) -> nn.Module:
    """The CLIP image transformer itself (``embeddings``, ``pre_layrnorm``, ``encoder``,
    ``post_layernorm``) out of a ``CLIPVisionModel``.

    transformers 4.x wraps it (``CLIPVisionModel.vision_model``, a ``CLIPVisionTransformer``: state-dict
    names ``vision_model.embeddings.*``); 5.x made ``CLIPVisionModel`` the tower itself (``embeddings.*``).
    TGC-Net holds the tower, so its frozen weights are named ``clip.embeddings.*`` under both versions
    and the same safetensors loads everywhere; both forwards take ``pixel_values`` and return
    ``last_hidden_state``.
    """
    inner = getattr(model, "vision_model", None)
    return inner if isinstance(inner, nn.Module) else model


@dataclass
class TGCText:
    """What TGC-Net reads for a batch of prompts: the primary and auxiliary prompts' features."""

    primary: TextFeatures
    auxiliary: TextFeatures

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "TGCText":
        return TGCText(self.primary.to(device, dtype), self.auxiliary.to(device, dtype))

    def index(self, idx: torch.Tensor | Sequence[int]) -> "TGCText":
        return TGCText(self.primary.index(idx), self.auxiliary.index(idx))


@lru_cache(maxsize=4)
def _generator(name: str) -> Any:
    from ..text.auxiliary import KnowledgeExpander, TransformersGenerator

    return KnowledgeExpander() if name == "knowledge" else TransformersGenerator(name)


def sine_positions(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """2D sine positional embedding ``[h*w, dim]`` (half the channels for y, half for x)."""
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(1, quarter)))
    y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    ey = torch.cat([torch.sin(2 * math.pi * y[:, None] * freq * 10), torch.cos(2 * math.pi * y[:, None] * freq * 10)], 1)
    ex = torch.cat([torch.sin(2 * math.pi * x[:, None] * freq * 10), torch.cos(2 * math.pi * x[:, None] * freq * 10)], 1)
    pos = torch.cat([ey[:, None].expand(h, w, -1), ex[None].expand(h, w, -1)], -1).reshape(h * w, -1)
    return F.pad(pos, (0, dim - pos.shape[1]))


class DeformableEncoderLayer(nn.Module):
    """Every pyramid token attends (deformably) to all levels around its own position; + MLP."""

    def __init__(self, dim: int, heads: int, levels: int, points: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = MultiScaleDeformableAttention(dim, heads, levels, points)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, 4.0)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, reference: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        q = self.norm(tokens)
        tokens = tokens + self.attn(q + pos, reference, q, shapes)
        return tokens + self.mlp(self.norm_mlp(tokens))


class DATE(nn.Module):
    """F_T = LayerNorm(F_p + CrossAttn(Q = F_a, K = V = F_p)) in the model's width."""

    def __init__(self, text_dim: int, dim: int, heads: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.proj = nn.Linear(text_dim, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, primary: TextFeatures, auxiliary: TextFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (F_T [B, L, dim], mask [B, L])."""
        f_p = self.proj(primary.tokens.float())
        if self.mode == "primary":
            return self.norm(f_p), primary.mask
        f_a = self.proj(auxiliary.tokens.float())
        if self.mode == "auxiliary":
            return self.norm(f_a), auxiliary.mask
        attended, _ = self.attn(f_a, f_p, f_p, key_padding_mask=~primary.mask.bool(), need_weights=False)
        # the auxiliary tokens' positions carry the attended primary content; padding follows the primary
        return self.norm(f_p + attended), primary.mask


class VLCM(nn.Module):
    """Gated shared context from vision (1/32) and text; both streams cross-attend to it."""

    def __init__(self, dim: int, heads: int, levels: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.vision = nn.ModuleList(CrossAttentionBlock(dim, heads) for _ in range(levels))
        self.text = CrossAttentionBlock(dim, heads)

    def forward(self, levels: list[torch.Tensor], text: torch.Tensor, text_mask: torch.Tensor
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``levels``: token maps ``[B, N_l, dim]`` (the last one is 1/32); ``text`` [B, L, dim]."""
        v32 = levels[-1]
        m = text_mask.to(text.dtype)[..., None]
        pooled_t = (text * m).sum(1) / m.sum(1).clamp_min(1.0)
        g = torch.sigmoid(self.gate(torch.cat([v32.mean(1), pooled_t], -1)))[:, None]   # [B, 1, dim]
        context = torch.cat([g * v32, (1 - g) * text], dim=1)
        context_mask = torch.cat([torch.ones_like(v32[..., 0]), text_mask.to(v32.dtype)], dim=1)
        levels = [blk(v, context, context_mask)[0] for blk, v in zip(self.vision, levels)]
        text, _ = self.text(text, context, context_mask)
        return levels, text


class CostAggregation(nn.Module):
    """Cosine cost volume (1/32 pixels x prompt tokens) -> embedded, aggregated over space (convs on
    each token's cost map) and over tokens (attention pooling) -> a [B, C, h, w] feature."""

    def __init__(self, dim: int, channels: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Conv2d(1, channels, 7, padding=3), nn.GroupNorm(1, channels), nn.GELU())
        self.spatial = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(1, channels),
                                     nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1))
        self.text_guide = nn.Linear(dim, channels)
        self.score = nn.Linear(channels, 1)

    def forward(self, visual: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, _, h, w = visual.shape
        length = text.shape[1]
        cost = torch.einsum("bchw,blc->blhw", F.normalize(visual, dim=1), F.normalize(text, dim=-1))
        x = self.embed(cost.reshape(b * length, 1, h, w))
        x = x + self.spatial(x)                                                # spatial aggregation
        x = x.reshape(b, length, -1, h, w) + self.text_guide(text)[..., None, None]
        scores = self.score(x.permute(0, 3, 4, 1, 2)).squeeze(-1)              # [B, h, w, L]
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        weights = scores.softmax(-1).permute(0, 3, 1, 2)[:, :, None]            # [B, L, 1, h, w]
        return (weights * x).sum(1)                                             # token aggregation


@register("tgcnet", TGCNetConfig)
class TGCNet(nn.Module):
    """``forward(image [B, C, H, W], TGCText)`` -> ``{"logits": [B, 1, H, W], "losses": {}}``."""

    def __init__(self, config: TGCNetConfig) -> None:
        super().__init__()
        self.config = config
        d, cnn = config.dim, config.cnn_channels
        self.cnn = CNNEncoder(config.in_channels, cnn)
        self.clip = None
        if config.sse:
            from transformers import CLIPVisionConfig, CLIPVisionModel

            self.clip = clip_vision_tower(CLIPVisionModel(CLIPVisionConfig(**config.clip_vision)))
            self.clip.requires_grad_(False)
            self.clip.eval()
            self.proj_clip = nn.Linear(config.clip_vision["hidden_size"], d)
            self.fuse_norm = nn.LayerNorm(d)
            self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN)[None, :, None, None], persistent=False)
            self.register_buffer("clip_std", torch.tensor(CLIP_STD)[None, :, None, None], persistent=False)
        self.proj8, self.proj16, self.proj32 = (nn.Conv2d(c, d, 1) for c in cnn[2:])
        self.level_embed = nn.Parameter(torch.zeros(3, d))
        self.deform = nn.ModuleList(DeformableEncoderLayer(d, config.deform_heads, 3, config.deform_points)
                                    for _ in range(config.deform_layers))
        self.date = DATE(config.text.dim, d, config.heads, config.auxiliary)
        self.vlcm = VLCM(d, config.heads, 3) if config.vlcm else None
        c = config.cost_channels
        self.cost = CostAggregation(d, c)
        self.up16 = ConvBlock(c + d + d, c)
        self.up8 = ConvBlock(c + d, c)
        self.up4 = ConvBlock(c + cnn[1], c)
        self.head = nn.Conv2d(c, 1, 1)

    @property
    def requires_text(self) -> bool:
        return True

    def train(self, mode: bool = True) -> "TGCNet":
        super().train(mode)
        if self.clip is not None:
            self.clip.eval()  # frozen: no dropout, ever
        return self

    def load_pretrained_backbone(self) -> None:
        """Copy the CLIP image tower's weights from ``clip_name_or_path`` (once, before training)."""
        if self.clip is None:
            return
        from transformers import CLIPVisionModel
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the CLIP directory's text tower is "unexpected" here, by design
        try:
            tower = CLIPVisionModel.from_pretrained(self.config.clip_name_or_path)
        finally:
            hf_logging.set_verbosity(verbosity)
        self.clip.load_state_dict(clip_vision_tower(tower).state_dict())

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return {"trainable": trainable, "frozen": frozen}

    # ------------------------------------------------------------------ text
    def auxiliary_prompts(self, prompts: Sequence[str]) -> list[str]:
        cached = getattr(self, "_aux_table", {})
        missing = [p for p in prompts if p not in cached]
        made = dict(zip(missing, _generator(self.config.aux_generator)(missing))) if missing else {}
        return [cached.get(p) or made[p] for p in prompts]

    def prepare_training_texts(self, texts: Sequence[str], directory: str) -> str:
        """Generate the training reports' auxiliary prompts once and store them beside the data
        (``<directory>/auxiliary_prompts.<generator>.json``); training then reads that table."""
        from ..text.auxiliary import auxiliary_prompt_file, load_or_generate

        generator = _generator(self.config.aux_generator)
        path = auxiliary_prompt_file(directory, generator.name)
        self._aux_table = load_or_generate(texts, generator, path)
        return str(path)

    def encode_text(self, encoder: TextEncoder, prompts: Sequence[str], plane: str = "coronal") -> TGCText:
        prompts = list(prompts)
        primary = encoder.encode(prompts)
        auxiliary = encoder.encode(self.auxiliary_prompts(prompts)) if self.config.auxiliary != "primary" \
            else primary
        return TGCText(primary, auxiliary)

    # ------------------------------------------------------------------ forward
    def _clip_tokens(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Frozen CLIP patch tokens resampled to ``size`` (the 1/32 grid): [B, hidden, h, w]."""
        rgb = image.expand(-1, 3, -1, -1) if image.shape[1] == 1 else image
        side = self.config.clip_vision["image_size"]
        rgb = F.interpolate(rgb.float(), size=(side, side), mode="bilinear", align_corners=False)
        with torch.no_grad():
            tokens = self.clip(pixel_values=(rgb - self.clip_mean) / self.clip_std).last_hidden_state[:, 1:]
        g = int(math.isqrt(tokens.shape[1]))
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, g, g)
        return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)

    def forward(self, image: torch.Tensor, text: TGCText | None) -> dict:
        if text is None:
            raise ValueError("TGC-Net is text-guided: give a prompt (it has no text-free mode)")
        if not isinstance(text, TGCText):
            raise TypeError("TGC-Net reads TGCText: encode prompts with model.encode_text(encoder, prompts)")
        check_divisible(image, 32, "TGC-Net")
        cnn = self.cnn(image)                                       # strides 2, 4, 8, 16, 32
        p8, p16, p32 = self.proj8(cnn[2]), self.proj16(cnn[3]), self.proj32(cnn[4])
        b, d, h32, w32 = p32.shape
        if self.clip is not None:
            clip = self.proj_clip(self._clip_tokens(image, (h32, w32)).flatten(2).transpose(1, 2))
            p32 = self.fuse_norm(clip + p32.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, d, h32, w32)
        maps = [p8, p16, p32]
        shapes = [tuple(m.shape[-2:]) for m in maps]
        tokens = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
        pos = torch.cat([sine_positions(hh, ww, d, image.device) + self.level_embed[i]
                         for i, (hh, ww) in enumerate(shapes)])[None].to(tokens.dtype)
        reference = torch.cat([torch.stack(torch.meshgrid((torch.arange(hh, device=image.device) + 0.5) / hh,
                                                          (torch.arange(ww, device=image.device) + 0.5) / ww,
                                                          indexing="ij")[::-1], -1).reshape(-1, 2)
                               for hh, ww in shapes])[None].expand(b, -1, -1).to(tokens.dtype)
        for layer in self.deform:
            tokens = layer(tokens, pos, reference, shapes)
        levels = list(tokens.split([hh * ww for hh, ww in shapes], dim=1))

        f_t, mask = self.date(text.primary.to(image.device), text.auxiliary.to(image.device))
        if self.vlcm is not None:
            levels, f_t = self.vlcm(levels, f_t, mask)
        v8, v16, v32 = (lv.transpose(1, 2).reshape(b, d, hh, ww) for lv, (hh, ww) in zip(levels, shapes))

        x = self.cost(v32, f_t, mask)                               # [B, C, h32, w32]
        x = self.up16(torch.cat([F.interpolate(torch.cat([x, v32], 1), size=shapes[1], mode="bilinear",
                                               align_corners=False), v16], 1))
        x = self.up8(torch.cat([F.interpolate(x, size=shapes[0], mode="bilinear", align_corners=False), v8], 1))
        x = self.up4(torch.cat([F.interpolate(x, size=cnn[1].shape[-2:], mode="bilinear", align_corners=False),
                                cnn[1]], 1))
        logits = F.interpolate(self.head(x), size=image.shape[-2:], mode="bilinear", align_corners=False)
        return {"logits": logits, "losses": {}}
