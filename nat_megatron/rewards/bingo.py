"""Bingo: the significance-aware length reward of nat.md §5, added to the correctness reward.

A scorer (significance.py) splits each response's tokens into significant and insignificant
(keep-prob < threshold). Against the reference model's response(s) to the same prompt:

    R_low  = n_insig / n_insig_ref        R_high = n_sig / n_sig_ref
    correct: bonus = lambda_c * cos(clamp(R_low, 0, pi/2))
    wrong:   bonus = min(0, lambda_wn * (cos(clamp(R_low, 0, pi/2)) - 1)
                            + lambda_we' * R_high - lambda_we)

A correct answer earns up to lambda_c, less the more filler it carries (none at R_low >=
pi/2). A wrong answer is never rewarded (min with 0); its penalty grows with filler and,
once lambda_we' < 0, with long significant reasoning too.

Zero reference counts (our choice; nat.md leaves it open): a ratio divides by
max(n_ref, 1), so with n_ref = 0 the ratio is the policy's count itself. The reference
then "has no filler", a policy response without filler keeps R_low = 0 (full bonus), and
every insignificant token costs as if the reference had one: R_low >= 2 > pi/2 already
removes the whole correct bonus. The same rule keeps R_high finite.

lambda_we' (`DynamicLambda`): static = a fixed value; dynamic = the rescaled slope of the
training accuracy, then a decay to -2 * lambda_we / (pi/2) (see the class docstring).

Reference counts per prompt (`ReferenceLengths`) are measured once from the reference
model's responses and saved as JSON so a resumed run reuses them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from nat_megatron.rewards.significance import SCORERS

SCHEDULES = ("static", "dynamic")
_KEY = "reward.bingo"


def _fail(field: str, msg: str):
    raise ValueError(f"{_KEY}.{field}: {msg}")


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        _fail(field, msg)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class BingoConfig:
    """`reward.bingo`: the length reward's switch, scorer and coefficients (nat.md §5).

    slope_scale: lambda_we' in the slope phase is the least-squares slope of the training
    accuracy in percentage points per step (accuracy 0.40 -> 0.45 over one step is 5.0),
    times slope_scale. slope_threshold is compared with that rescaled slope.
    The scorer path is checked for existence only when enabled, so a config that switches
    Bingo off stays valid on a machine without the model.
    """

    enabled: bool = False
    scorer: str = "reference_proxy"
    scorer_path: str | None = None
    lambda_c: float = 5.0
    lambda_wn: float = 2.0
    lambda_we: float = 5.0
    schedule: str = "dynamic"
    lambda_we_prime: float = 0.0  # the static schedule's lambda_we'
    start_step: int = 50
    window: int = 10
    slope_threshold: float = 2.5
    decay: float = 0.5
    slope_scale: float = 1.0
    threshold: float = 0.5  # keep-prob below this = insignificant token

    def __post_init__(self):
        _check(self.scorer in SCORERS, "scorer", f"unknown scorer {self.scorer!r}; use one of {list(SCORERS)}")
        if self.scorer == "hf_token_classifier":
            _check(
                bool(self.scorer_path),
                "scorer_path",
                "scorer 'hf_token_classifier' needs the directory of a local "
                "token-classification model (LLMLingua-2 style); set reward.bingo.scorer_path "
                "or use scorer 'reference_proxy'",
            )
            _check(
                not self.enabled or Path(self.scorer_path).is_dir(),
                "scorer_path",
                f"{self.scorer_path!r} is not a directory; put a local copy of the "
                "token-classification model (config.json, weights, tokenizer) there",
            )
        else:
            _check(
                self.scorer_path is None,
                "scorer_path",
                f"applies to scorer 'hf_token_classifier' only; set it to null for scorer {self.scorer!r}",
            )
        _check(
            self.schedule in SCHEDULES, "schedule", f"unknown schedule {self.schedule!r}; use one of {list(SCHEDULES)}"
        )
        for name in ("lambda_c", "lambda_wn", "lambda_we"):
            value = getattr(self, name)
            _check(_finite(value) and value >= 0, name, f"must be >= 0, got {value}")
        _check(_finite(self.lambda_we_prime), "lambda_we_prime", f"must be a finite number, got {self.lambda_we_prime}")
        _check(
            self.schedule == "static" or self.lambda_we_prime == 0,
            "lambda_we_prime",
            "is the static schedule's value; the dynamic schedule computes its own, so "
            "leave it at 0 or set reward.bingo.schedule: static",
        )
        _check(
            isinstance(self.start_step, int) and self.start_step >= 0,
            "start_step",
            f"must be an integer >= 0, got {self.start_step}",
        )
        _check(
            isinstance(self.window, int) and self.window >= 2,
            "window",
            f"must be an integer >= 2 (a slope needs two points), got {self.window}",
        )
        _check(_finite(self.slope_threshold), "slope_threshold", f"must be a finite number, got {self.slope_threshold}")
        _check(
            _finite(self.decay) and self.decay > 0,
            "decay",
            f"must be > 0 (lambda_we' falls by it each step), got {self.decay}",
        )
        _check(
            _finite(self.slope_scale) and self.slope_scale > 0, "slope_scale", f"must be > 0, got {self.slope_scale}"
        )
        _check(
            _finite(self.threshold) and 0 < self.threshold <= 1, "threshold", f"must be in (0, 1], got {self.threshold}"
        )


def _ratio(n: Tensor, n_ref: Tensor) -> Tensor:
    # Zero-reference rule (module docstring): divide by max(n_ref, 1).
    return n.float() / n_ref.float().clamp(min=1.0)


def bingo_bonus(
    correct: Tensor,
    n_sig: Tensor,
    n_insig: Tensor,
    n_sig_ref: Tensor,
    n_insig_ref: Tensor,
    *,
    lambda_c: float,
    lambda_wn: float,
    lambda_we: float,
    lambda_we_prime: float,
) -> Tensor:
    """Per-response length bonus, FloatTensor[B], to add to the correctness reward.

    `correct` is BoolTensor[B]; counts are tensors of shape [B] (reference counts may be
    means, hence float). See the module docstring for the formula and the n_ref = 0 rule.
    """
    correct = torch.as_tensor(correct, dtype=torch.bool)
    n_sig, n_insig, n_sig_ref, n_insig_ref = (torch.as_tensor(x) for x in (n_sig, n_insig, n_sig_ref, n_insig_ref))
    shapes = {tuple(x.shape) for x in (correct, n_sig, n_insig, n_sig_ref, n_insig_ref)}
    if len(shapes) != 1:
        raise ValueError(
            f"bingo_bonus: correct and the four counts must share one shape [B], got shapes {sorted(shapes)}"
        )
    r_low = _ratio(n_insig, n_insig_ref)
    r_high = _ratio(n_sig, n_sig_ref)
    cos_low = torch.cos(r_low.clamp(0.0, math.pi / 2))
    right = lambda_c * cos_low
    wrong = (lambda_wn * (cos_low - 1) + lambda_we_prime * r_high - lambda_we).clamp(max=0.0)
    return torch.where(correct, right, wrong)


class DynamicLambda:
    """lambda_we' per training step: `update(step, accuracy)` once per step, in step order.

    schedule "static": always lambda_we_prime.
    schedule "dynamic" (our reading of nat.md §5), with acc in percentage points (100 *
    the step's training accuracy, a fraction in [0, 1]):
    1. Every update records (step, acc); the last `window` points are kept.
    2. Warm-up: lambda_we' = 0 while step < start_step or fewer than `window` points are
       recorded (the early learning curve is too noisy for a slope; only the static
       penalties act).
    3. Slope phase: lambda_we' = s = slope_scale * least-squares slope of acc against step
       over the last `window` points (real step numbers, so a skipped step does not bend it).
       Improving fast (s > slope_threshold): long significant reasoning in wrong answers is
       rewarded (capped at 0 by the min in bingo_bonus).
    4. The first step t* in the slope phase with s <= slope_threshold starts the decay:
       lambda_we'(t*) = v* = max(s, floor), and for t > t*
           lambda_we'(t) = max(floor, v* - decay * (t - t*)),   floor = -2 lambda_we / (pi/2).
       The decay never returns to the slope phase. Steps, not calls, are counted, so a
       resumed or skipping run lands on the same value.
    State (`state_dict`) holds plain Python types only, for checkpoints.
    """

    def __init__(
        self,
        *,
        lambda_we: float = 5.0,
        schedule: str = "dynamic",
        lambda_we_prime: float = 0.0,
        start_step: int = 50,
        window: int = 10,
        slope_threshold: float = 2.5,
        decay: float = 0.5,
        slope_scale: float = 1.0,
    ):
        if schedule not in SCHEDULES:
            _fail("schedule", f"unknown schedule {schedule!r}; use one of {list(SCHEDULES)}")
        if window < 2:
            _fail("window", f"must be >= 2 (a slope needs two points), got {window}")
        self.schedule, self.lambda_we_prime = schedule, float(lambda_we_prime)
        self.start_step, self.window = start_step, window
        self.slope_threshold, self.decay, self.slope_scale = slope_threshold, decay, slope_scale
        self.floor = -2.0 * lambda_we / (math.pi / 2)
        self._history: deque[tuple[int, float]] = deque(maxlen=window)
        self._last_step: int | None = None
        self._trigger: tuple[int, float] | None = None  # (t*, v*) once the decay has started
        self.value = self.lambda_we_prime if schedule == "static" else 0.0

    @classmethod
    def from_config(cls, cfg: BingoConfig) -> DynamicLambda:
        return cls(
            lambda_we=cfg.lambda_we,
            schedule=cfg.schedule,
            lambda_we_prime=cfg.lambda_we_prime,
            start_step=cfg.start_step,
            window=cfg.window,
            slope_threshold=cfg.slope_threshold,
            decay=cfg.decay,
            slope_scale=cfg.slope_scale,
        )

    @property
    def decaying(self) -> bool:
        """Whether the decay phase has started (never ends once started)."""
        return self._trigger is not None

    def slope(self) -> float:
        """Rescaled least-squares slope of the recorded points (0.0 with fewer than 2)."""
        if len(self._history) < 2:
            return 0.0
        xs = [float(s) for s, _ in self._history]
        ys = [a for _, a in self._history]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
        return self.slope_scale * sxy / sxx

    def update(self, step: int, accuracy: float) -> float:
        """Record this step's training accuracy (fraction in [0, 1]); lambda_we' for the step."""
        if self.schedule == "static":
            return self.lambda_we_prime
        if not (isinstance(accuracy, (int, float)) and 0 <= accuracy <= 1):
            raise ValueError(f"accuracy must be a fraction in [0, 1], got {accuracy!r}")
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(
                f"step {step} is not after the last recorded step "
                f"{self._last_step}; call update once per step, in order"
            )
        self._last_step = step
        self._history.append((int(step), 100.0 * float(accuracy)))
        if self._trigger is not None:
            t0, v0 = self._trigger
            self.value = max(self.floor, v0 - self.decay * (step - t0))
        elif step < self.start_step or len(self._history) < self.window:
            self.value = 0.0
        else:
            s = self.slope()
            if s <= self.slope_threshold:
                self._trigger = (int(step), max(s, self.floor))
                self.value = self._trigger[1]
            else:
                self.value = s
        return self.value

    def state_dict(self) -> dict:
        return {
            "schedule": self.schedule,
            "history": [[s, a] for s, a in self._history],
            "last_step": self._last_step,
            "trigger": None if self._trigger is None else list(self._trigger),
            "value": self.value,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("schedule") != self.schedule:
            raise ValueError(
                f"checkpoint's Bingo schedule is {state.get('schedule')!r} but "
                f"reward.bingo.schedule is {self.schedule!r}; resume with the same "
                "schedule"
            )
        self._history = deque(((int(s), float(a)) for s, a in state["history"]), maxlen=self.window)
        self._last_step = state["last_step"]
        trig = state["trigger"]
        self._trigger = None if trig is None else (int(trig[0]), float(trig[1]))
        self.value = float(state["value"])


class ReferenceLengths:
    """prompt key (int) -> mean (n_sig_ref, n_insig_ref) over the reference model's responses.

    Sums and counts are stored, so `add` may be called once per reference response; `get`
    returns the means. `save` writes JSON atomically (temp file + os.replace): a crash never
    leaves a half-written file for the resumed run.
    """

    VERSION = 1

    def __init__(self):
        self._data: dict[int, list[float]] = {}  # key -> [sum_sig, sum_insig, n_responses]

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: int) -> bool:
        return int(key) in self._data

    def add(self, key: int, n_sig, n_insig) -> None:
        n_sig, n_insig = float(n_sig), float(n_insig)
        if n_sig < 0 or n_insig < 0:
            raise ValueError(f"prompt {key}: counts must be >= 0, got ({n_sig}, {n_insig})")
        entry = self._data.setdefault(int(key), [0.0, 0.0, 0])
        entry[0] += n_sig
        entry[1] += n_insig
        entry[2] += 1

    def missing(self, keys: Iterable[int]) -> list[int]:
        """Keys without a reference measurement, first-seen order, without repeats."""
        return list(dict.fromkeys(int(k) for k in keys if int(k) not in self._data))

    def get(self, keys: Sequence[int]) -> tuple[Tensor, Tensor]:
        """(n_sig_ref, n_insig_ref), FloatTensor[len(keys)] each (means over responses)."""
        lost = self.missing(keys)
        if lost:
            raise KeyError(
                f"no reference lengths for prompt keys {lost[:10]}; measure the "
                "reference model's responses first (add) or load the saved file"
            )
        rows = [self._data[int(k)] for k in keys]
        return (
            torch.tensor([r[0] / r[2] for r in rows], dtype=torch.float32),
            torch.tensor([r[1] / r[2] for r in rows], dtype=torch.float32),
        )

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"version": self.VERSION, "prompts": {str(k): v for k, v in sorted(self._data.items())}}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | Path) -> ReferenceLengths:
        try:
            payload = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(
                f"cannot read reference lengths from {path}: {e}; delete it to measure them again"
            ) from None
        if not isinstance(payload, dict) or payload.get("version") != cls.VERSION:
            raise ValueError(
                f"{path}: not a version-{cls.VERSION} reference-lengths file; delete it to measure them again"
            )
        out = cls()
        for k, (s, i, n) in payload["prompts"].items():
            out._data[int(k)] = [float(s), float(i), int(n)]
        return out
