"""Text encoders: one interface (:class:`TextEncoder` -> :class:`TextFeatures`) for every backend."""

from .encoder import (PACKAGED_DEFAULT, TextEncoder, TextEncoderConfig, TextEncoderError, TextFeatures,
                      clean_prompt, resolve_text_model_path)
from .laterality import swap_left_right

__all__ = ["PACKAGED_DEFAULT", "TextEncoder", "TextEncoderConfig", "TextEncoderError", "TextFeatures",
           "clean_prompt", "resolve_text_model_path", "swap_left_right"]
