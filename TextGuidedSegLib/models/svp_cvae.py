"""SVP-CVAE: symmetry- and variability-perceiving conditional VAE for text-guided segmentation.

Several plausible masks for one description: a conditional latent z (prior from image + text,
posterior that also sees the ground truth during training) shifts the bottleneck, and sampling z
from the prior at inference gives N masks whose spread is a per-pixel uncertainty map.

- **CATE** (clinical attribute text encoder): a BERT-family encoder, frozen, with LoRA adapters
  (``peft``) on the query / key / value / dense projections of its last layers (set in the text
  config: ``lora_layers``, ``lora_targets``). Hidden states of three depths (``text_levels``) are
  projected into one space: low-level *morphological*, *regional*, high-level *diagnostic*.
- **MARL** at the bottleneck: SSGM (depthwise 3x3 conv: channel-wise structure) and CBSM (the
  asymmetry map ``|F - flip_w(F)|`` through anisotropic depthwise 1xk and kx1 convs, no bias, so a
  left-right symmetric feature gives exactly zero), concatenated and fused by a 1x1 conv,
  residual. The flip is along the slice width: the engine shows every slice in the radiological
  layout (columns = the patient's right-to-left axis, from IJK->RAS), so in axial and coronal
  slices it mirrors the patient's left and right whatever the array order.
- **MTF**: visual tokens attend to the morphological text tokens (cross-attention, residual).
- **CLMD**: prior N(mu_p, sigma_p) from pooled visual + text features; posterior N(mu_q, sigma_q)
  adds the down-sampled ground-truth mask (training only); z (reparameterised) is projected and
  added to the bottleneck. KL(q || p) analytic, weighted by beta(t): zero for
  ``kl_warmup_start`` epochs, then a linear ramp to ``kl_weight`` over ``kl_warmup_epochs``
  (the two-stage warm-up; the epoch comes from the trainer through :meth:`on_epoch_start`).
- **Hierarchical progressive decoder**: regional text enters the first up-sampling stage
  (cross-attention), diagnostic text the last two (FiLM with its pooled vector).
- **SAL**: InfoNCE (fixed tau = ``sal_temperature``) between the pooled visual bottleneck and the
  pooled morphological text, weight ``sal_weight``.

Inference: :meth:`sample` runs the encoder once and the decoder for N prior samples; the engine
averages them (label from the mean probability) and reports the **variance of the N sampled
foreground probabilities** per pixel (0 when all samples agree, at most 0.25). Without sampling
(validation, ``samples = 1``) z is the prior mean.
Ablations: ``marl``, ``cbsm``, ``clmd`` switches and ``sal_weight = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..text import TextFeatures
from .blocks import CNNEncoder, CrossAttentionBlock, DecoderBlock, FiLM, check_divisible, info_nce
from .config import ModelConfig
from .registry import register


@dataclass
class SVPCVAEConfig(ModelConfig):
    """SVP-CVAE hyper-parameters; defaults are the paper-scale configuration.

    Args:
        encoder_channels: CNN encoder channels at strides 2, 4, 8, 16, 32.
        decoder_channels: decoder channels at strides 16, 8, 4, 2.
        dim: shared visual / text space (bottleneck tokens, text levels).
        heads: attention heads of MTF and of the regional-text stage.
        text_levels: hidden-state indices (0 = embeddings) read as morphological, regional,
            diagnostic text (BERT-base: 4, 8, 12).
        latent_dim: size of z.
        marl, cbsm, clmd: ablation switches (no MARL, no CBSM inside MARL, no latent).
        cbsm_kernel: k of CBSM's 1xk / kx1 depthwise convolutions.
        kl_weight: beta after the warm-up. kl_warmup_start: epochs with beta = 0.
        kl_warmup_epochs: epochs of the linear ramp from 0 to kl_weight.
        sal_weight: lambda of SAL (0 = no SAL). sal_temperature: its fixed tau.
        samples: prior samples the engine draws by default (1 = the prior mean only).
    """

    model_type: str = "svp_cvae"
    encoder_channels: tuple[int, ...] = (64, 128, 256, 512, 512)
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32)
    dim: int = 256
    heads: int = 8
    text_levels: tuple[int, ...] = (4, 8, 12)
    latent_dim: int = 6
    marl: bool = True
    cbsm: bool = True
    clmd: bool = True
    cbsm_kernel: int = 7
    kl_weight: float = 1.0
    kl_warmup_start: int = 5
    kl_warmup_epochs: int = 10
    sal_weight: float = 0.1
    sal_temperature: float = 1.0
    samples: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        self.encoder_channels, self.decoder_channels = tuple(self.encoder_channels), tuple(self.decoder_channels)
        self.text_levels = tuple(self.text_levels)
        if len(self.encoder_channels) != 5 or len(self.decoder_channels) != 4:
            raise ValueError("encoder_channels needs 5 entries (strides 2..32), decoder_channels 4 (strides 16..2)")
        if len(self.text_levels) != 3:
            raise ValueError(f"text_levels needs 3 hidden-state indices (morphological, regional, diagnostic), "
                             f"got {self.text_levels}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.cbsm_kernel % 2 == 0:
            raise ValueError(f"cbsm_kernel must be odd, got {self.cbsm_kernel}")
        if self.samples < 1 or self.latent_dim < 1:
            raise ValueError("samples and latent_dim must be >= 1")
        if self.image_size % 32:
            raise ValueError(f"SVP-CVAE image_size must be divisible by 32, got {self.image_size}")


class CBSM(nn.Module):
    """Cross-bilateral symmetry: |F - flip_w(F)| through 1xk then kx1 depthwise convs (no bias)."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        pad = kernel // 2
        self.horizontal = nn.Conv2d(channels, channels, (1, kernel), padding=(0, pad), groups=channels, bias=False)
        self.vertical = nn.Conv2d(channels, channels, (kernel, 1), padding=(pad, 0), groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        asymmetry = (x - torch.flip(x, dims=(-1,))).abs()
        return F.relu(self.vertical(self.horizontal(asymmetry)))


class MARL(nn.Module):
    """SSGM (depthwise 3x3) + CBSM, concatenated, fused by a 1x1 conv, added back (residual)."""

    def __init__(self, channels: int, cbsm: bool, kernel: int) -> None:
        super().__init__()
        self.ssgm = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.cbsm = CBSM(channels, kernel) if cbsm else None
        self.fuse = nn.Sequential(nn.Conv2d(channels * (2 if cbsm else 1), channels, 1, bias=False),
                                  nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.ssgm(x)] + ([self.cbsm(x)] if self.cbsm is not None else [])
        return x + self.fuse(torch.cat(parts, dim=1))


class GaussianHead(nn.Module):
    """MLP -> (mu, log sigma) of a diagonal Gaussian."""

    def __init__(self, in_dim: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, 2 * latent))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_sigma = self.net(x).chunk(2, dim=-1)
        return mu, log_sigma.clamp(-6.0, 3.0)


