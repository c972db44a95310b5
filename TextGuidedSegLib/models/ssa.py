"""SSA: spatial-aware symmetric alignment of image regions and hybrid text.

The seed is an abstract (hybrid text, symmetric optimal-transport alignment, composite directional
guidance; 91.65 Dice on QaTa-COV19 test); the concrete design below is ours:

1. **Hybrid text.** :func:`TextGuidedSegLib.text.hybrid.parse_report` splits the prompt into
   sentence / locational / descriptive / diagnostic expressions; each is encoded by the text
   encoder (pooled vector). Missing expressions are masked out.
2. **Directional guidance.** The location clauses become a [3 x 2] grid of allowed cells
   (:mod:`TextGuidedSegLib.guidance`), drawn as a mask. It is an *input prior* (an extra image
   channel, and the regions' mass in the transport problem) and a *loss* that penalises predicted
   probability outside the described region (``guidance_weight``).
3. **Symmetric OT.** A CNN encodes the image; its stride-``region_stride`` features are the regions.
   Cost = 1 - cos(region, expression). Two entropic OT problems are solved by log-domain Sinkhorn
   (:func:`sinkhorn`), one per direction, each with its own projections and marginals:
   regions -> expressions (region mass from the guidance, text pooled into every region) and
   expressions -> regions (uniform, regions pooled into every expression). The text-enriched
   regions replace the encoder feature at that scale; the region-enriched expressions give one
   vector that modulates every decoder stage (FiLM). An InfoNCE alignment loss pulls the regions
   pooled into expressions towards the expressions themselves.
4. A U-Net decoder with the CNN skips, and a 1x1 head.

Ablations (config): ``ot`` = ``symmetric`` / ``regions_to_text`` / ``none`` (text enters as one
global vector), ``guidance`` on / off.

Where the text enters the decoder (``text_fusion``): ``decoder`` (above: the transported regions
and FiLM at every decoder stage) or ``late``: the encoder and the U-Net decoder read no text, so
one image's features serve every prompt asked of it (a user asking for 17 brain structures pays
for the image once); per prompt, the symmetric transport runs on the shared regions, its
text-enriched regions give a coarse map that is upsampled onto the decoder's stride-2 pixel
features, and a small FiLM-modulated head turns them into logits. ``late`` needs
``guidance: false`` (the guidance channel is an input of the encoder).

A text batch may be ``k`` times the image batch (image ``b`` answers prompts ``b*k .. b*k+k-1``):
``late`` computes the image part once per image; ``decoder`` repeats the images.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..guidance import guidance_cells, render_guidance
from ..text import TextEncoder
from ..text.hybrid import parse_report
from .blocks import CNNEncoder, DecoderBlock, FiLM, LearnableTemperature, check_divisible, info_nce
from .config import ModelConfig
from .registry import register

NUM_EXPRESSIONS = 4  # sentence, locational, descriptive, diagnostic


@dataclass
class SSAConfig(ModelConfig):
    """SSA hyper-parameters; defaults are the paper-scale configuration.

    Args:
        encoder_channels: CNN encoder channels at strides 2, 4, 8, 16, 32.
        decoder_channels: decoder channels at strides 16, 8, 4, 2.
        dim: shared region / expression space of the alignment.
        region_stride: which encoder scale gives the regions (16 or 32).
        ot: ``symmetric`` (both directions), ``regions_to_text`` (one direction) or ``none``.
        ot_epsilon: entropic regularisation of Sinkhorn (costs lie in [0, 2]).
        ot_iterations: Sinkhorn iterations (unrolled, differentiable).
        guidance: use the directional guidance mask (input prior + loss).
        guidance_weight: weight of the outside-the-described-region loss.
        align_weight: weight of the region-expression InfoNCE loss.
        text_fusion: ``decoder`` (FiLM at every decoder stage) or ``late`` (text-free image features
            shared by all prompts, a per-prompt head; see the module docstring).
        head_channels: ``late`` only: channels of the per-prompt head at stride 2 (its cost per prompt).
    """

    model_type: str = "ssa"
    encoder_channels: tuple[int, ...] = (64, 128, 256, 512, 768)
    decoder_channels: tuple[int, ...] = (512, 256, 128, 64)
    dim: int = 256
    region_stride: int = 16
    ot: str = "symmetric"
    ot_epsilon: float = 0.1
    ot_iterations: int = 30
    guidance: bool = True
    guidance_weight: float = 0.5
    align_weight: float = 0.1
    text_fusion: str = "decoder"
    head_channels: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        self.encoder_channels, self.decoder_channels = tuple(self.encoder_channels), tuple(self.decoder_channels)
        if len(self.encoder_channels) != 5 or len(self.decoder_channels) != 4:
            raise ValueError("encoder_channels needs 5 entries (strides 2..32), decoder_channels 4 (strides 16..2)")
        if self.region_stride not in (16, 32):
            raise ValueError(f"region_stride must be 16 or 32, got {self.region_stride}")
        if self.ot not in ("symmetric", "regions_to_text", "none"):
            raise ValueError(f"ot must be 'symmetric', 'regions_to_text' or 'none', got {self.ot!r}")
        if self.ot_epsilon <= 0 or self.ot_iterations < 1:
            raise ValueError("ot_epsilon must be > 0 and ot_iterations >= 1")
        if self.image_size % 32:
            raise ValueError(f"SSA image_size must be divisible by 32, got {self.image_size}")
        if self.text_fusion not in ("decoder", "late"):
            raise ValueError(f"text_fusion must be 'decoder' or 'late', got {self.text_fusion!r}")
        if self.text_fusion == "late" and self.guidance:
            raise ValueError("text_fusion 'late' shares image features across prompts; the guidance channel is "
                             "an encoder input that depends on the prompt: set guidance: false")


@dataclass
class SSAText:
    """What SSA reads for a batch of prompts.

    Args:
        expressions: pooled text features ``[B, 4, D]`` (sentence, locational, descriptive, diagnostic).
        expression_mask: ``[B, 4]``, 1 where the prompt has that expression.
        cells: guidance grid ``[B, 3, 2]`` (1 = the prompt allows the finding there).
    """

    expressions: torch.Tensor
    expression_mask: torch.Tensor
    cells: torch.Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "SSAText":
        return SSAText(self.expressions.to(device=device, dtype=dtype or self.expressions.dtype),
                       self.expression_mask.to(device), self.cells.to(device))

    def index(self, idx: torch.Tensor | Sequence[int]) -> "SSAText":
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.expressions.device)
        return SSAText(self.expressions[idx], self.expression_mask[idx], self.cells[idx])


def sinkhorn(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Entropic OT plan by log-domain Sinkhorn, batched and differentiable.

    ``cost`` [B, N, M]; marginals ``a`` [B, N] and ``b`` [B, M] (each summing to 1; zeros allowed:
    those rows / columns get no mass). Returns the plan [B, N, M] whose column sums equal ``b``
    exactly and row sums approach ``a`` as iterations grow. Same problem as POT's
    ``ot.sinkhorn(a, b, cost, reg=epsilon, method="sinkhorn_log")``.
    """
    cost = cost.float()
    log_a = torch.where(a > 0, a.float().clamp_min(1e-30).log(), torch.full_like(a, -1e4, dtype=torch.float32))
    log_b = torch.where(b > 0, b.float().clamp_min(1e-30).log(), torch.full_like(b, -1e4, dtype=torch.float32))
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    for _ in range(iterations):
        f = epsilon * log_a - epsilon * torch.logsumexp((g[:, None, :] - cost) / epsilon, dim=2)
        g = epsilon * log_b - epsilon * torch.logsumexp((f[:, :, None] - cost) / epsilon, dim=1)
    return torch.exp((f[:, :, None] + g[:, None, :] - cost) / epsilon)


