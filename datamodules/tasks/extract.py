"""Answer extractors: total functions from arbitrary text to a normalised answer or None. They never raise."""

from __future__ import annotations

import math
import re

_MARKER = "the answer is"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_LETTER = re.compile(r"\(([A-J])\)")


def answer_span(text: str) -> str | None:
    """Text after the last "the answer is" (case-insensitive), else after the last "=", else None."""
    low = text.lower()
    at = low.rfind(_MARKER)
    if at >= 0:
        return text[at + len(_MARKER) :]
    at = text.rfind("=")
    return text[at + 1 :] if at >= 0 else None


def extract_number(text: str) -> str | None:
    """IWSI's numeric reading: the answer span, commas stripped, its first number, as an integer when whole."""
    span = answer_span(text)
    if span is None:
        return None
    match = _NUMBER.search(span.replace(",", ""))
    if match is None:
        return None
    value = float(match.group())
    if not math.isfinite(value):
        return None
    return str(int(value)) if value == int(value) else match.group()


def same_number(a: str | None, b: str | None) -> bool:
    """int(float(a)) == int(float(b)), the paper's comparison; False for None or non-numbers."""
    try:
        return a is not None and b is not None and int(float(a)) == int(float(b))
    except (ValueError, OverflowError):
        return False


def extract_choice(text: str, n_options: int = 5) -> str | None:
    """The first letter "(x)" in the answer span, else the last one anywhere; only the first `n_options` letters."""

    def letters(source: str) -> list[str]:
        return [m for m in _LETTER.findall(source.upper()) if ord(m) - ord("A") < n_options]

    span = answer_span(text)
    in_span = letters(span) if span is not None else []
    if in_span:
        return in_span[0]
    anywhere = letters(text)
    return anywhere[-1] if anywhere else None


def extract_word(text: str, words: tuple[str, ...]) -> str | None:
    """Whichever of `words` (whole word, case-insensitive) comes first in the answer span; None when absent."""
    span = answer_span(text)
    if span is None:
        return None
    positions = []
    for word in words:
        match = re.search(rf"\b{re.escape(word)}\b", span, re.IGNORECASE)
        if match:
            positions.append((match.start(), word))
    return min(positions)[1] if positions else None
