"""Models: one file per model, a config dataclass each, built through the registry."""

from .config import IntensityConfig, ModelConfig
from .registry import available_models, build_model, config_from_dict, register
from . import tmc  # noqa: F401  (registers "tmc")

__all__ = ["IntensityConfig", "ModelConfig", "available_models", "build_model", "config_from_dict", "register"]
