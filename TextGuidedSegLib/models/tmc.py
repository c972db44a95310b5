"""TMC: text-guided multi-stage cross-modal segmentation.

A Swin-Tiny image encoder (MONAI ``SwinTransformer``, 2D) and a CNN encoder run side by side
(dual down paths). At Swin stages 2, 3 and 4 a multi-stage cross-modal module (MCM) lets the
visual tokens attend to the language stream and the language stream attend back:

    F_V = V + MHCA(Q=V_i, K=V=L_i);   F_V <- F_V + MLP(F_V)
    F_L = L + MHCA(Q=L_i, K=V=F_V);   F_L <- F_L + MLP(F_L)

F_V replaces the stage's feature and enters the next Swin stage (the text steers the encoder),
and F_L is carried (re-projected) to the next stage's MCM. A multi-stage alignment (MA) loss pulls the
globally pooled F_V of each stage towards the text's pooled vector (InfoNCE with a learnable
temperature per stage, total weight ``align_weight`` = 0.1). A U-shaped CNN decoder concatenates,
at each scale, the upsampled decoder feature Z, the cross-modal feature F_V and the CNN feature X.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

from ..text import TextFeatures
from .blocks import CNNEncoder, CrossAttentionBlock, DecoderBlock, LearnableTemperature, check_divisible, info_nce
from .config import ModelConfig
from .registry import register


@dataclass
class TMCConfig(ModelConfig):
    """TMC hyper-parameters; defaults are the paper's (Swin-T at 224 px, BERT text).

    Args:
        embed_dim: Swin stage-1 channels C (stages have C, 2C, 4C, 8C). Swin-T: 96.
        depths: Swin blocks per stage. Swin-T: (2, 2, 6, 2).
        num_heads: attention heads per Swin stage. Swin-T: (3, 6, 12, 24).
        window_size: Swin window. Swin-T: 7 (use a divisor of image_size / 32 for other sizes).
        patch_size: Swin patch size (4 gives strides 4, 8, 16, 32).
        cnn_channels: channels of the CNN down path at strides 2, 4, 8, 16, 32.
        decoder_channels: decoder channels at strides 32, 16, 8, 4, 2.
        mcm_stages: Swin stages (1-based) that get an MCM; the paper uses 2, 3, 4.
        mcm_heads: attention heads inside each MCM.
        align_dim: shared space of the alignment loss.
        align_weight: lambda of the multi-stage alignment loss.
        drop_path_rate: stochastic depth of the Swin blocks.
    """

    model_type: str = "tmc"
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    cnn_channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    decoder_channels: tuple[int, ...] = (512, 256, 128, 64, 32)
    mcm_stages: tuple[int, ...] = (2, 3, 4)
    mcm_heads: int = 4
    align_dim: int = 256
    align_weight: float = 0.1
    drop_path_rate: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.depths, self.num_heads = tuple(self.depths), tuple(self.num_heads)
        self.cnn_channels, self.decoder_channels = tuple(self.cnn_channels), tuple(self.decoder_channels)
        self.mcm_stages = tuple(self.mcm_stages)
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError("TMC needs 4 Swin stages: depths and num_heads of length 4")
        if len(self.cnn_channels) != 5 or len(self.decoder_channels) != 5:
            raise ValueError("cnn_channels and decoder_channels need 5 entries (strides 2..32 / 32..2)")
        if self.patch_size != 4:
            raise ValueError("TMC's scales assume patch_size 4 (Swin strides 4, 8, 16, 32)")
        if not set(self.mcm_stages) <= {2, 3, 4} or not self.mcm_stages:
            raise ValueError(f"mcm_stages must be a non-empty subset of (2, 3, 4), got {self.mcm_stages}")
        for i, (c, h) in enumerate(zip(self.stage_channels, self.num_heads)):
            if c % h:
                raise ValueError(f"Swin stage {i + 1}: {c} channels not divisible by {h} heads")
            if c % self.mcm_heads:
                raise ValueError(f"Swin stage {i + 1}: {c} channels not divisible by mcm_heads {self.mcm_heads}")
        if self.image_size % 32:
            raise ValueError(f"TMC image_size must be divisible by 32, got {self.image_size}")

    @property
    def stage_channels(self) -> tuple[int, int, int, int]:
        c = self.embed_dim
        return (c, 2 * c, 4 * c, 8 * c)


class MultiStageCrossModal(nn.Module):
    """One MCM: visual tokens attend to language, then language attends to the fused visual tokens."""

    def __init__(self, dim: int, num_heads: int, update_language: bool = True) -> None:
        super().__init__()
        self.vision_from_text = CrossAttentionBlock(dim, num_heads)
        # The last MCM has no later stage to hand F_L to, so it does not compute one.
        self.text_from_vision = CrossAttentionBlock(dim, num_heads) if update_language else None

    def forward(self, visual: torch.Tensor, language: torch.Tensor, text_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``visual`` [B, C, H, W], ``language`` [B, L, C] -> (F_V [B, C, H, W], F_L [B, L, C] or None)."""
        b, c, h, w = visual.shape
        v = visual.flatten(2).transpose(1, 2)
        f_v, _ = self.vision_from_text(v, language, text_mask)
        f_l = self.text_from_vision(language, f_v)[0] if self.text_from_vision is not None else None
        return f_v.transpose(1, 2).reshape(b, c, h, w), f_l


