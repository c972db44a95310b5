"""The configuration every model shares: input geometry, intensity normalisation, text encoder,
laterality convention. Each model's own config dataclass inherits from :class:`ModelConfig`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..text import TextEncoderConfig


@dataclass
class IntensityConfig:
    """How the engine (and the data readers) map raw voxel values to the model's [0, 1] input.

    Args:
        mode: ``percentile`` (clip to the [lower, upper] percentiles of the volume, then scale),
            ``window`` (CT window: ``center`` +- ``width``/2) or ``minmax`` (the array's own min and max).
        lower, upper: percentiles for ``percentile``.
        center, width: window for ``window``.
    """

    mode: str = "percentile"
    lower: float = 0.5
    upper: float = 99.5
    center: float = 40.0
    width: float = 400.0

    def __post_init__(self) -> None:
        if self.mode not in ("percentile", "window", "minmax"):
            raise ValueError(f"intensity mode must be percentile, window or minmax, got {self.mode!r}")
        if self.mode == "percentile" and not 0 <= self.lower < self.upper <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {self.lower}, {self.upper}")
        if self.mode == "window" and self.width <= 0:
            raise ValueError(f"window width must be > 0, got {self.width}")


@dataclass
class ModelConfig:
    """Fields shared by every model.

    Args:
        model_type: registry name (set by each subclass).
        image_size: square input size in pixels; the engine resizes slices to it and back.
        in_channels: image channels (1 = grey; RGB inputs are converted as the data reader says).
        intensity: normalisation to [0, 1].
        text: the text encoder the model was trained with.
        laterality: what 'left' means in the training text: ``image`` (left half of the image as
            stored, QaTa-COV19 measured) or ``patient`` (the patient's left).
        text_free: the model can run without a prompt (ProLearn).
    """

    model_type: str = ""
    image_size: int = 224
    in_channels: int = 1
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    laterality: str = "image"
    text_free: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.intensity, dict):
            self.intensity = IntensityConfig(**self.intensity)
        if isinstance(self.text, dict):
            self.text = TextEncoderConfig(**self.text)
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.laterality not in ("image", "patient"):
            raise ValueError(f"laterality must be 'image' or 'patient', got {self.laterality!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a dict, refusing keys this config does not know (typos fail loudly)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}; known: {sorted(known)}")
        return cls(**data)
