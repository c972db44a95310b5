"""ProLearn: prototype-driven semantic approximation (PSA) for text-free language-guided segmentation.

A language-guided U-Net: an image encoder gives features at strides 4, 8, 16 and 32; three
guide stages (GuideDecoder style) upsample, fuse the skip feature, and let every pixel attend to
the guidance tokens; a sub-pixel head returns full-resolution logits.

Where a language-guided U-Net reads the report's token features, ProLearn reads the answer of its
prototype bank. The bank holds N linked pairs, each taken from one *real* training sample at
initialisation (``Training/psa.py``: token relevance -> shortened sentence -> HDBSCAN surrogate
labels -> k-means sub-clusters -> the sample nearest each centroid):

    query prototype  q_n  = that sample's pooled stride-32 image feature      [N, C]
    response prototype r_n = that sample's report token features               [N, L, D]

    s = cos(f(x), q_n)  for all n;  top-k (k = 3);  w = softmax(s_top / tau);  guidance = sum_k w_k r_k

Training and inference then need no text (the paper's setting): the bank is learnable and trained
with the segmentation loss. A model with ``num_prototypes = 0`` is the plain language-guided U-Net
that PSA initialisation trains first on the paired subset to score report tokens (its
cross-attention weights). When a prompt is given to a model with a bank, its token features take
the place of the bank's answer (the responses are report token features, so the decoder reads
the same kind of input).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks import SubpixelUpsample
from torch import nn

from ..text import TextFeatures
from .blocks import CNNEncoder, CrossAttentionBlock, DecoderBlock, check_divisible
from .config import ModelConfig
from .registry import register


@dataclass
class ProLearnConfig(ModelConfig):
    """ProLearn hyper-parameters; defaults are the paper's (ConvNeXt-Tiny at 224 px, k = 3).

    Args:
        encoder: ``convnext`` (transformers ``ConvNextModel``; sizes below) or ``cnn`` (a small
            strided CNN, the CPU configs).
        convnext_hidden_sizes, convnext_depths: ConvNeXt stages (Tiny: 96-192-384-768, 3-3-9-3).
        convnext_pretrained: HF id or local directory of ConvNeXt weights loaded once before
            training (``facebook/convnext-tiny-224`` in the paper config; empty = random init).
        cnn_channels: the CNN encoder's channels at strides 2, 4, 8, 16, 32.
        decoder_channels: guide-stage channels at strides 16, 8, 4.
        heads: attention heads of each guide stage.
        head_channels: channels of the x4 sub-pixel upsampling head.
        num_prototypes: N, the size of the prototype bank (set by PSA initialisation; 0 = no bank,
            the model needs text: the token-relevance model).
        top_k: prototypes each image consults (paper: 3).
        query_temperature: tau of the softmax over the top-k cosine similarities (paper: 1).
        prototypes_per_cluster: M, k-means sub-clusters per surrogate label (paper: 16).
    """

    model_type: str = "prolearn"
    encoder: str = "convnext"
    convnext_hidden_sizes: tuple[int, ...] = (96, 192, 384, 768)
    convnext_depths: tuple[int, ...] = (3, 3, 9, 3)
    convnext_pretrained: str = ""
    cnn_channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    decoder_channels: tuple[int, ...] = (384, 192, 96)
    heads: int = 4
    head_channels: int = 24
    num_prototypes: int = 0
    top_k: int = 3
    query_temperature: float = 1.0
    prototypes_per_cluster: int = 16
    text_free: bool = False  # derived from num_prototypes in __post_init__

    def __post_init__(self) -> None:
        super().__post_init__()
        self.convnext_hidden_sizes, self.convnext_depths = tuple(self.convnext_hidden_sizes), tuple(self.convnext_depths)
        self.cnn_channels, self.decoder_channels = tuple(self.cnn_channels), tuple(self.decoder_channels)
        if self.encoder not in ("convnext", "cnn"):
            raise ValueError(f"ProLearn encoder must be 'convnext' or 'cnn', got {self.encoder!r}")
        if len(self.convnext_hidden_sizes) != 4 or len(self.convnext_depths) != 4:
            raise ValueError("ConvNeXt needs 4 stages: convnext_hidden_sizes and convnext_depths of length 4")
        if len(self.cnn_channels) != 5:
            raise ValueError("cnn_channels needs 5 entries (strides 2, 4, 8, 16, 32)")
        if len(self.decoder_channels) != 3:
            raise ValueError("decoder_channels needs 3 entries (strides 16, 8, 4)")
        for c in self.decoder_channels:
            if c % self.heads:
                raise ValueError(f"decoder channels {c} not divisible by heads {self.heads}")
        if self.image_size % 32:
            raise ValueError(f"ProLearn image_size must be divisible by 32, got {self.image_size}")
        if self.num_prototypes < 0 or self.top_k < 1:
            raise ValueError(f"num_prototypes must be >= 0 and top_k >= 1, got {self.num_prototypes}, {self.top_k}")
        if self.num_prototypes and self.top_k > self.num_prototypes:
            raise ValueError(f"top_k ({self.top_k}) exceeds the bank's {self.num_prototypes} prototypes")
        if self.query_temperature <= 0:
            raise ValueError(f"query_temperature must be > 0, got {self.query_temperature}")
        self.text_free = self.num_prototypes > 0  # a bank is what lets it run without text

    @property
    def encoder_channels(self) -> tuple[int, int, int, int]:
        """Channels at strides 4, 8, 16, 32."""
        chans = self.convnext_hidden_sizes if self.encoder == "convnext" else self.cnn_channels[1:]
        return tuple(chans)  # type: ignore[return-value]


class ImageEncoder(nn.Module):
    """Features at strides 4, 8, 16, 32 from a ConvNeXt (transformers) or a small CNN."""

    def __init__(self, config: ProLearnConfig) -> None:
        super().__init__()
        self.kind = config.encoder
        if self.kind == "convnext":
            from transformers import ConvNextConfig, ConvNextModel

            self.net = ConvNextModel(ConvNextConfig(num_channels=config.in_channels,
                                                    hidden_sizes=list(config.convnext_hidden_sizes),
                                                    depths=list(config.convnext_depths)))
        else:
            self.net = CNNEncoder(config.in_channels, config.cnn_channels)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        if self.kind == "convnext":
            return list(self.net(image, output_hidden_states=True).hidden_states[1:])
        return self.net(image)[1:]


class GuideStage(nn.Module):
    """Upsample x2 and fuse the skip (conv), then every pixel attends to the guidance tokens."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, text_dim: int, heads: int) -> None:
        super().__init__()
        self.fuse = DecoderBlock(in_channels, skip_channels, out_channels)
        self.guide = CrossAttentionBlock(out_channels, heads, kv_dim=text_dim)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.fuse(x, skip)
        b, c, h, w = x.shape
        q, weights = self.guide(x.flatten(2).transpose(1, 2), tokens, mask, need_weights=need_weights)
        return q.transpose(1, 2).reshape(b, c, h, w), weights


