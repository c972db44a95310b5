"""Models: one file per model, a config dataclass each, built through the registry."""

from .config import IntensityConfig, ModelConfig
from .registry import available_models, build_model, config_from_dict, encode_prompts, register
from . import prolearn, ssa, svp_cvae, tgcnet, tmc  # noqa: F401  (register every model)

__all__ = ["IntensityConfig", "ModelConfig", "available_models", "build_model", "config_from_dict", "encode_prompts",
           "register"]
