"""Answer extractors: total functions from arbitrary text to a normalised answer or None. They never raise.

Math answers (numbers, fractions, LaTeX) are read and compared with math-verify, the library TRL, open-r1 and
verl recipes use:
- where: the last `\\boxed{...}` when there is one, else the text after the last "the answer is"
  (case-insensitive), else after the last "="; that span ends at the first sentence end or line break, so a
  number in a following sentence is never read as the answer. Without LaTeX in it, the span's first arithmetic
  expression is read ("11 x 18 = 228 stickers" -> 228; "36 ways to choose 7" -> 36). No marker: no answer.
- what: math-verify parses the span (LaTeX or a plain expression: thousands separators, currency, units, "3/4",
  "\\frac{3}{4}", a Unicode minus read as "-"). The answer is stored as a canonical string: an integer ("2000"),
  a fraction ("3/4"), a decimal ("84.3"), or for anything else the parsed LaTeX between "$" signs.
- comparison (`same_math`): numbers by value, exact for integers and fractions, relative tolerance 1e-6 when a
  decimal is involved; anything else by math-verify's symbolic `verify`. Option `comparison="truncate"`: the
  IWSI paper's `int(float(a)) == int(float(b))` (84.3 counts as 84.7).
Gold answers go through `parse_gold`, the same parsing without the need for a marker.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
from fractions import Fraction
from typing import Literal

log = logging.getLogger(__name__)

_MARKER = "the answer is"
_LETTER = re.compile(r"\(([A-J])\)")
_SENTENCE_END = re.compile(r"\.(?=\s|$)|\n")
_INTEGER, _FRACTION, _DECIMAL = re.compile(r"-?\d+"), re.compile(r"-?\d+/\d+"), re.compile(r"-?\d*\.\d+")
_DASHES = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-", "\ufe63": "-", "\uff0d": "-", '"': None,
                         "\u201c": None, "\u201d": None})
# an arithmetic expression: digits, operators (x and × as times), parentheses, decimals, thousands separators
_ARITHMETIC = re.compile(r"[-+]?[\d(](?:[\d\s./+\-*×÷x=^()%]|,(?=\d))*")
REL_TOL = 1e-6
Comparison = Literal["value", "truncate"]


def answer_span(text: str) -> str | None:
    """Text after the last "the answer is" (case-insensitive), else after the last "=", else None."""
    low = text.lower()
    at = low.rfind(_MARKER)
    if at >= 0:
        return text[at + len(_MARKER) :]
    at = text.rfind("=")
    return text[at + 1 :] if at >= 0 else None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None when there is none or it
    is not closed."""
    at = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if at < 0:
        return None
    start = text.index("{", at) + 1
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


# ---------------------------------------------------------------------------------------------- math answers
def _parse(text: str, latex_only: bool = False) -> list:
    """math-verify's `parse`, never raising; its signal-based timeout only works in the main thread."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    configs = [LatexExtractionConfig()] if latex_only else [LatexExtractionConfig(), ExprExtractionConfig()]
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        return parse(text, extraction_config=configs, parsing_timeout=timeout)
    except Exception:  # noqa: BLE001 - a parser failure means "no answer", never a crash
        log.debug("math-verify could not parse %r", text, exc_info=True)
        return []


def _canonical(parsed: list) -> str | None:
    """A canonical string for math-verify's parse result: integer, fraction, decimal, or `$latex$`."""
    if not parsed:
        return None
    value, matched = parsed[0], parsed[-1]
    try:
        import sympy

        if isinstance(value, sympy.Basic) and value.is_number and value.is_rational:
            exact = Fraction(int(sympy.numer(value)), int(sympy.denom(value)))
            return str(exact.numerator) if exact.denominator == 1 else f"{exact.numerator}/{exact.denominator}"
        if isinstance(value, sympy.Float):
            number = float(value)
            if not math.isfinite(number):
                return None
            return str(int(number)) if number == int(number) else repr(number)
        if isinstance(value, sympy.Basic):
            return f"${matched}$" if isinstance(matched, str) and matched.strip() else f"${sympy.latex(value)}$"
    except (TypeError, ValueError, OverflowError, AttributeError, ZeroDivisionError):  # 0/0 is no answer
        return None
    return f"${value.strip()}$" if isinstance(value, str) and value.strip() else None


def _prepare(span: str) -> str:
    """Unicode dashes as "-", double quotes and escaped dollar signs (currency) dropped, before math-verify reads
    the span."""
    return span.translate(_DASHES).replace("\\$", "")


def _answer_text(span: str) -> str | None:
    """What of an answer span math-verify reads: up to the sentence's end; without LaTeX, its first arithmetic
    expression (math-verify alone would take the last number of "36 ways to choose 7")."""
    span = _prepare(span).lstrip(" :")
    end = _SENTENCE_END.search(span)
    span = span[: end.start()] if end else span
    if "$" in span or "\\" in span:
        return span if span.strip() else None
    match = _ARITHMETIC.search(span)
    return match.group().rstrip(" +-*/=x×÷^") if match else None


@functools.lru_cache(maxsize=65536)
def extract_math(text: str) -> str | None:
    """The math answer of a completion as a canonical string (see the module docstring); None when absent."""
    boxed = last_boxed(text)
    if boxed is not None:
        return _canonical(_parse(f"${_prepare(boxed)}$", latex_only=True)) or _canonical(_parse(_prepare(boxed)))
    span = answer_span(text)
    answer = None if span is None else _answer_text(span)
    return _canonical(_parse(answer)) if answer else None


@functools.lru_cache(maxsize=65536)
def parse_gold(raw: str) -> str | None:
    """A gold answer ("2,000", "$18", "\\boxed{12}", "3/4", "\\frac{\\sqrt{2}}{2}") as the same canonical string
    that `extract_math` gives; None when it cannot be parsed."""
    text = _prepare(raw.strip())
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    plain = text.replace(",", "").replace("$", "").strip()
    if is_number(plain):  # "2000", "3/4", "84.30": no LaTeX to read
        return _canonical(_parse(plain))
    return _canonical(_parse(f"${text}$", latex_only=True)) or _canonical(_parse(text))


def _number(answer: str) -> Fraction | None:
    """The value of a canonical numeric answer ("12", "-3/4", "84.3"), else None."""
    if _INTEGER.fullmatch(answer) or _FRACTION.fullmatch(answer) or _DECIMAL.fullmatch(answer):
        try:
            return Fraction(answer)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def is_number(answer: str) -> bool:
    """Whether a canonical answer is a plain number (integer, fraction or decimal)."""
    return _number(answer) is not None


@functools.lru_cache(maxsize=65536)
def _symbolic(answer: str) -> list:
    return _parse(answer, latex_only=answer.startswith("$"))


def same_math(a: str | None, b: str | None, comparison: Comparison = "value") -> bool:
    """Whether two canonical math answers are equivalent (see the module docstring); False when either is None."""
    if a is None or b is None:
        return False
    x, y = _number(a), _number(b)
    if comparison == "truncate":
        return x is not None and y is not None and int(x) == int(y)
    if a == b:
        return True
    if x is not None and y is not None:
        if "." in a or "." in b:
            return math.isclose(x, y, rel_tol=REL_TOL)
        return x == y
    from math_verify import verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        return bool(verify(_symbolic(a), _symbolic(b), timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - an undecidable comparison is "not equal"
        return False


# ---------------------------------------------------------------------------------------------- other answers
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
