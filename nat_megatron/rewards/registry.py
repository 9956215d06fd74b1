"""Reward functions by name: what a config's `reward: math_verify` resolves to.

A reward function takes one completion and its reference answer and returns a `Score`.
It must never raise on model text (garbage scores 0) and never execute or eval it; one that
raises anyway scores 0 with status 'error'. To run in the scoring worker (score_batch with a
timeout) it must be picklable: a module-level function whose module registers it on import.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Score:
    """Outcome for one sample. `status` says why, for logging: ok, wrong, no_answer, timeout."""

    reward: float
    correct: bool
    extracted: str | None = None
    status: str = "ok"


RewardFn = Callable[[str, str], Score]
AnswerCheck = Callable[[str], "str | None"]  # reference answer -> None, or why the reward cannot use it

_REGISTRY: dict[str, RewardFn] = {}
_ANSWER_CHECKS: dict[str, AnswerCheck] = {}


def register_reward(name: str, *, answer_check: AnswerCheck | None = None) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering a reward function under `name` (names are unique). answer_check:
    for rewards that need a form of reference answer (exact_int: an integer), so that the
    dataset loader skips and counts unusable rows instead of failing at scoring time."""

    def decorate(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        _REGISTRY[name] = fn
        if answer_check is not None:
            _ANSWER_CHECKS[name] = answer_check
        return fn

    return decorate


def answer_check_of(name: str) -> AnswerCheck | None:
    """The reference-answer check of reward `name`, or None when any string answer will do."""
    return _ANSWER_CHECKS.get(name)


def available_rewards() -> list[str]:
    """Names accepted by `get_reward`, sorted."""
    return sorted(_REGISTRY)


def get_reward(name: str) -> RewardFn:
    """The reward function registered as `name`; ValueError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; set the reward name to one of {available_rewards()}") from None


@dataclass
class Scores:
    """Scores of a batch, in sample order, plus how many samples ended in each status."""

    rewards: list[float]
    correct: list[bool]
    extracted: list[str | None]
    counts: Counter = field(default_factory=Counter)
    statuses: list[str] = field(default_factory=list)  # per sample, like `rewards`

    @property
    def accuracy(self) -> float:
        """Fraction of samples judged correct (0.0 for an empty batch)."""
        return sum(self.correct) / len(self.correct) if self.correct else 0.0


def _guarded(fn: RewardFn, completion: str, answer: str) -> Score:
    """fn's Score, or 0 with status 'error' when it raises: one bad sample never stops a step."""
    try:
        return fn(completion, answer)
    except Exception:  # noqa: BLE001
        return Score(0.0, False, None, "error")


def score_batch(
    reward: str | RewardFn, completions: Sequence[str], answers: Sequence[str], *, timeout: float | None = None
) -> Scores:
    """Score `completions[i]` against `answers[i]` with the reward named (or given) by `reward`.

    timeout (reward.timeout): each sample is scored in this process's scoring worker
    (rewards/worker.py), which is killed when a sample runs past `timeout` seconds, C code
    included (status 'timeout'). None scores here, under the reward's own limits only. Either
    way a reward that raises scores 0 with status 'error'; `counts` has every status.
    """
    if len(completions) != len(answers):
        raise ValueError(
            f"got {len(completions)} completions but {len(answers)} answers; pass one answer per "
            "completion (repeat a prompt's answer for each of its samples)"
        )
    fn = get_reward(reward) if isinstance(reward, str) else reward
    if timeout is None:
        scores = [_guarded(fn, completion, answer) for completion, answer in zip(completions, answers)]
    else:
        from nat_megatron.rewards.worker import score_in_worker

        scores = score_in_worker(fn, completions, answers, timeout=timeout)
    return Scores(
        rewards=[s.reward for s in scores],
        correct=[s.correct for s in scores],
        extracted=[s.extracted for s in scores],
        counts=Counter(s.status for s in scores),
        statuses=[s.status for s in scores],
    )