def gaussian_kl(mu_q: torch.Tensor, log_sigma_q: torch.Tensor, mu_p: torch.Tensor, log_sigma_p: torch.Tensor
                ) -> torch.Tensor:
    """KL(N_q || N_p) of diagonal Gaussians, summed over the latent, averaged over the batch."""
    with torch.autocast(device_type=mu_q.device.type, enabled=False):  # exp and ratios in fp32
        mu_q, log_sigma_q, mu_p, log_sigma_p = (t.float() for t in (mu_q, log_sigma_q, mu_p, log_sigma_p))
        var_q, var_p = (2 * log_sigma_q).exp(), (2 * log_sigma_p).exp()
        kl = log_sigma_p - log_sigma_q + (var_q + (mu_q - mu_p) ** 2) / (2 * var_p) - 0.5
        return kl.sum(-1).mean()


def kl_beta(epoch: float, weight: float, start: int, ramp: int) -> float:
    """Two-stage warm-up: 0 for ``start`` epochs, then linear to ``weight`` over ``ramp`` epochs."""
    if epoch < start:
        return 0.0
    if ramp <= 0:
        return weight
    return weight * min(1.0, (epoch - start + 1) / ramp)


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(tokens.dtype)[..., None]
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


@register("svp_cvae", SVPCVAEConfig)
class SVPCVAE(nn.Module):
    """``forward(image, text, target=None)`` -> ``{"logits", "losses"}``; :meth:`sample` draws N masks."""

    #: the trainer passes the ground-truth mask as ``target`` (the posterior network needs it)
    uses_target = True
    #: the engine may call :meth:`sample` and report an uncertainty map
    samples_masks = True

    def __init__(self, config: SVPCVAEConfig) -> None:
        super().__init__()
        self.config = config
        enc, dec, d = config.encoder_channels, config.decoder_channels, config.dim
        self.encoder = CNNEncoder(config.in_channels, enc)
        self.marl = MARL(enc[4], config.cbsm, config.cbsm_kernel) if config.marl else None
        self.visual_in = nn.Conv2d(enc[4], d, 1)
        self.text_levels = nn.ModuleList([nn.Sequential(nn.Linear(config.text.dim, d), nn.LayerNorm(d))
                                          for _ in range(3)])
        self.mtf = CrossAttentionBlock(d, config.heads)
        if config.clmd:
            self.prior = GaussianHead(2 * d, d, config.latent_dim)
            self.mask_encoder = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(inplace=True),
                                              nn.Conv2d(16, d, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.posterior = GaussianHead(3 * d, d, config.latent_dim)
            self.latent_out = nn.Linear(config.latent_dim, d)
        self.bottleneck_out = nn.Conv2d(d, enc[4], 1)
        self.up16 = DecoderBlock(enc[4], enc[3], dec[0])
        self.regional = CrossAttentionBlock(dec[0], config.heads if dec[0] % config.heads == 0 else 1, kv_dim=d)
        self.up8 = DecoderBlock(dec[0], enc[2], dec[1])
        self.up4 = DecoderBlock(dec[1], enc[1], dec[2])
        self.diagnostic4 = FiLM(d, dec[2])
        self.up2 = DecoderBlock(dec[2], enc[0], dec[3])
        self.diagnostic2 = FiLM(d, dec[3])
        self.head = nn.Conv2d(dec[3], 1, 1)
        self.register_buffer("epoch", torch.zeros(()), persistent=False)

    @property
    def requires_text(self) -> bool:
        return True

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the trainer before every epoch: beta(t) of the KL term follows it."""
        self.epoch.fill_(float(epoch))

    @property
    def beta(self) -> float:
        c = self.config
        return kl_beta(float(self.epoch), c.kl_weight, c.kl_warmup_start, c.kl_warmup_epochs)

    # ------------------------------------------------------------------ parts
    def _text(self, text: TextFeatures, dtype: torch.dtype) -> list[torch.Tensor]:
        hidden = text.hidden_states
        if max(self.config.text_levels) >= len(hidden):
            raise ValueError(f"text_levels {self.config.text_levels} need {max(self.config.text_levels) + 1} hidden "
                             f"states; the text encoder gives {len(hidden)} (set model.text_levels for it)")
        return [proj(hidden[i].to(dtype)) for proj, i in zip(self.text_levels, self.config.text_levels)]

    def _encode(self, image: torch.Tensor, text: TextFeatures) -> dict:
        """Everything before the latent: encoder features, fused bottleneck, text levels, pooled vectors."""
        if text is None:
            raise ValueError("SVP-CVAE is text-guided: give a prompt (it has no text-free mode)")
        check_divisible(image, 32, "SVP-CVAE")
        feats = self.encoder(image)
        x = feats[4] if self.marl is None else self.marl(feats[4])
        b, _, h, w = x.shape
        morph, regional, diagnostic = self._text(text, image.dtype)
        tokens = self.visual_in(x).flatten(2).transpose(1, 2)                    # [B, hw, d]
        tokens, _ = self.mtf(tokens, morph, text.mask)
        pooled_visual = tokens.mean(1)
        pooled = [_masked_mean(t, text.mask) for t in (morph, regional, diagnostic)]
        return {"feats": feats, "tokens": tokens, "hw": (h, w), "visual": pooled_visual, "morph": pooled[0],
                "regional": regional, "diagnostic": pooled[2], "text_global": torch.stack(pooled).mean(0),
                "mask": text.mask}

    def _prior(self, enc: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prior(torch.cat([enc["visual"], enc["text_global"]], -1))

    def _decode(self, enc: dict, z: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        """Logits for one latent per batch row (``z`` [B', latent]; B' a multiple of the batch)."""
        tokens, feats = enc["tokens"], enc["feats"]
        reps = 1 if z is None else z.shape[0] // tokens.shape[0]
        if reps > 1:  # several samples of z per image: decode them as one larger batch
            tokens = tokens.repeat(reps, 1, 1)
            feats = [f.repeat(reps, 1, 1, 1) for f in feats]
            regional, mask = enc["regional"].repeat(reps, 1, 1), enc["mask"].repeat(reps, 1)
            diagnostic = enc["diagnostic"].repeat(reps, 1)
        else:
            regional, mask, diagnostic = enc["regional"], enc["mask"], enc["diagnostic"]
        if z is not None:
            tokens = tokens + self.latent_out(z.to(tokens.dtype))[:, None, :]
        h, w = enc["hw"]
        x = feats[4] + self.bottleneck_out(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w))
        x = self.up16(x, feats[3])
        b, c, h16, w16 = x.shape
        t, _ = self.regional(x.flatten(2).transpose(1, 2), regional, mask)
        x = t.transpose(1, 2).reshape(b, c, h16, w16)
        x = self.up8(x, feats[2])
        x = self.diagnostic4(self.up4(x, feats[1]), diagnostic)
        x = self.diagnostic2(self.up2(x, feats[0]), diagnostic)
        return self.head(F.interpolate(x, size=size, mode="bilinear", align_corners=False))

    # ------------------------------------------------------------------ API
    def forward(self, image: torch.Tensor, text: TextFeatures | None, target: torch.Tensor | None = None) -> dict:
        """Training (with ``target``): z from the posterior, KL to the prior. Otherwise z = prior mean."""
        cfg = self.config
        enc = self._encode(image, text)
        losses = {}
        z = None
        if cfg.clmd:
            mu_p, log_sigma_p = self._prior(enc)
            if target is not None and self.training:
                mask_feature = self.mask_encoder(F.interpolate(target.to(image.dtype), size=enc["hw"], mode="area"))
                mu_q, log_sigma_q = self.posterior(torch.cat([enc["visual"], enc["text_global"], mask_feature], -1))
                z = mu_q + log_sigma_q.exp() * torch.randn_like(mu_q)
                losses["kl"] = self.beta * gaussian_kl(mu_q, log_sigma_q, mu_p, log_sigma_p)
            else:
                z = mu_p
        if self.training and cfg.sal_weight > 0:
            losses["sal"] = cfg.sal_weight * info_nce(enc["visual"], enc["morph"],
                                                      image.new_tensor(cfg.sal_temperature))
        return {"logits": self._decode(enc, z, image.shape[-2:]), "losses": losses}

    @torch.no_grad()
    def sample(self, image: torch.Tensor, text: TextFeatures, num_samples: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Foreground probabilities of ``num_samples`` prior samples: ``[S, B, 1, H, W]``.

        The encoder runs once; only the decoder runs per sample. Same ``generator`` state, same samples.
        """
        enc = self._encode(image, text)
        b = image.shape[0]
        if not self.config.clmd:  # no latent: every sample is the same deterministic mask
            p = torch.sigmoid(self._decode(enc, None, image.shape[-2:]).float())
            return p[None].expand(num_samples, *p.shape)
        mu_p, log_sigma_p = self._prior(enc)
        eps = torch.randn((num_samples, *mu_p.shape), generator=generator, device=mu_p.device, dtype=torch.float32)
        z = (mu_p[None] + log_sigma_p.exp()[None] * eps.to(mu_p.dtype)).reshape(num_samples * b, -1)
        logits = self._decode(enc, z, image.shape[-2:])                       # [S*B, 1, H, W]
        return torch.sigmoid(logits.float()).reshape(num_samples, b, *logits.shape[1:])
