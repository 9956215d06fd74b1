"""The registered reward functions: `math_verify` (symbolic, via the math-verify library) and
`exact_int` (pure Python, integer answers only). Both give 1.0 for a correct answer, else 0.0.

Safety: model text only meets regular expressions, math-verify's LaTeX grammar (ANTLR) and,
for plain arithmetic such as "1/2", sympy's `parse_expr` on strings math-verify's regex has
already limited to digits, whitespace, "." and + - * / ^ ( ) x ÷: no names, so nothing
callable can be reached. Each sample gets a wall-clock deadline (SIGALRM) in the main
thread; elsewhere signals are unavailable and we use the bounded pure-Python comparison. The
trainer scores through score_batch(..., timeout=reward.timeout), i.e. in the scoring worker
(worker.py), whose process is killed at the deadline: the hard limit that SIGALRM is not.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from nat_megatron.answers import extract_answer, last_boxed, to_fraction, to_int
from nat_megatron.rewards.deadline import run_with_deadline, signals_usable
from nat_megatron.rewards.registry import Score, register_reward

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 2.0
# The registered math_verify reward's deadline; the scoring worker (worker.py) sets it from
# reward.timeout, a little below its own hard kill.
DEADLINE_S = DEFAULT_TIMEOUT_S
# Only the tail of a completion can hold its final answer; capping bounds regex time too
# (Python's `re` does not check for signals, so a deadline cannot stop a long match).
MAX_COMPLETION_CHARS = 4000

_warned_thread_fallback = False


@lru_cache(maxsize=1)
def _math_verify():
    """Import math-verify once (0.6 s) and switch off its own signal timeouts (we wrap them)."""
    try:
        import math_verify
        import math_verify.grader
        import math_verify.parser
    except ImportError as err:
        raise ImportError("the math_verify reward needs `pip install math-verify==0.9.0`") from err
    # Its alarm() calls would cancel our ITIMER_REAL, so we pass timeout=None; these flags
    # only silence the one-time warning that we then must provide a timeout (we do).
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    configs = [math_verify.LatexExtractionConfig(boxed_match_priority=0), math_verify.ExprExtractionConfig()]
    return math_verify, configs


@lru_cache(maxsize=4096)
def _parse_gold(answer: str):
    # Wrapped in \boxed{} so LaTeX answers ("\frac{1}{2}") and plain ones ("5") both parse.
    # Each prompt's answer is parsed once per group of samples thanks to the cache.
    mv, configs = _math_verify()
    return tuple(mv.parse("\\boxed{" + answer + "}", configs, parsing_timeout=None))


def _verify(completion: str, answer: str) -> Score:
    mv, configs = _math_verify()
    gold = _parse_gold(answer)
    if not gold:
        return Score(0.0, False, None, "bad_gold")
    pred = mv.parse(completion, configs, parsing_timeout=None)
    if not pred:
        return Score(0.0, False, None, "no_answer")
    extracted = pred[-1] if isinstance(pred[-1], str) else str(pred[0])
    correct = bool(mv.verify(list(gold), pred, timeout_seconds=None))
    return Score(float(correct), correct, extracted, "ok" if correct else "wrong")


def _fallback(completion: str, answer: str) -> Score:
    """Exact numeric (else literal boxed-string) comparison: bounded time, no sympy."""
    extracted = extract_answer(completion)
    if extracted is None:
        return Score(0.0, False, None, "no_answer")
    gold, pred = to_fraction(answer), to_fraction(extracted)
    if gold is not None:
        correct = pred == gold
    else:
        boxed = last_boxed(completion)
        correct = boxed is not None and boxed.replace(" ", "") == answer.replace(" ", "")
    return Score(float(correct), correct, extracted, "fallback_ok" if correct else "fallback_wrong")


def math_verify_score(completion: str, answer: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Score:
    """Score one completion with math-verify under a per-sample deadline of `timeout_s` seconds."""
    global _warned_thread_fallback
    if not isinstance(answer, str):
        raise ValueError(f"reference answer must be a string, got {type(answer).__name__}: {answer!r}")
    if not isinstance(completion, str) or not completion.strip():
        return Score(0.0, False, None, "no_answer")
    completion = completion[-MAX_COMPLETION_CHARS:]
    if not signals_usable():
        if not _warned_thread_fallback:
            logger.warning(
                "math_verify reward off the main thread: no signal deadline possible, "
                "using the exact numeric comparison instead"
            )
            _warned_thread_fallback = True
        return _fallback(completion, answer)
    _math_verify()  # import outside the deadline: the first import alone takes ~0.6 s
    score, timed_out = run_with_deadline(lambda: _verify(completion, answer), timeout_s)
    return Score(0.0, False, None, "timeout") if timed_out else score


@register_reward("math_verify")
def math_verify_reward(completion: str, answer: str) -> Score:
    """math-verify equivalence of the last boxed answer (else last number) with `answer`."""
    return math_verify_score(completion, answer, timeout_s=DEADLINE_S)


def _integer_answer(answer: str) -> str | None:
    return None if to_int(answer) is not None else "answer_not_int"


@register_reward("exact_int", answer_check=_integer_answer)
def exact_int_reward(completion: str, answer: str) -> Score:
    """Integer equality of the last boxed answer (else last number) with an integer `answer`."""
    gold = to_int(answer) if isinstance(answer, str) else None
    if gold is None:
        raise ValueError(
            f"reward 'exact_int' needs integer reference answers, got {answer!r}; "
            "use reward 'math_verify' for this dataset"
        )
    if not isinstance(completion, str):
        return Score(0.0, False, None, "no_answer")
    extracted = extract_answer(completion[-MAX_COMPLETION_CHARS:])
    if extracted is None:
        return Score(0.0, False, None, "no_answer")
    correct = to_int(extracted) == gold
    return Score(float(correct), correct, extracted, "ok" if correct else "wrong")
