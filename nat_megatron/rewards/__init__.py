"""Rewards for verifiable answers: extraction, checking, and a registry looked up by name.

from nat_megatron.rewards import get_reward, score_batch
scores = score_batch("math_verify", completions, answers)  # .rewards, .correct, .counts
"""

from nat_megatron.answers import extract_answer, final_number, last_boxed, to_fraction, to_int
from nat_megatron.rewards import verifiers as _verifiers  # noqa: F401  (registers the rewards)
from nat_megatron.rewards.deadline import DeadlineExceeded, run_with_deadline, signals_usable
from nat_megatron.rewards.registry import (
    RewardFn,
    Score,
    Scores,
    answer_check_of,
    available_rewards,
    get_reward,
    register_reward,
    score_batch,
)
from nat_megatron.rewards.verifiers import exact_int_reward, math_verify_reward, math_verify_score

__all__ = [
    "DeadlineExceeded",
    "RewardFn",
    "Score",
    "Scores",
    "answer_check_of",
    "available_rewards",
    "exact_int_reward",
    "extract_answer",
    "final_number",
    "get_reward",
    "last_boxed",
    "math_verify_reward",
    "math_verify_score",
    "register_reward",
    "run_with_deadline",
    "score_batch",
    "signals_usable",
    "to_fraction",
    "to_int",
]
