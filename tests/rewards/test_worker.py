"""score_batch with reward.timeout: a persistent worker process, killed at the deadline."""

from __future__ import annotations

import threading
import time

import pytest

from nat_megatron.rewards import score_batch
from nat_megatron.rewards.worker import worker
from tests.rewards import slow_rewards


def test_timeout_stops_c_level_work_and_the_next_samples_score():
    start = time.monotonic()
    scores = score_batch(slow_rewards.backtracking, ["1", "slow", "2", "3"], ["1", "1", "2", "9"], timeout=1.0)
    elapsed = time.monotonic() - start
    assert scores.rewards == [1.0, 0.0, 1.0, 0.0]
    assert scores.counts == {"ok": 2, "timeout": 1, "wrong": 1}
    assert scores.correct == [True, False, True, False]
    # the regex alone would run for hours; start-up (spawn + import) is excluded from deadlines
    assert elapsed < 60, elapsed


def test_a_raising_or_crashing_reward_scores_zero_with_a_reason():
    scores = score_batch(slow_rewards.raising, ["ok", "bad", "ok"], ["", "", ""], timeout=5.0)
    assert scores.rewards == [1.0, 0.0, 1.0] and scores.counts == {"ok": 2, "error": 1}
    scores = score_batch(slow_rewards.crashing, ["ok", "crash", "ok"], ["", "", ""], timeout=5.0)
    assert scores.rewards == [1.0, 0.0, 1.0] and scores.counts == {"ok": 2, "error": 1}
    # in-process scoring (no timeout) gives the same reasons for a raising reward
    scores = score_batch(slow_rewards.raising, ["bad", "ok"], ["", ""])
    assert scores.counts == {"error": 1, "ok": 1}


def test_worker_persists_and_is_replaced_only_after_a_kill():
    pids = score_batch(slow_rewards.worker_pid, ["a", "b"], ["", ""], timeout=5.0).extracted
    again = score_batch(slow_rewards.worker_pid, ["c"], [""], timeout=5.0).extracted
    assert len(set(pids + again)) == 1
    restarts = worker(5.0).restarts
    score_batch(slow_rewards.backtracking, ["slow"], ["x"], timeout=5.0)
    after = score_batch(slow_rewards.worker_pid, ["d"], [""], timeout=5.0).extracted
    assert after != pids[:1] and worker(5.0).restarts == restarts + 1


def test_math_verify_in_the_worker_matches_in_process_and_works_off_the_main_thread():
    completions = ["\\boxed{2}", "3", "junk", "so the answer is \\frac{1}{2}"]
    answers = ["2", "4", "1", "0.5"]
    here = score_batch("math_verify", completions, answers)
    out = []
    t = threading.Thread(target=lambda: out.append(score_batch("math_verify", completions, answers, timeout=5.0)))
    t.start()
    t.join(timeout=120)
    assert out, "scoring from a thread did not finish"
    assert out[0].rewards == here.rewards == [1.0, 0.0, 0.0, 1.0]
    assert out[0].counts == here.counts == {"ok": 2, "wrong": 1, "no_answer": 1}


def test_bad_timeout_and_unpicklable_reward_are_named():
    with pytest.raises(ValueError, match="^reward.timeout: must be > 0"):
        score_batch("exact_int", ["1"], ["1"], timeout=0)
    with pytest.raises(ValueError, match="cannot be sent to the scoring worker"):
        score_batch(lambda c, a: None, ["1"], ["1"], timeout=5.0)


def test_worker_outlives_the_jobs_stop_signals():
    """SLURM signals every process of a job; the rank finishes its step (scoring included)
    before it stops, so the worker ignores SIGUSR1/SIGTERM and keeps its pid."""
    import os
    import signal

    pid = score_batch(slow_rewards.worker_pid, ["a"], [""], timeout=5.0).extracted[0]
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        os.kill(int(pid), sig)
    time.sleep(0.5)
    scores = score_batch(slow_rewards.worker_pid, ["b"], [""], timeout=5.0)
    assert scores.extracted == [pid] and scores.counts == {"ok": 1}
