"""Building blocks shared by the models (written once, used by every model file)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ConvBlock(nn.Sequential):
    """(3x3 conv -> BatchNorm -> ReLU) x 2, the U-Net workhorse."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class CNNEncoder(nn.Module):
    """Plain strided-conv encoder; ``forward`` returns one feature map per stride 2, 4, ... 2**n."""

    def __init__(self, in_channels: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        stages, prev = [], in_channels
        for c in channels:
            stages.append(ConvBlock(prev, c, stride=2))
            prev = c
        self.stages = nn.ModuleList(stages)
        self.out_channels = tuple(channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class DecoderBlock(nn.Module):
    """Upsample the deeper feature x2, concatenate the skips, fuse with a ConvBlock."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = ConvBlock(in_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, *skips: torch.Tensor) -> torch.Tensor:
        target = skips[0].shape[-2:] if skips else tuple(s * 2 for s in x.shape[-2:])
        x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
        return self.block(torch.cat([x, *skips], dim=1))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, ratio: float = 2.0, dropout: float = 0.0) -> None:
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class CrossAttentionBlock(nn.Module):
    """Pre-norm multi-head cross-attention + MLP, both residual: q <- q + MHCA(q, kv); q <- q + MLP(q)."""

    def __init__(self, dim: int, num_heads: int, kv_dim: int | None = None, mlp_ratio: float = 2.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        kv_dim = kv_dim or dim
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(kv_dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, kdim=kv_dim, vdim=kv_dim,
                                          batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_ratio, dropout)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``q`` [B, Nq, D], ``kv`` [B, Nk, Dk], ``kv_mask`` [B, Nk] with 1 = keep. Returns (q', weights)."""
        pad = None if kv_mask is None else ~kv_mask.bool()
        kv_n = self.norm_kv(kv)
        out, weights = self.attn(self.norm_q(q), kv_n, kv_n, key_padding_mask=pad, need_weights=need_weights)
        q = q + out
        q = q + self.mlp(self.norm_mlp(q))
        return q, weights


class FiLM(nn.Module):
    """Feature-wise modulation of a decoder stage by the text vector: x * (1 + gamma) + beta."""

    def __init__(self, dim: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.proj(vector).to(x.dtype)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + gamma) + beta


def info_nce(visual: torch.Tensor, text: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised visual and text vectors ``[B, D]``.

    Several cases of a batch often share one report (QaTa has 162 distinct strings), so every pair
    whose texts are identical counts as a positive (multi-positive InfoNCE) instead of a false negative.
    """
    v = F.normalize(visual, dim=-1)
    t = F.normalize(text, dim=-1)
    logits = v @ t.t() / temperature
    with torch.no_grad():
        same = (t @ t.t()) > 1 - 1e-5
        target = same.float() / same.float().sum(1, keepdim=True)
    loss_v = -(target * logits.log_softmax(dim=1)).sum(1).mean()
    loss_t = -(target * logits.log_softmax(dim=0).t()).sum(1).mean()
    return 0.5 * (loss_v + loss_t)


class LearnableTemperature(nn.Module):
    """tau = exp(log_tau), clamped to [0.01, 10] as in CLIP-style training."""

    def __init__(self, init: float = 0.07) -> None:
        super().__init__()
        self.log_tau = nn.Parameter(torch.tensor(math.log(init)))

    def forward(self) -> torch.Tensor:
        return self.log_tau.exp().clamp(0.01, 10.0)


def check_divisible(image: torch.Tensor, multiple: int, model: str) -> None:
    h, w = image.shape[-2:]
    if h % multiple or w % multiple:
        ph, pw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
        raise ValueError(f"{model} needs height and width divisible by {multiple}, got {h}x{w}; "
                         f"resize or pad to {ph}x{pw}")
