"""Field layouts of prompt/answer rows, and turning one raw row into an `Example`.

Layouts (pick by name, or "auto" to detect from the first rows):

- gsm8k:   {"question": str, "answer": str}  -- the final answer follows "#### " in `answer`
           (GSM8K's worked solution); thousands separators are removed ("1,200" -> "1200").
- math:    {"problem": str, "solution": str, "answer"?: str}  -- the final answer is the
           `answer` field when present (MATH-500 style), else the last \\boxed{...} of `solution`.
- generic: {"prompt": str, "answer": str}  -- `answer` is already the final answer, as a
           string: "42", "\\frac{1}{2}". JSON numbers are rejected (as non_string_answer)
           because float formatting is ambiguous (1e3, 0.30000000000000004): quote them.

Every layout also reads an optional "id" (str or int) used in the example's uid.
A row that cannot be used yields a reason string instead of an Example; callers count them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nat_megatron.answers import last_boxed

_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


@dataclass(frozen=True)
class Example:
    """One problem. `prompt`/`prompt_ids` are empty until chat templating fills them."""

    uid: str
    question: str
    answer: str
    prompt: str = ""
    prompt_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Layout:
    """Which fields hold the problem and the answer, and how to get the final answer."""

    name: str
    prompt_field: str
    answer_field: str
    final_answer: Callable[[dict], str | None]


def _gsm8k_final(row: dict) -> str | None:
    text = row["answer"]
    if "####" not in text:
        return None
    final = text.rsplit("####", 1)[1].strip()
    return final.replace(",", "") if _THOUSANDS_RE.fullmatch(final) else final


def _math_final(row: dict) -> str | None:
    given = row.get("answer")
    if isinstance(given, str) and given.strip():
        return given.strip()
    return last_boxed(row["solution"])


def _generic_final(row: dict) -> str | None:
    return row["answer"].strip()


LAYOUTS: dict[str, Layout] = {
    "gsm8k": Layout("gsm8k", "question", "answer", _gsm8k_final),
    "math": Layout("math", "problem", "solution", _math_final),
    "generic": Layout("generic", "prompt", "answer", _generic_final),
}


def get_layout(name: str) -> Layout:
    """The layout called `name`; ValueError listing the known ones otherwise."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown data layout {name!r}; set layout to 'auto' or one of {sorted(LAYOUTS)}") from None


def detect_layout(rows: list[Any], source: str) -> Layout:
    """The first layout whose two fields are both present in the first object row that has any."""
    for row in rows:
        if not isinstance(row, dict):
            continue
        for layout in LAYOUTS.values():
            if layout.prompt_field in row and layout.answer_field in row:
                return layout
    expected = "; ".join(f"{lay.name}: {lay.prompt_field!r}+{lay.answer_field!r}" for lay in LAYOUTS.values())
    raise ValueError(
        f"cannot detect the field layout of {source} from its first {len(rows)} rows; rows need "
        f"one of these field pairs ({expected}), or set layout explicitly"
    )


def parse_row(row: Any, layout: Layout, uid: str) -> Example | str:
    """An Example from one raw row, or the reason it was skipped (e.g. 'missing_answer')."""
    if not isinstance(row, dict):
        return "not_an_object"
    for name in (layout.prompt_field, layout.answer_field):
        if name not in row or row[name] is None:
            return f"missing_{name}"
    question = row[layout.prompt_field]
    if not isinstance(question, str):
        return "non_string_prompt"
    if not question.strip():
        return "empty_prompt"
    if not isinstance(row[layout.answer_field], str):
        return "non_string_answer"
    answer = layout.final_answer(row)
    if not answer:
        return "no_final_answer"
    row_id = row.get("id")
    if isinstance(row_id, (str, int)) and not isinstance(row_id, bool):
        uid = f"{uid.rsplit(':', 1)[0]}:{row_id}"
    return Example(uid=uid, question=question.strip(), answer=answer)
