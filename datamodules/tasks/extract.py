"""Answer extractors: total functions from arbitrary text to a normalised answer or None. They never raise.

Answers are read the way a human grader reads them (SPEC §10), and math answers (numbers, fractions, LaTeX) are
parsed and compared with math-verify, the library TRL, open-r1 and verl recipes use:
- where: the last `\\boxed{...}` when there is one; else the text after the last answer marker ("The answer is",
  "The final answer is", "Final Answer:", "Answer:", "#### "; case-insensitive), up to its sentence's end or line
  break outside `$...$`, so a number in a following sentence is never read; else, for a finished completion that
  computes ("="), what its last sentence with a number states: that sentence's last expression ("= 160 books.
  Therefore, Goran has a total of 160 books." -> 160; "2/2 = 1 bolt, which is 10 bolts total" -> 10). A completion
  that hit the token limit (`finished=False`) has an answer only where it states one (a box or a marker).
- what: in the span, the first `$...$` math (a lone or wordy "$" is a currency sign, not LaTeX), else bare LaTeX,
  else the first arithmetic expression, after the sentence's last "=" when it has one ("11 x 18 = 228 stickers"
  -> 228; "2 weeks * $24 = $56" -> 56; "36 ways to choose 7" -> 36). A comma
  is a thousands separator only before exactly three digits: "1,200" is 1200, "-2,1" and "2, 3, 5" are lists.
  A number with an attached "i", "π" or root ("2i", "6+9i", "18√17") is read as that expression, never as its
  first number. math-verify parses what was read; the answer is stored as a canonical string: an integer
  ("2000"), a fraction ("3/4"), a decimal ("84.3"), or for anything else the parsed LaTeX between "$" signs.
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

_MARKER = re.compile(r"the\s+(?:final\s+)?answer\s+is\b|final\s+answer\s*:|\banswer\s*:|####", re.IGNORECASE)
_LETTER = re.compile(r"\(([A-J])\)")
_INTEGER, _FRACTION, _DECIMAL = re.compile(r"-?\d+"), re.compile(r"-?\d+/\d+"), re.compile(r"-?\d*\.\d+")
_DASHES = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-", "\ufe63": "-", "\uff0d": "-", '"': None,
                         "\u201c": None, "\u201d": None})
_THOUSANDS = r",(?=\d{3}(?!\d))"  # "1,200": a separator; "1,5" and "-2,1" are lists
# an arithmetic expression: digits, operators (x and × as times), parentheses, decimals, thousands separators
_ARITHMETIC = re.compile(r"[-+]?[\d(](?:[\d\s./+\-*×÷x=^()%]|" + _THOUSANDS + r")*")
_LIST_TAIL = re.compile(r"\s*,\s*[-+]?\d")  # what follows a number that makes it the first of a list
_SYMBOLIC_TAIL = re.compile(r"(?:i|π|√|\\sqrt|sqrt)(?![a-zA-Z])")  # "2i", "6+9i", "3π", "18√17"
_EXPRESSION_RUN = re.compile(r"[-+]?[\w.()+\-*/^√π{}\\]+(?:\s*[-+*/^]\s*[\w.()√π{}\\]+)*")
_LIST_RUN = re.compile(r"[-+]?\d+(?:\.\d+)?(?:\s*,\s*[-+]?\d+(?:\.\d+)?)+")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")  # "12.5 cards" stays whole: a sentence end needs a space
_COMMAND = re.compile(r"\\text\{[^}]*\}|\\[a-zA-Z]+")
REL_TOL = 1e-6
Comparison = Literal["value", "truncate"]


def _after_marker(text: str) -> str | None:
    """Text after the last answer marker (case-insensitive), None without one."""
    markers = list(_MARKER.finditer(text))
    return text[markers[-1].end() :] if markers else None


def answer_span(text: str, finished: bool = True) -> str | None:
    """Text after the last answer marker, else (finished completions only) after the last "=", else None."""
    span = _after_marker(text)
    if span is not None:
        return span
    at = text.rfind("=") if finished else -1
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
    """Unicode dashes as "-", double quotes and escaped dollar signs (currency) dropped, "√x" and "π" as LaTeX,
    before math-verify reads the span."""
    span = span.translate(_DASHES).replace("\\$", "")
    return re.sub(r"√\s*(\d+(?:\.\d+)?|[a-zA-Z])", r"\\sqrt{\1}", span).replace("π", "\\pi ")


def _is_math(content: str) -> bool:
    """Whether the text between two "$" is math: not empty, no space just inside the signs, and no word of two
    letters outside LaTeX commands ("$5 per hour for 8 hours, so $" and "$24 = $" are currency signs)."""
    return (bool(content.strip()) and content == content.strip()
            and not re.search(r"[A-Za-z]{2,}", _COMMAND.sub("", content)))


def _drop_currency(text: str) -> str:
    """The text with its currency signs removed: a "$" that does not open `$math$` is currency."""
    out, i = [], 0
    while (at := text.find("$", i)) >= 0:
        close = text.find("$", at + 1)
        if close >= 0 and _is_math(text[at + 1 : close]):
            out.append(text[i : close + 1])
            i = close + 1
        else:
            out.append(text[i:at])
            i = at + 1
    return "".join(out) + text[i:]


def _sentence(span: str) -> str:
    """The span up to its first sentence end (". " or a final ".") or line break outside `$...$`."""
    inside = False
    for i, ch in enumerate(span):
        if ch == "$":
            inside = not inside
        elif not inside and (ch == "\n" or (ch == "." and (i + 1 == len(span) or span[i + 1].isspace()))):
            return span[:i]
    return span


def _answer_text(span: str) -> str | None:
    """What of an answer span math-verify reads (see the module docstring): its first `$math$`, else bare LaTeX,
    else its first arithmetic expression, widened to a list ("-2, 1") or an expression ("6+9i") where one
    follows."""
    span = _sentence(_drop_currency(_prepare(span)).lstrip(" \t\n:*"))
    math_ = re.search(r"\$([^$]+)\$", span)
    if math_:
        return f"${math_.group(1)}$"
    if "\\" in span:
        run = _EXPRESSION_RUN.search(span)
        return f"${run.group().rstrip('.,')}$" if run else None
    if "=" in span:  # "The answer is 2 weeks * 24 = 56": the value the sentence arrives at
        span = span[span.rindex("=") + 1 :] if span[span.rindex("=") + 1 :].strip() else span
    match = _ARITHMETIC.search(span)
    if not match:
        return None
    tail = span[match.end() :]
    if not tail.strip() and match.group().rstrip().endswith("="):  # "The answer is 800 + 800 =": cut off, no answer
        return None
    expression = match.group().rstrip(" +-*/=x×÷^%")
    if _LIST_TAIL.match(span, match.start() + len(expression)):
        listed = _LIST_RUN.match(span, match.start())
        if listed:
            return f"${listed.group()}$"
    if _SYMBOLIC_TAIL.match(tail):
        run = _EXPRESSION_RUN.match(span, match.start())
        return f"${run.group().rstrip('.,')}$"
    return expression


def _read(span: str) -> str | None:
    answer = _answer_text(span)
    return _canonical(_parse(answer)) if answer else None


@functools.lru_cache(maxsize=65536)
def extract_math(text: str, finished: bool = True) -> str | None:
    """The math answer of a completion as a canonical string (see the module docstring); None when absent."""
    boxed = last_boxed(text)
    if boxed is not None:
        return _canonical(_parse(f"${_prepare(boxed)}$", latex_only=True)) or _canonical(_parse(_prepare(boxed)))
    span = _after_marker(text)
    if span is not None:
        return _read(span)
    if not finished or "=" not in text:
        return None
    return _last_statement(text)


def _last_statement(text: str) -> str | None:
    """A finished completion without box or marker that computes ("="): the answer its last sentence with a number
    states, that sentence's last expression ("... = 160 books. Therefore, Goran has a total of 160 books." -> 160;
    "2/2 = 1 bolt of white fiber, which is 10 bolts total" -> 10)."""
    prepared = _drop_currency(_prepare(text))
    sentences = [s for s in _SENTENCE_SPLIT.split(prepared) if _ARITHMETIC.search(s)]
    if not sentences:
        return None
    last = sentences[-1]
    if "$" in last:
        segments = re.findall(r"\$[^$]+\$", last)
        return _read(segments[-1]) if segments else None
    *_, final = _ARITHMETIC.finditer(last)
    return _read(last[final.start() :])  # "so 8 + 1 =": a sum left open states nothing (`_answer_text`)


@functools.lru_cache(maxsize=65536)
def parse_gold(raw: str) -> str | None:
    """A gold answer ("2,000", "$18", "\\boxed{12}", "3/4", "\\frac{\\sqrt{2}}{2}", "-2,1") as the same canonical
    string that `extract_math` gives; None when it cannot be parsed."""
    text = _prepare(raw.strip())
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    plain = re.sub(_THOUSANDS, "", text).replace("$", "").strip()
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
def extract_choice(text: str, n_options: int = 5, finished: bool = True) -> str | None:
    """The first letter "(x)" in the answer span, else (finished completions) the last one anywhere; only the
    first `n_options` letters."""

    def letters(source: str) -> list[str]:
        return [m for m in _LETTER.findall(source.upper()) if ord(m) - ord("A") < n_options]

    span = answer_span(text, finished)
    in_span = letters(span) if span is not None else []
    if in_span:
        return in_span[0]
    anywhere = letters(text) if finished else []
    return anywhere[-1] if anywhere else None


def extract_word(text: str, words: tuple[str, ...], finished: bool = True) -> str | None:
    """Whichever of `words` (whole word, case-insensitive) comes first in the answer span; None when absent."""
    span = answer_span(text, finished)
    if span is None:
        return None
    positions = []
    for word in words:
        match = re.search(rf"\b{re.escape(word)}\b", span, re.IGNORECASE)
        if match:
            positions.append((match.start(), word))
    return min(positions)[1] if positions else None
