"""Which response tokens enter the NAT loss, and with what inclusion probability.

`sample` draws a `Selection` for a batch of responses: a keep-mask, the exact probability
pi_it that each position is kept (the loss reweights kept tokens by 1/pi_it, see loss.py),
and the kept prefix length per response (what a truncated forward pass needs).

Schemes (budget b = expected kept fraction):
- "none":    keep everything, pi = 1.
- "urs":     keep each token independently with probability b, pi = b. With
             urs_fixed_count=True keep exactly k_i = ceil(b * T_i) tokens without replacement,
             pi = k_i / T_i (expected fraction sum k_i / sum T_i, slightly above b).
- "rpc":     keep a random prefix t <= C_i, pi_t = P(C_i >= t); see `rpc_inclusion_prob`.
- "rpc+urs": URS at rate r = urs_budget inside an RPC prefix of budget b / r; pi multiplies.

RPC family (our choice; nat.md leaves it open). The cut is drawn directly on {0..T}:
- b <= (T+1)/(2T): C = 0 with probability 1 - 2bT/(T+1), else C ~ Uniform{1..T}:
      pi_t = 2b (T - t + 1) / (T + 1)
- b >  (T+1)/(2T): C = T with probability w = (2bT - T - 1)/(T - 1), else C ~ Uniform{1..T}:
      pi_t = w + (1 - w) (T - t + 1) / T
In both branches sum_t pi_t = E[C] = b*T exactly, for every T >= 1 and every b in (0, 1],
and b = 1 gives pi = 1. At b = (T+1)/(2T) (about 0.5) both are the plain uniform cut, the
example of nat.md. The largest weight, 1/pi_T, is (T+1)/(2b) in the low branch (nat.md's
ceil(T*U^k) family: about T(1-b)/b, larger for b < 1/2) and at most 1/w in the high branch.
C = 0 (the response contributes nothing this step, so its forward can be skipped) departs from
nat.md's C in {1..T}, on purpose: with C >= 1, pi_1 = 1 forces E[C] >= 1, so a response with
b*T <= 1 can never hit the budget, and one with b*T just above 1 needs pi_t -> 0 for t >= 2
(unbounded weights). The cut is drawn by inversion, C = #{t : u < pi_t} with one uniform u,
so P(C >= t) = pi_t holds for the discrete C by construction.
Defensive floor (rpc_floor = lam): with probability lam keep the whole response, otherwise
draw from the family above at the re-tuned budget (b - lam)/(1 - lam), so the expected kept
fraction stays exactly b and every weight is at most 1/lam. lam > b cannot be reached.

An empty response (T = 0) gets cut 0 and keeps nothing: it never reaches the model, and it
adds 0 tokens (or, in the seq-mean aggregations, 1 response) to the loss normaliser.

Determinism across ranks: pass `selection_generators(seed, step, sample_ids)` (one generator
per response); each response then draws only from its own generator, so every rank holding a
sample gets the same mask whatever the batch order or padding. A single generator draws the
whole batch at once (fast, but the result depends on the batch's composition).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

SCHEMES = ("none", "urs", "rpc", "rpc+urs")
_OPTIONS = {
    "none": frozenset(),
    "urs": frozenset({"urs_fixed_count"}),
    "rpc": frozenset({"rpc_floor"}),
    "rpc+urs": frozenset({"urs_budget", "rpc_floor"}),
}


@dataclass(frozen=True)
class Selection:
    """One step's selection. All tensors share the batch order of `lengths`.

    mask:    bool [B, T_max], kept positions (False beyond each length).
    prob:    float64 [B, T_max], exact inclusion probability; 0 beyond each length, > 0 inside.
    cut:     long [B], kept prefix length (no kept position lies at or beyond it).
    lengths: long [B], full response lengths.
    """

    mask: torch.Tensor
    prob: torch.Tensor
    cut: torch.Tensor
    lengths: torch.Tensor

    @property
    def weights(self) -> torch.Tensor:
        """Horvitz-Thompson weights 1/prob on kept positions, 0 elsewhere."""
        return torch.where(self.mask, self.prob.reciprocal(), torch.zeros_like(self.prob))

    @property
    def kept_tokens(self) -> int:
        """Number of kept positions."""
        return int(self.mask.sum())

    @property
    def total_tokens(self) -> int:
        """Number of response positions before selection (sum of lengths)."""
        return int(self.lengths.sum())

    @property
    def kept_fraction(self) -> float:
        """Kept tokens / total tokens."""
        return self.kept_tokens / self.total_tokens

    @property
    def weight_max(self) -> float:
        """Largest 1/prob over kept positions (0.0 when nothing is kept)."""
        return float(self.weights.max()) if self.kept_tokens else 0.0

    @property
    def weight_mean(self) -> float:
        """Mean of 1/prob over kept positions (0.0 when nothing is kept)."""
        kept = self.kept_tokens
        return float(self.weights.sum()) / kept if kept else 0.0

    def telemetry(self) -> dict[str, float]:
        """Per-step numbers to log: kept fraction and the spread of the weights."""
        return {
            "kept_fraction": self.kept_fraction,
            "weight_max": self.weight_max,
            "weight_mean": self.weight_mean,
        }


def selection_generators(seed: int, step: int, sample_ids: Iterable[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by a stable hash of (seed, step, sample id).

    blake2b rather than Python's hash(): it is the same in every process and every run.
    """
    gens = []
    for sid in sample_ids:
        digest = hashlib.blake2b(f"{int(seed)}:{int(step)}:{int(sid)}".encode(), digest_size=8)
        gen = torch.Generator()
        gen.manual_seed(int.from_bytes(digest.digest(), "little") >> 1)  # 63 bits: always valid
        gens.append(gen)
    return gens