def cosine_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - cos between every row of ``x`` [B, N, D] and of ``y`` [B, M, D] -> [B, N, M] in [0, 2]."""
    with torch.autocast(device_type=x.device.type, enabled=False):  # the plan needs fp32 costs
        return 1.0 - F.normalize(x.float(), dim=-1) @ F.normalize(y.float(), dim=-1).transpose(1, 2)


class TransportPooling(nn.Module):
    """One direction of the alignment: every source item gathers target values along an OT plan."""

    def __init__(self, dim: int, epsilon: float, iterations: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.epsilon, self.iterations = epsilon, iterations

    def forward(self, source: torch.Tensor, target: torch.Tensor, source_mass: torch.Tensor,
                target_mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (pooled [B, N, D]: each source's transport-weighted mix of targets, plan [B, N, M])."""
        plan = sinkhorn(cosine_cost(self.query(source), self.key(target)), source_mass, target_mass,
                        self.epsilon, self.iterations)
        weights = plan / plan.sum(-1, keepdim=True).clamp_min(1e-12)   # rows: a distribution over targets
        return weights.to(target.dtype) @ self.value(target), plan


@register("ssa", SSAConfig)
class SSA(nn.Module):
    """SSA model. ``forward(image [B, C, H, W], text: SSAText)`` -> ``{"logits", "losses"}``."""

    def __init__(self, config: SSAConfig) -> None:
        super().__init__()
        self.config = config
        enc, dec, d = config.encoder_channels, config.decoder_channels, config.dim
        self.encoder = CNNEncoder(config.in_channels + int(config.guidance), enc)
        self.region_level = {16: 3, 32: 4}[config.region_stride]
        region_channels = enc[self.region_level]
        self.region_in = nn.Sequential(nn.Conv2d(region_channels, d, 1), nn.GroupNorm(1, d))
        self.text_in = nn.Sequential(nn.Linear(config.text.dim, d), nn.LayerNorm(d))
        self.regions_to_text = TransportPooling(d, config.ot_epsilon, config.ot_iterations) \
            if config.ot != "none" else None
        self.text_to_regions = TransportPooling(d, config.ot_epsilon, config.ot_iterations) \
            if config.ot == "symmetric" else None
        self.region_out = nn.Conv2d(2 * d, region_channels, 1)
        self.text_out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU())
        self.temperature = LearnableTemperature()
        self.up16 = DecoderBlock(enc[4], enc[3], dec[0])
        self.up8 = DecoderBlock(dec[0], enc[2], dec[1])
        self.up4 = DecoderBlock(dec[1], enc[1], dec[2])
        self.up2 = DecoderBlock(dec[2], enc[0], dec[3])
        self.late = config.text_fusion == "late"
        if self.late:  # text-free decoder; per prompt: coarse region map + FiLM head on the pixel features
            c = config.head_channels
            self.pixel_proj = nn.Conv2d(dec[3], c, 1)  # text-free: the per-prompt work scales with c
            self.region_map = nn.Conv2d(2 * d, c, 1)
            self.film = nn.ModuleList([FiLM(d, c)])
            self.head = nn.Linear(d, c + 1)  # the prompt's own 1x1 convolution (weights, bias)
        else:
            self.film = nn.ModuleList([FiLM(d, c) for c in (enc[4], *dec)])
            self.head = nn.Conv2d(dec[3], 1, 1)
        self._pooled_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def requires_text(self) -> bool:
        return True

    @property
    def shares_image_features(self) -> bool:
        """True when one forward pass can answer several prompts per image for the price of one
        image part (``text`` batch = k x image batch)."""
        return self.late

    # ------------------------------------------------------------------ text
    def encode_text(self, encoder: TextEncoder, prompts: Sequence[str], plane: str = "coronal") -> SSAText:
        """Parse every prompt, encode its expressions, draw its guidance grid for ``plane``.

        ``plane`` is the anatomical plane the slice is shown in (the engine's layout; a picture
        such as a chest X-ray reads as ``coronal``); it decides which words name rows and columns.
        """
        parsed = [parse_report(p) for p in prompts]
        strings = list(dict.fromkeys(e for h in parsed for e in h.expressions if e))
        pooled = self._pooled(encoder, strings)
        dim = self.config.text.dim
        expressions = torch.zeros(len(prompts), NUM_EXPRESSIONS, dim, device=encoder.device)
        mask = torch.zeros(len(prompts), NUM_EXPRESSIONS, device=encoder.device)
        for i, h in enumerate(parsed):
            for j, e in enumerate(h.expressions):
                if e:
                    expressions[i, j] = pooled[e]
                    mask[i, j] = 1.0
        cells = torch.stack([torch.from_numpy(guidance_cells(h, plane, self.config.laterality)) for h in parsed])
        return SSAText(expressions, mask, cells.to(encoder.device))

    def _pooled(self, encoder: TextEncoder, strings: list[str]) -> dict[str, torch.Tensor]:
        if not encoder.config.uses_cache:  # a trainable encoder: no cache, gradients flow
            feats = encoder.encode(strings).pooled if strings else None
            return {s: feats[i] for i, s in enumerate(strings)}
        missing = [s for s in strings if s not in self._pooled_cache]
        if missing:
            with torch.no_grad():
                feats = encoder.encode(missing).pooled
            for i, s in enumerate(missing):
                self._pooled_cache[s] = feats[i].detach()
                if len(self._pooled_cache) > 8192:
                    self._pooled_cache.popitem(last=False)
        return {s: self._pooled_cache[s] for s in strings}

    # ------------------------------------------------------------------ forward
    def forward(self, image: torch.Tensor, text: SSAText | None) -> dict:
        if text is None:
            raise ValueError("SSA is text-guided: give a prompt (it has no text-free mode)")
        if not isinstance(text, SSAText):
            raise TypeError("SSA reads SSAText: encode prompts with model.encode_text(encoder, prompts)")
        check_divisible(image, 32, "SSA")
        k = _prompts_per_image(image, text)
        if self.late:
            return self._forward_late(image, text, k)
        if k > 1:
            image = image.repeat_interleave(k, 0)
        cfg = self.config
        b, _, h, w = image.shape
        guide = render_guidance(text.cells.to(image.dtype), h, w) if cfg.guidance else None
        feats = self.encoder(torch.cat([image, guide], 1) if guide is not None else image)

        level = feats[self.region_level]
        rh, rw = level.shape[-2:]
        regions = self.region_in(level).flatten(2).transpose(1, 2)              # [B, N, d]
        expr = self.text_in(text.expressions.to(image.dtype))                    # [B, E, d]
        expr_mask = text.expression_mask.to(image.dtype)
        expr_mass = expr_mask / expr_mask.sum(1, keepdim=True).clamp_min(1.0)
        if guide is not None:
            # regions inside the described area carry the transport mass (a small floor keeps the rest)
            inside = F.adaptive_avg_pool2d(guide, (rh, rw)).flatten(1) + 0.05
        else:
            inside = torch.ones(b, rh * rw, device=image.device, dtype=image.dtype)
        region_mass = inside / inside.sum(1, keepdim=True)

        if self.regions_to_text is not None:
            text_in_regions, _ = self.regions_to_text(regions, expr, region_mass, expr_mass)
        else:
            sentence = (expr * expr_mask[..., None]).sum(1) / expr_mask.sum(1, keepdim=True).clamp_min(1.0)
            text_in_regions = sentence[:, None].expand_as(regions)
        if self.text_to_regions is not None:
            regions_in_text, _ = self.text_to_regions(expr, regions, expr_mass,
                                                      torch.full_like(region_mass, 1.0 / (rh * rw)))
        else:
            regions_in_text = regions.mean(1, keepdim=True).expand_as(expr)

        fused = torch.cat([regions, text_in_regions], -1).transpose(1, 2).reshape(b, -1, rh, rw)
        feats = list(feats)
        feats[self.region_level] = feats[self.region_level] + self.region_out(fused)
        text_vector = self.text_out(((expr + regions_in_text) * expr_mask[..., None]).sum(1)
                                    / expr_mask.sum(1, keepdim=True).clamp_min(1.0))

        z = self.film[0](feats[4], text_vector)
        z = self.film[1](self.up16(z, feats[3]), text_vector)
        z = self.film[2](self.up8(z, feats[2]), text_vector)
        z = self.film[3](self.up4(z, feats[1]), text_vector)
        z = self.film[4](self.up2(z, feats[0]), text_vector)
        logits = self.head(F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False))

        losses = self._align_loss(regions_in_text, expr, expr_mask)
        if self.training and guide is not None and cfg.guidance_weight > 0:
            losses["guidance"] = cfg.guidance_weight * outside_mass(logits, guide)
        return {"logits": logits, "losses": losses}

    def _align_loss(self, regions_in_text: torch.Tensor, expr: torch.Tensor, expr_mask: torch.Tensor) -> dict:
        if not (self.training and self.config.align_weight > 0):
            return {}
        pooled_regions = (regions_in_text * expr_mask[..., None]).sum(1) / expr_mask.sum(1, keepdim=True)
        pooled_text = (expr * expr_mask[..., None]).sum(1) / expr_mask.sum(1, keepdim=True)
        return {"align": self.config.align_weight * info_nce(pooled_regions, pooled_text, self.temperature())}

    def _forward_late(self, image: torch.Tensor, text: SSAText, k: int) -> dict:
        """Image part once per image (no text), then every prompt: OT on the shared regions and the head."""
        _, _, h, w = image.shape
        feats = self.encoder(image)
        level = feats[self.region_level]
        rh, rw = level.shape[-2:]
        regions = self.region_in(level).flatten(2).transpose(1, 2)              # [B, N, d]
        z = self.up16(feats[4], feats[3])
        z = self.up8(z, feats[2])
        z = self.up4(z, feats[1])
        pixels = self.pixel_proj(self.up2(z, feats[0]))                          # [B, c, h/2, w/2]
        b, c, ph, pw = pixels.shape
        if k > 1:
            regions = regions.repeat_interleave(k, 0)  # small (stride 16); the pixels are broadcast, not copied
        n = regions.shape[0]
        expr = self.text_in(text.expressions.to(image.dtype))                    # [n, E, d]
        expr_mask = text.expression_mask.to(image.dtype)
        expr_mass = expr_mask / expr_mask.sum(1, keepdim=True).clamp_min(1.0)
        uniform = torch.full((n, rh * rw), 1.0 / (rh * rw), device=image.device, dtype=image.dtype)
        if self.regions_to_text is not None:
            text_in_regions, _ = self.regions_to_text(regions, expr, uniform, expr_mass)
        else:
            sentence = (expr * expr_mask[..., None]).sum(1) / expr_mask.sum(1, keepdim=True).clamp_min(1.0)
            text_in_regions = sentence[:, None].expand_as(regions)
        if self.text_to_regions is not None:
            regions_in_text, _ = self.text_to_regions(expr, regions, expr_mass, uniform)
        else:
            regions_in_text = regions.mean(1, keepdim=True).expand_as(expr)
        fused = torch.cat([regions, text_in_regions], -1).transpose(1, 2).reshape(n, -1, rh, rw)
        text_vector = self.text_out(((expr + regions_in_text) * expr_mask[..., None]).sum(1)
                                    / expr_mask.sum(1, keepdim=True).clamp_min(1.0))
        # per prompt, at stride 2: FiLM(pixels) + the coarse text-aware map -> GELU -> the prompt's 1x1 conv
        coarse = F.interpolate(self.region_map(fused), size=(ph, pw), mode="bilinear", align_corners=False)
        gamma, beta = self.film[0].proj(text_vector).to(pixels.dtype).view(b, k, 2 * c, 1, 1).chunk(2, dim=2)
        hidden = F.gelu(pixels[:, None] * (1 + gamma) + beta + coarse.view(b, k, c, ph, pw))
        weight, bias = self.head(text_vector).to(pixels.dtype).view(b, k, c + 1).split([c, 1], dim=2)
        z = torch.einsum("bkchw,bkc->bkhw", hidden, weight) + bias[..., None]
        logits = F.interpolate(z.reshape(n, 1, ph, pw), size=(h, w), mode="bilinear", align_corners=False)
        return {"logits": logits, "losses": self._align_loss(regions_in_text, expr, expr_mask)}


def _prompts_per_image(image: torch.Tensor, text: SSAText) -> int:
    """How many prompts each image answers (the text batch is a whole multiple of the image batch)."""
    b, t = image.shape[0], text.expressions.shape[0]
    if t % b:
        raise ValueError(f"{t} prompts for {b} images: the text batch must be a whole multiple of the image batch")
    return t // b


def outside_mass(logits: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """Mean fraction of predicted foreground probability that lies outside the guidance mask."""
    prob = torch.sigmoid(logits.float())
    outside = (prob * (1 - guide.float())).flatten(1).sum(1)
    return (outside / prob.flatten(1).sum(1).clamp_min(1.0)).mean()


__all__ = ["SSA", "SSAConfig", "SSAText", "cosine_cost", "outside_mass", "sinkhorn"]