@register("tmc", TMCConfig)
class TMC(nn.Module):
    """TMC model. ``forward(image [B, C, H, W], text)`` -> ``{"logits": [B, 1, H, W], "losses": {...}}``."""

    def __init__(self, config: TMCConfig) -> None:
        super().__init__()
        self.config = config
        chans = config.stage_channels
        self.swin = SwinTransformer(
            in_chans=config.in_channels, embed_dim=config.embed_dim, window_size=(config.window_size,) * 2,
            patch_size=(config.patch_size,) * 2, depths=config.depths, num_heads=config.num_heads,
            drop_path_rate=config.drop_path_rate, spatial_dims=2)
        # The last Swin stage keeps stride 32: no patch merging after it (Swin-T has 4 stages).
        self.swin.layers4[0].downsample = None
        self.cnn = CNNEncoder(config.in_channels, config.cnn_channels)

        text_dim = config.text.dim
        first = min(config.mcm_stages)
        self.text_in = nn.Linear(text_dim, chans[first - 1])
        self.lang_proj = nn.ModuleDict()
        self.mcm = nn.ModuleDict()
        self.align_visual = nn.ModuleDict()
        self.align_text = nn.ModuleDict()
        self.temperature = nn.ModuleDict()
        prev = chans[first - 1]
        for s in config.mcm_stages:
            c = chans[s - 1]
            self.lang_proj[str(s)] = nn.Identity() if prev == c else nn.Linear(prev, c)
            self.mcm[str(s)] = MultiStageCrossModal(c, config.mcm_heads, update_language=s != max(config.mcm_stages))
            self.align_visual[str(s)] = nn.Linear(c, config.align_dim)
            self.align_text[str(s)] = nn.Linear(text_dim, config.align_dim)
            self.temperature[str(s)] = LearnableTemperature()
            prev = c

        cnn, dec = config.cnn_channels, config.decoder_channels
        # strides 32, 16, 8, 4: (Z from below, F_V or Swin feature, X from the CNN path)
        self.bottleneck = nn.Sequential(nn.Conv2d(chans[3] + cnn[4], dec[0], 1), nn.ReLU(inplace=True))
        self.up16 = DecoderBlock(dec[0], chans[2] + cnn[3], dec[1])
        self.up8 = DecoderBlock(dec[1], chans[1] + cnn[2], dec[2])
        self.up4 = DecoderBlock(dec[2], chans[0] + cnn[1], dec[3])
        self.up2 = DecoderBlock(dec[3], cnn[0], dec[4])
        self.head = nn.Conv2d(dec[4], 1, 1)

    @property
    def requires_text(self) -> bool:
        return True

    def forward(self, image: torch.Tensor, text: TextFeatures | None) -> dict:
        if text is None:
            raise ValueError("TMC is text-guided: give a prompt (it has no text-free mode)")
        check_divisible(image, 32, "TMC")
        x_cnn = self.cnn(image)                                   # strides 2, 4, 8, 16, 32
        tokens = text.tokens.to(image.dtype)
        language = self.text_in(tokens)
        align = image.new_zeros(())
        swin = self.swin
        # Run the Swin stages one by one so that each stage's cross-modal output F_V (not the plain
        # visual feature) enters the next stage: the text steers the encoder, not only the decoder.
        # MONAI's layers_k = stage-k blocks + patch merging, so layers1's output is the stride-8
        # (stage-2) feature, layers2's the stride-16 (stage-3) one, and layers4 has no merging.
        x = swin.pos_drop(swin.patch_embed(image))
        visual = {1: swin.proj_out(x, True)}
        stage_layers = {2: swin.layers1[0], 3: swin.layers2[0], 4: None}
        for stage in (2, 3, 4):
            if stage == 4:
                x = swin.layers4[0](swin.layers3[0](x.contiguous()).contiguous())
            else:
                x = stage_layers[stage](x.contiguous())
            if stage in self.config.mcm_stages:
                key = str(stage)
                language = self.lang_proj[key](language)
                x, new_language = self.mcm[key](x, language, text.mask)
                language = new_language if new_language is not None else language
                if self.config.align_weight > 0:
                    v = self.align_visual[key](x.mean(dim=(2, 3)))
                    t = self.align_text[key](text.pooled.to(image.dtype))
                    align = align + info_nce(v, t, self.temperature[key]())
            visual[stage] = swin.proj_out(x, True)
        losses = {}
        if self.config.align_weight > 0:
            losses["align"] = self.config.align_weight * align / len(self.config.mcm_stages)

        z = self.bottleneck(torch.cat([visual[4], x_cnn[4]], dim=1))
        z = self.up16(z, visual[3], x_cnn[3])
        z = self.up8(z, visual[2], x_cnn[2])
        z = self.up4(z, visual[1], x_cnn[1])
        z = self.up2(z, x_cnn[0])
        logits = self.head(F.interpolate(z, size=image.shape[-2:], mode="bilinear", align_corners=False))
        return {"logits": logits, "losses": losses}