def rpc_inclusion_prob(lengths: torch.Tensor, budget: float, *, floor: float = 0.0) -> torch.Tensor:
    """Closed-form pi_t = P(C >= t) of the RPC family (module docstring), float64 [B, T_max].

    Zero beyond each length; sum over t equals budget * T_i exactly (up to rounding).
    """
    lengths = _check_lengths(lengths)
    budget = _check_fraction("budget", budget)
    if not 0.0 <= floor < 1.0 or floor > budget:
        raise ValueError(f"rpc_floor={floor} must lie in [0, min(budget={budget}, 1))")
    T = lengths.to(torch.float64)[:, None]
    t = torch.arange(1, int(lengths.max()) + 1, dtype=torch.float64, device=lengths.device)[None]
    valid = t <= T
    if budget == 1.0:  # exactly 1, not 1 - rounding, so "rpc at budget 1" equals "none"
        return valid.to(torch.float64)
    base = (budget - floor) / (1.0 - floor)  # re-tuned so floor + (1 - floor) * base = budget
    uniform_tail = (T - t + 1) / T  # P(C >= t) for C ~ Uniform{1..T}
    low = 2.0 * base * (T - t + 1) / (T + 1)
    w_full = (2.0 * base * T - T - 1) / (T - 1).clamp(min=1.0)  # T = 1 always takes `low`
    high = w_full + (1.0 - w_full) * uniform_tail
    pi = torch.where(base <= (T + 1) / (2.0 * T), low, high)
    pi = floor + (1.0 - floor) * pi
    return torch.where(valid, pi, torch.zeros_like(pi))


