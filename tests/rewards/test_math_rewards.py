"""Rewards: extraction, math-verify and exact-int checking, safety, per-sample timeout, registry."""

import os
import signal
import threading
import time

import pytest

from nat_megatron.rewards import (
    available_rewards,
    extract_answer,
    final_number,
    get_reward,
    last_boxed,
    math_verify_score,
    run_with_deadline,
    score_batch,
    to_fraction,
    to_int,
)

pytest.importorskip("math_verify")

HUGE = "$\\boxed{10^{10^{10}}}$"  # sympy would work on this for a very long time


def in_thread(fn, *args, **kwargs):
    out = []
    worker = threading.Thread(target=lambda: out.append(fn(*args, **kwargs)))
    worker.start()
    worker.join(timeout=10)
    assert out, "worker thread did not finish"
    return out[0]


# --- extraction ------------------------------------------------------------------------------


def test_extraction_helpers():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{3} then \\boxed{4") == "3"  # truncated box: fall back to the complete one
    assert last_boxed("no box") is None
    assert final_number("Tom has 7 + 5 = 12 apples.") == "12"
    assert final_number("It costs 1,234 dollars") == "1234"
    assert final_number("so it is \\frac{3}{4}") == "\\frac{3}{4}"
    assert extract_answer("2 + 2 = 4, so \\boxed{4}. Check: 5") == "4"
    assert to_fraction("0.5") == to_fraction("\\frac{1}{2}") == to_fraction("1/2")
    assert to_int("5.0") == 5 and to_int("$12$") == 12 and to_int("1/2") is None and to_int("x") is None
    assert to_fraction("9" * 500) is None  # length cap: no huge int conversion


# --- correctness -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("\\boxed{3}", "3"),
        ("The answer is 42.", "42"),
        ("So $x = \\frac{1}{2}$", "0.5"),
        ("The answer is 0.5", "\\frac{1}{2}"),
        ("half: 1/2", "\\frac{1}{2}"),
        ("Tom has 7 + 5 = 12 apples.\n#### 12\nThe answer is: 12", "12"),
        ("It is \\boxed{1{,}234}", "1234"),
        ("\\boxed{\\dfrac{3}{4}}", "0.75"),
        ("The answer is -3", "-3"),
        ("\\boxed{5}. Then I counted 6 more things.", "5"),  # a box wins over later numbers
    ],
)
def test_math_verify_accepts_equivalent_answers(completion, answer):
    score = get_reward("math_verify")(completion, answer)
    assert (score.reward, score.correct, score.status) == (1.0, True, "ok"), score


@pytest.mark.parametrize(
    "completion, answer, status",
    [
        ("\\boxed{4}", "3", "wrong"),
        ("The answer is 41.", "42", "wrong"),
        ("\\frac{1}{3}", "0.5", "wrong"),
        ("garbage !!", "3", "no_answer"),
        ("", "3", "no_answer"),
        ("\\boxed{\\boxed{\\boxed{", "1", "no_answer"),
    ],
)
def test_math_verify_rejects(completion, answer, status):
    score = get_reward("math_verify")(completion, answer)
    assert (score.reward, score.correct, score.status) == (0.0, False, status), score


def test_exact_int():
    fn = get_reward("exact_int")
    assert fn("so \\boxed{12}", "12").correct
    assert fn("The answer is 1,200.", "1200").correct
    assert fn("12.0", "12").correct
    assert not fn("\\boxed{13}", "12").correct
    assert fn("nothing", "12").status == "no_answer"
    with pytest.raises(ValueError, match="math_verify"):
        fn("1", "\\frac{1}{2}")


# --- safety ----------------------------------------------------------------------------------

ADVERSARIAL = [
    "__import__('os').system('echo hi')",
    "\\boxed{__import__('os').system('echo hi')}",
    "The answer is __import__('os').system('echo hi')",
    "The answer is exec('import os; os.system(\"echo hi\")')",
    "1+__import__('os').system('echo hi')",
]


@pytest.mark.parametrize("name", ["math_verify", "exact_int"])
def test_adversarial_text_is_never_executed(name, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("model output was executed")

    monkeypatch.setattr(os, "system", forbidden)
    monkeypatch.setattr(os, "popen", forbidden)
    for text in ADVERSARIAL:
        score = get_reward(name)(text, "0")
        assert score.reward == 0.0 and not score.correct, (text, score)


# --- timeout ---------------------------------------------------------------------------------


def test_timeout_in_main_thread():
    handler = signal.getsignal(signal.SIGALRM)
    start = time.perf_counter()
    score = math_verify_score(HUGE, "5", timeout_s=0.3)
    elapsed = time.perf_counter() - start
    assert score.status == "timeout" and score.reward == 0.0
    assert elapsed < 1.5, elapsed
    # The handler is restored and later calls work normally.
    assert signal.getsignal(signal.SIGALRM) is handler
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert get_reward("math_verify")("\\boxed{5}", "5").correct


def test_deadline_keeps_an_outer_alarm():
    signal.setitimer(signal.ITIMER_REAL, 30.0)
    old_handler = signal.getsignal(signal.SIGALRM)
    try:
        result, timed_out = run_with_deadline(lambda: 7, 1.0)
        assert (result, timed_out) == (7, False)
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < left <= 30.0
        assert signal.getsignal(signal.SIGALRM) is old_handler
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def test_off_main_thread_degrades_to_bounded_exact_check():
    fn = get_reward("math_verify")
    start = time.perf_counter()
    huge = in_thread(fn, HUGE, "5")
    assert time.perf_counter() - start < 1.0 and not huge.correct
    assert in_thread(fn, "\\boxed{3}", "3").correct
    assert in_thread(fn, "The answer is 0.5", "\\frac{1}{2}").correct
    assert not in_thread(fn, "\\boxed{4}", "3").correct
    assert in_thread(fn, "\\boxed{3}", "3").status == "fallback_ok"


def test_run_with_deadline_refuses_other_threads():
    errors = []

    def target():
        try:
            run_with_deadline(lambda: 1, 1.0)
        except RuntimeError as err:
            errors.append(err)

    worker = threading.Thread(target=target)
    worker.start()
    worker.join()
    assert errors and "main thread" in str(errors[0])


# --- registry --------------------------------------------------------------------------------


def test_registry_and_batch():
    assert {"math_verify", "exact_int"} <= set(available_rewards())
    with pytest.raises(ValueError, match="exact_int.*math_verify|math_verify.*exact_int"):
        get_reward("f1_score")
    scores = score_batch("math_verify", ["\\boxed{2}", "3", "junk"], ["2", "4", "1"])
    assert scores.rewards == [1.0, 0.0, 0.0] and scores.correct == [True, False, False]
    assert all(isinstance(r, float) for r in scores.rewards)
    assert scores.counts == {"ok": 1, "wrong": 1, "no_answer": 1}
    assert scores.accuracy == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="one answer per"):
        score_batch("exact_int", ["1"], [])
