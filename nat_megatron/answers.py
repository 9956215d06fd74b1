"""Pure-Python answer extraction: last \\boxed{...}, last plain number, exact numeric values.

Shared by the rewards (the answer in a completion) and the dataset layouts (the final answer of
a reference solution, e.g. MATH's last \\boxed{}). Nothing here evaluates model text: numbers
are read by regular expressions and turned into `fractions.Fraction` from digit strings only.
Inputs are length-capped so a pathological completion cannot make a regex or a big-integer
conversion run long.
"""

from __future__ import annotations

import re
from fractions import Fraction

# Longest numeric literal we convert; longer strings are not plausible answers here, and
# int() on a huge digit string is quadratic.
MAX_NUMBER_CHARS = 40

MAX_BOXES_TRIED = 4

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A final answer written without a box: \frac{a}{b}, a/b, or a number with optional
# thousands separators, decimals and minus sign. Alternatives are tried in this order.
_NUMBER_RE = re.compile(
    r"-?\\d?frac\{-?\d+\}\{-?\d+\}"
    r"|(?<![\w./])-?\d+/\d+(?![\w./])"
    r"|(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w])"
)
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:(?:\{,\}|,)\d{3})+(?:\.\d+)?")
_DECIMAL_RE = re.compile(r"-?\d+(?:\.\d+)?|-?\.\d+")
_FRAC_RE = re.compile(r"(-?)\\d?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(-?\d+)\s*\}")
_SLASH_RE = re.compile(r"(-?\d+)\s*/\s*(-?\d+)")
# Decorations that do not change a numeric answer.
_STRIP_RE = re.compile(r"\\[,!;: ]|\\text\{[^{}]*\}|\\mathrm\{[^{}]*\}|\\%|%|\$|\\\(|\\\)|\\left|\\right")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced; None if absent."""
    matches = list(_BOXED_RE.finditer(text))
    # Only the last few: each unclosed box scans to the end, so all of them would be quadratic.
    for match in reversed(matches[-MAX_BOXES_TRIED:]):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            char = text[pos]
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return text[start:pos].strip()
        # Unclosed brace (truncated generation): try an earlier, complete box.
    return None


def final_number(text: str) -> str | None:
    """The last plain number or simple fraction in `text` ("1,234" -> "1234", "-3", "0.5", "1/2")."""
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def extract_answer(text: str) -> str | None:
    """The model's final answer: the last boxed expression, else the last plain number."""
    boxed = last_boxed(text)
    return boxed if boxed else final_number(text)


def to_fraction(answer: str) -> Fraction | None:
    """Exact value of a simple numeric answer (int, decimal, a/b, \\frac{a}{b}); None otherwise."""
    text = _STRIP_RE.sub("", answer).replace(" ", "").strip().rstrip(".")
    if _THOUSANDS_RE.fullmatch(text):  # "1,234" or LaTeX "1{,}234"
        text = text.replace("{,}", "").replace(",", "")
    if not text or len(text) > MAX_NUMBER_CHARS:
        return None
    if _DECIMAL_RE.fullmatch(text):
        return Fraction(text)
    for regex, sign_group in ((_FRAC_RE, True), (_SLASH_RE, False)):
        match = regex.fullmatch(text)
        if match:
            sign, num, den = match.groups() if sign_group else ("", *match.groups())
            if int(den) == 0:
                return None
            value = Fraction(int(num), int(den))
            return -value if sign else value
    return None


def to_int(answer: str) -> int | None:
    """Integer value of `answer` ("42", "1,234", "5.0", "\\$12"); None when not an integer."""
    value = to_fraction(answer)
    if value is None or value.denominator != 1:
        return None
    return int(value)