@register("prolearn", ProLearnConfig)
class ProLearn(nn.Module):
    """``forward(image [B, C, H, W], text | None)`` -> ``{"logits": [B, 1, H, W], "losses": {}}``.

    With ``need_weights=True`` the output also has ``attention``: each guide stage's
    cross-attention weights ``[B, pixels, L]`` (averaged over heads), which PSA uses to score tokens.
    """

    def __init__(self, config: ProLearnConfig) -> None:
        super().__init__()
        self.config = config
        enc, dec = config.encoder_channels, config.decoder_channels
        text_dim, length = config.text.dim, config.text.max_length
        self.encoder = ImageEncoder(config)
        self.stage16 = GuideStage(enc[3], enc[2], dec[0], text_dim, config.heads)
        self.stage8 = GuideStage(dec[0], enc[1], dec[1], text_dim, config.heads)
        self.stage4 = GuideStage(dec[1], enc[0], dec[2], text_dim, config.heads)
        self.upsample = SubpixelUpsample(2, dec[2], config.head_channels, scale_factor=4)
        self.head = nn.Conv2d(config.head_channels, 1, 1)
        n = config.num_prototypes
        # The bank: filled from real samples by PSA initialisation (zeros until then), then trained.
        self.query_prototypes = nn.Parameter(torch.zeros(n, enc[3]))
        self.response_prototypes = nn.Parameter(torch.zeros(n, length, text_dim))
        self.register_buffer("response_mask", torch.zeros(n, length))
        self.register_buffer("prototype_cluster", torch.zeros(n, dtype=torch.long))  # surrogate label of each

    @property
    def requires_text(self) -> bool:
        return self.config.num_prototypes == 0

    @property
    def trains_without_text(self) -> bool:
        """After PSA initialisation, training reads no text (the train loop passes ``None``)."""
        return self.config.num_prototypes > 0

    def load_pretrained_backbone(self) -> None:
        """Load ``convnext_pretrained`` weights into the encoder (once, before training)."""
        path = self.config.convnext_pretrained
        if self.config.encoder != "convnext" or not path:
            return
        from transformers import ConvNextModel

        pretrained = ConvNextModel.from_pretrained(path, num_channels=self.config.in_channels,
                                                   ignore_mismatched_sizes=True)
        self.encoder.net.load_state_dict(pretrained.state_dict())

    def image_query(self, image: torch.Tensor) -> torch.Tensor:
        """The feature an image queries the bank with: its pooled stride-32 feature ``[B, C]``."""
        return self.encoder(image)[3].mean(dim=(2, 3))

    def query(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k prototypes of each image: (indices ``[B, k]``, softmax weights ``[B, k]``, summing to 1)."""
        if self.config.num_prototypes == 0:
            raise ValueError("this ProLearn model has no prototype bank (it is a token-relevance model): "
                             "give a prompt")
        sim = F.normalize(feature.float(), dim=-1) @ F.normalize(self.query_prototypes.float(), dim=-1).t()
        top, idx = sim.topk(self.config.top_k, dim=1)
        return idx, torch.softmax(top / self.config.query_temperature, dim=1)

    def respond(self, idx: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted sum of the linked response prototypes: tokens ``[B, L, D]`` and their mask ``[B, L]``."""
        tokens = (weights[..., None, None] * self.response_prototypes[idx].float()).sum(1)
        mask = self.response_mask[idx].amax(1)
        return tokens, mask

    def forward(self, image: torch.Tensor, text: TextFeatures | None = None, need_weights: bool = False) -> dict:
        check_divisible(image, 32, "ProLearn")
        f4, f8, f16, f32 = self.encoder(image)
        if text is not None:
            tokens, mask = text.tokens, text.mask
        else:
            tokens, mask = self.respond(*self.query(f32.mean(dim=(2, 3))))
        tokens = tokens.to(f32.dtype)
        x, w16 = self.stage16(f32, f16, tokens, mask, need_weights)
        x, w8 = self.stage8(x, f8, tokens, mask, need_weights)
        x, w4 = self.stage4(x, f4, tokens, mask, need_weights)
        logits = self.head(self.upsample(x))
        if logits.shape[-2:] != image.shape[-2:]:
            logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        out = {"logits": logits, "losses": {}}
        if need_weights:
            out["attention"] = [w16, w8, w4]
        return out
