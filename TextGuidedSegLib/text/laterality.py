"""Left/right words in prompts.

A horizontal flip of an image (augmentation) or a change between the patient's and the image's
sides (the engine) must swap the words, or "left lung" points at the wrong half.
"""

from __future__ import annotations

import re

_PAIRS = {"left": "right", "right": "left"}
_WORD = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """Swap 'left' and 'right' (whole words, case kept): 'lower left lung' -> 'lower right lung'."""

    def repl(m: re.Match[str]) -> str:
        word = m.group(0)
        new = _PAIRS[word.lower()]
        if word.isupper():
            return new.upper()
        if word[0].isupper():
            return new.capitalize()
        return new

    return _WORD.sub(repl, text)
