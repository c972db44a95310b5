"""Model registry: configs name a model, ``build_model`` builds it; nothing else names classes."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn

from .config import ModelConfig

_MODELS: dict[str, tuple[type[nn.Module], type[ModelConfig]]] = {}


def register(name: str, config_class: type[ModelConfig]) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: ``@register("tmc", TMCConfig)``."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = (cls, config_class)
        cls.model_type = name
        return cls

    return wrap


def available_models() -> list[str]:
    return sorted(_MODELS)


def _lookup(name: str) -> tuple[type[nn.Module], type[ModelConfig]]:
    try:
        return _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(available_models())}") from None


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """The right config class for ``data['model_type']``, built from ``data``."""
    data = dict(data)
    if "model_type" not in data:
        raise KeyError("model config has no 'model_type'; registered models: " + ", ".join(available_models()))
    _, config_class = _lookup(data["model_type"])
    return config_class.from_dict(data)


def build_model(config: ModelConfig | dict[str, Any]) -> nn.Module:
    """Build a model with random weights from its config (or a config dict)."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    model_class, config_class = _lookup(config.model_type)
    if not isinstance(config, config_class):
        raise TypeError(f"model {config.model_type!r} needs a {config_class.__name__}, got {type(config).__name__}")
    return model_class(config)


def encode_prompts(model: nn.Module, encoder: Any, prompts: Sequence[str], plane: str = "coronal") -> Any:
    """The text input ``model`` reads for ``prompts``: what its ``forward(image, text)`` takes.

    Most models read :class:`TextFeatures` straight from the encoder; a model that needs more
    (SSA parses expressions and draws a guidance grid, which depends on the slice's ``plane``)
    defines ``encode_text(encoder, prompts, plane)``. Training, validation and the engine all
    come through here, so a model's text path is the same everywhere.
    """
    custom = getattr(model, "encode_text", None)
    if custom is not None:
        return custom(encoder, list(prompts), plane=plane)
    return encoder.encode(list(prompts))
