"""Reward functions for the scoring-worker tests; module level so the worker can import them."""

import os
import re

from nat_megatron.rewards.registry import Score


def backtracking(completion: str, answer: str) -> Score:
    """Catastrophic regex backtracking when the completion says so: C code that never looks at
    signals, so only killing the process can stop it."""
    if completion == "slow":
        re.match(r"(a+)+$", "a" * 64 + "b")
    return Score(1.0, True, completion, "ok") if completion == answer else Score(0.0, False, completion, "wrong")


def raising(completion: str, answer: str) -> Score:
    if completion == "bad":
        raise ZeroDivisionError("a reward bug")
    return Score(1.0, True, completion, "ok")


def crashing(completion: str, answer: str) -> Score:
    if completion == "crash":
        os._exit(3)  # as a segfault in native code would end the worker
    return Score(1.0, True, completion, "ok")


def worker_pid(completion: str, answer: str) -> Score:
    return Score(0.0, False, str(os.getpid()), "ok")
