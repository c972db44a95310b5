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
    # fp32 whatever the autocast: in bf16 the identical-text test below misses even the diagonal
    # (t.t = 0.996), the target row is 0/0 and training on a GPU went NaN at the first step
    with torch.autocast(device_type=visual.device.type, enabled=False):
        v = F.normalize(visual.float(), dim=-1)
        t = F.normalize(text.float(), dim=-1)
        logits = v @ t.t() / temperature.float()
        with torch.no_grad():
            same = ((t @ t.t()) > 1 - 1e-5) | torch.eye(len(t), dtype=torch.bool, device=t.device)
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


def ms_deform_attn(value: torch.Tensor, shapes: list[tuple[int, int]], locations: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention (Deformable DETR's core) in plain PyTorch (``grid_sample``).

    Args:
        value: ``[B, S, heads, d]``, the levels' pixels flattened and concatenated (S = sum H_l W_l).
        shapes: ``[(H_l, W_l)]`` of the levels, in the order of ``value``.
        locations: ``[B, Q, heads, levels, points, 2]`` sampling points as (x, y) in [0, 1] of each
            level (0 = the left / top edge, 1 = the right / bottom edge; pixel centres at (i + 0.5) / W).
        weights: ``[B, Q, heads, levels, points]`` attention weights (softmax over levels x points).

    Returns ``[B, Q, heads * d]``: per query and head, the weighted sum of bilinearly sampled values
    (zero outside the map). Runs on CPU and GPU alike; no compiled kernel.
    """
    b, _, heads, d = value.shape
    q, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    splits = value.split([h * w for h, w in shapes], dim=1)
    grids = 2.0 * locations - 1.0
    sampled_all = []
    for lvl, (h, w) in enumerate(shapes):
        v = splits[lvl].permute(0, 2, 3, 1).reshape(b * heads, d, h, w)
        grid = grids[:, :, :, lvl].transpose(1, 2).reshape(b * heads, q, points, 2)
        sampled_all.append(F.grid_sample(v, grid.to(v.dtype), mode="bilinear", padding_mode="zeros",
                                         align_corners=False))                        # [B*heads, d, Q, P]
    sampled = torch.cat(sampled_all, dim=-1)                                            # [B*heads, d, Q, L*P]
    w = weights.transpose(1, 2).reshape(b * heads, 1, q, levels * points).to(sampled.dtype)
    out = (sampled * w).sum(dim=-1)                                                     # [B*heads, d, Q]
    return out.reshape(b, heads, d, q).permute(0, 3, 1, 2).reshape(b, q, heads * d)


class MultiScaleDeformableAttention(nn.Module):
    """Each query looks at ``points`` learned offsets around its reference point on every level.

    ``forward(query [B, Q, C], reference [B, Q, 2] in [0, 1], value [B, S, C], shapes)``. Offsets
    are in units of each level's pixels; weights are a softmax over levels x points per head.
    """

    def __init__(self, dim: int, heads: int = 4, levels: int = 3, points: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"deformable attention dim {dim} is not divisible by heads {heads}")
        self.heads, self.levels, self.points = heads, levels, points
        self.offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        # Deformable DETR's start: offsets point in `heads` evenly spread directions, growing with the point index
        nn.init.zeros_(self.offsets.weight)
        angles = torch.arange(heads, dtype=torch.float32) * (2 * math.pi / heads)
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid[:, None, None, :].repeat(1, levels, points, 1)
        grid = grid * torch.arange(1, points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention.weight)
        nn.init.zeros_(self.attention.bias)

    def forward(self, query: torch.Tensor, reference: torch.Tensor, value: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        b, q, _ = query.shape
        v = self.value_proj(value).reshape(b, value.shape[1], self.heads, -1)
        offsets = self.offsets(query).reshape(b, q, self.heads, self.levels, self.points, 2)
        normaliser = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
        locations = reference[:, :, None, None, None, :] + offsets / normaliser[None, None, None, :, None, :]
        weights = self.attention(query).reshape(b, q, self.heads, self.levels * self.points).softmax(-1)
        weights = weights.reshape(b, q, self.heads, self.levels, self.points)
        return self.out_proj(ms_deform_attn(v, shapes, locations, weights))