def sample(
    scheme: str, budget: float, lengths: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator], **options
) -> Selection:
    """Draw a selection for responses of the given lengths (see the module docstring).

    generator: one torch.Generator for the whole batch, or one per response (on the device of
    `lengths`). Options: urs_fixed_count (urs), rpc_floor (rpc, rpc+urs), urs_budget (rpc+urs,
    default sqrt(budget), must be >= budget).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} is unknown; use one of {SCHEMES}")
    lengths = _check_lengths(lengths)
    budget = _check_fraction("budget", budget)
    unknown = set(options) - _OPTIONS[scheme]
    if unknown:
        raise ValueError(
            f"options {sorted(unknown)} do not apply to scheme {scheme!r}; "
            f"allowed: {sorted(_OPTIONS[scheme]) or 'none'}"
        )
    T_max = int(lengths.max())
    valid = torch.arange(T_max, device=lengths.device)[None] < lengths[:, None]
    if scheme == "none":
        if budget != 1.0:
            raise ValueError(f"scheme 'none' keeps every token; set budget=1.0 (got {budget})")
        return Selection(valid, valid.to(torch.float64), lengths.clone(), lengths)

    urs_rate, rpc_budget = budget, 1.0
    if scheme == "rpc":
        urs_rate, rpc_budget = 1.0, budget
    elif scheme == "rpc+urs":
        urs_rate = _check_fraction("urs_budget", options.get("urs_budget", math.sqrt(budget)))
        if urs_rate < budget:
            raise ValueError(
                f"urs_budget={urs_rate} is below budget={budget}: the RPC part "
                "would need a budget above 1; use urs_budget in [budget, 1]"
            )
        rpc_budget = min(1.0, budget / urs_rate)
    floor = options.get("rpc_floor", 0.0)
    if isinstance(floor, bool) or not isinstance(floor, numbers.Real) or not 0.0 <= floor < 1.0:
        raise ValueError(f"rpc_floor={floor!r} must be a number in [0, 1)")
    if floor > rpc_budget:
        raise ValueError(
            f"rpc_floor={floor} exceeds the RPC budget {rpc_budget}: keeping whole "
            "responses that often already overshoots it; lower rpc_floor"
        )
    fixed = options.get("urs_fixed_count", False)
    if not isinstance(fixed, bool):
        raise ValueError(f"urs_fixed_count={fixed!r} must be True or False")

    need_cut = scheme != "urs"
    u_cut, u_tok = _uniforms(generator, lengths, T_max, need_cut=need_cut, need_tok=scheme != "rpc")
    mask, prob, cut = valid, valid.to(torch.float64), lengths.clone()
    if need_cut:
        prob = rpc_inclusion_prob(lengths, rpc_budget, floor=float(floor))
        mask = u_cut[:, None] < prob  # a prefix, since prob is non-increasing in t
        cut = mask.sum(-1)
    if fixed:
        # k_i smallest of T_i iid keys = a uniform k_i-subset. The 1e-9 keeps ceil(0.3 * 10)
        # at 3 despite 0.3 * 10 = 3.0000000000000004 in floating point.
        k = torch.ceil(budget * lengths.to(torch.float64) - 1e-9).clamp(min=1).long()
        keys = torch.where(valid, u_tok, torch.full_like(u_tok, 2.0))
        rank = keys.argsort(-1).argsort(-1)
        mask = rank < k[:, None]
        prob = torch.where(valid, (k / lengths.to(torch.float64))[:, None], prob.new_zeros(()))
    elif urs_rate < 1.0:
        mask = mask & (u_tok < urs_rate)
        prob = prob * urs_rate
    return Selection(mask & valid, prob, cut, lengths)


def _uniforms(generator, lengths: torch.Tensor, T_max: int, *, need_cut: bool, need_tok: bool):
    """Uniform[0, 1) draws: one per response for the cut, one per position for URS (float64)."""
    B, device, f64 = lengths.numel(), lengths.device, torch.float64
    if isinstance(generator, torch.Generator):
        u_cut = torch.rand(B, dtype=f64, device=device, generator=generator) if need_cut else None
        u_tok = torch.rand(B, T_max, dtype=f64, device=device, generator=generator) if need_tok else None
        return u_cut, u_tok
    if (
        not isinstance(generator, Sequence)
        or len(generator) != B
        or not all(isinstance(g, torch.Generator) for g in generator)
    ):
        raise ValueError(
            f"generator must be a torch.Generator or a sequence of {B} of them "
            "(one per response, e.g. from selection_generators)"
        )
    u_cut = torch.empty(B, dtype=f64, device=device)
    u_tok = torch.ones(B, T_max, dtype=f64, device=device)  # padding: 1.0 is never < a rate
    for i, (gen, n) in enumerate(zip(generator, lengths.tolist())):
        # Each response reads only its own stream, in a fixed order: cut first, then tokens.
        if need_cut:
            u_cut[i] = torch.rand(1, dtype=f64, device=device, generator=gen)[0]
        if need_tok:
            u_tok[i, :n] = torch.rand(n, dtype=f64, device=device, generator=gen)
    return (u_cut if need_cut else None), (u_tok if need_tok else None)


def _check_lengths(lengths) -> torch.Tensor:
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.numel() == 0:
        raise ValueError(
            "lengths must be a non-empty 1-D tensor of response lengths, "
            f"got {type(lengths).__name__} of shape {getattr(lengths, 'shape', None)}"
        )
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must have an integer dtype (e.g. torch.long), got {lengths.dtype}")
    if int(lengths.min()) < 0:
        raise ValueError(f"lengths must all be >= 0, got min {int(lengths.min())}")
    return lengths.long()


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name}={value!r} must be a number in (0, 1] (the expected kept fraction)")
    return float(value)
