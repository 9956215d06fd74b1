"""What one RL training step feeds the model: sequence lengths after NAT selection.

A sequence is a prompt of P = seq_len - response_len tokens followed by a response of
R = response_len tokens (every response at the generation limit: the memory worst case).
NAT (nat/selection.py, nat.md §2) changes what the trainer runs:
- RPC keeps a random prefix of C response tokens; forward and backward run on P + C tokens
  only. The cut distribution is the exact one of `rpc_inclusion_prob`: P(C >= t) = pi_t,
  so E[C] = budget * R.
- URS keeps each token with probability r; the forward still needs all P + C tokens, but the
  output layer and the loss need only the kept positions (logits_on="selected").
- rpc+urs: RPC at budget b / r inside which URS keeps rate r = sqrt(b) (selection.py's default).

How a step becomes micro-batches (train/batching.py, which the estimate runs on a typical
batch: the n cut quantiles of one DP rank's n sequences): sorted by truncated length, padded to
the layout's multiple, cut into m = n / mbs groups of about equal padded size b * s_pad. The
largest group sets the peak (with one sequence per micro-batch that is an un-cut sequence:
RPC then saves time, not peak memory). Interleaved pipelines give every micro-batch the same
rows and the step's longest length (forward_backward.py pads). nat_peak="full" sizes memory
for mbs un-cut sequences anyway.
logits_on="selected" (default): the final norm, output layer and loss run on the kept
response positions only (forward_backward(output_mask="kept"), model/output.py);
logits_on="all": on every position of the micro-batch (no output_mask).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from nat_megatron.nat.selection import SCHEMES
from nat_megatron.tune import constants as C

LOGITS_ON = ("selected", "all")
NAT_PEAK = ("expected", "full")


@dataclass(frozen=True)
class Workload:
    """Lengths, batch and NAT selection of one training step."""

    seq_len: int
    response_len: int
    global_batch: int = 256  # sequences per optimizer step (prompts x group size)
    nat: str = "none"
    budget: float = 1.0
    logits_on: str = "selected"
    nat_peak: str = "expected"

    def __post_init__(self):
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if not 1 <= self.response_len <= self.seq_len:
            raise ValueError(f"response_len must lie in [1, seq_len={self.seq_len}], got {self.response_len}")
        if self.global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {self.global_batch}")
        if self.nat not in SCHEMES:
            raise ValueError(f"NAT scheme {self.nat!r} is unknown; use one of {SCHEMES}")
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"NAT budget must lie in (0, 1], got {self.budget}")
        if self.nat == "none" and self.budget != 1.0:
            raise ValueError(f"NAT scheme 'none' keeps every token: its budget is 1, got {self.budget}")
        if self.logits_on not in LOGITS_ON:
            raise ValueError(f"logits_on must be one of {LOGITS_ON}, got {self.logits_on!r}")
        if self.nat_peak not in NAT_PEAK:
            raise ValueError(f"nat_peak must be one of {NAT_PEAK}, got {self.nat_peak!r}")

    @staticmethod
    def parse_nat(text: str) -> tuple[str, float]:
        """'rpc:0.5' -> ("rpc", 0.5); 'none' -> ("none", 1.0)."""
        scheme, _, budget = text.partition(":")
        scheme = scheme.strip().lower()
        if scheme not in SCHEMES:
            raise ValueError(
                f"NAT scheme {scheme!r} is unknown; use SCHEME:BUDGET with SCHEME in {SCHEMES}, e.g. rpc:0.5"
            )
        try:
            value = float(budget) if budget else 1.0
        except ValueError:
            raise ValueError(f"NAT budget {budget!r} is not a number; use e.g. rpc:0.5") from None
        return scheme, value

    @property
    def prompt_len(self) -> int:
        """P = seq_len - response_len."""
        return self.seq_len - self.response_len

    @property
    def rates(self) -> tuple[float, float]:
        """(RPC budget, URS keep rate) of the scheme."""
        b = self.budget
        if self.nat == "rpc":
            return b, 1.0
        if self.nat == "urs":
            return 1.0, b
        if self.nat == "rpc+urs":
            r = math.sqrt(b)
            return min(1.0, b / r), r
        return 1.0, 1.0

    @functools.cached_property
    def cut_pmf(self) -> tuple[float, ...]:
        """P(C = c) for c = 0..R, from selection.py's closed-form inclusion probabilities."""
        R, rpc = self.response_len, self.rates[0]
        if rpc >= 1.0:
            return (0.0,) * R + (1.0,)
        import torch

        from nat_megatron.nat.selection import rpc_inclusion_prob

        pi = [1.0] + rpc_inclusion_prob(torch.tensor([R]), rpc)[0].tolist() + [0.0]
        return tuple(max(0.0, pi[c] - pi[c + 1]) for c in range(R + 1))

    def _expect(self, fn) -> float:
        return sum(p * fn(c) for c, p in enumerate(self.cut_pmf) if p > 0)

    @functools.cached_property
    def mean_cut(self) -> float:
        """E[C], kept response prefix (= budget * R for RPC)."""
        return self._expect(float)

    @property
    def mean_len(self) -> float:
        """Expected tokens a sequence is trained on (forward and backward)."""
        return self.prompt_len + self.mean_cut

    @functools.cached_property
    def mean_sq_len(self) -> float:
        """E[(P + C)^2], for causal attention's quadratic cost."""
        return self._expect(lambda c: float(self.prompt_len + c) ** 2)

    def cut_quantiles(self, n: int) -> list[int]:
        """n representative cuts: the (i + 1/2)/n quantiles of C (a typical batch of n)."""
        out, acc, c, pmf = [], 0.0, 0, self.cut_pmf
        for i in range(n):
            q = (i + 0.5) / n
            while c < len(pmf) - 1 and acc + pmf[c] < q:
                acc += pmf[c]
                c += 1
            out.append(c)
        return out

    def batch_shape(
        self, *, sequences: int, micro_batches: int, seq_multiple: int = 1, pad_to_step: bool = False
    ) -> BatchShape:
        """Micro-batch sizes of one DP rank's step (see the module docstring)."""
        return _batch_shape(self, sequences, micro_batches, seq_multiple, pad_to_step)

    @property
    def step_tokens(self) -> int:
        """Tokens of the step before selection (prompt + full response per sequence)."""
        return self.global_batch * self.seq_len


@dataclass(frozen=True)
class BatchShape:
    """One DP rank's micro-batches, in tokens (padding included) and logit positions."""

    peak_tokens: float  # rows x padded length of the largest micro-batch
    peak_positions: float  # logit positions of the micro-batch with the most
    peak_seq: float  # padded length of the largest micro-batch
    mean_tokens: float  # averages over the step's micro-batches
    mean_attention: float  # sum over rows of padded length^2 (causal attention's cost)
    mean_positions: float


@functools.lru_cache(maxsize=4096)
def _batch_shape(work: Workload, n: int, m: int, multiple: int, pad_to_step: bool) -> BatchShape:
    pad = lambda s: -(-s // multiple) * multiple  # noqa: E731
    urs = work.rates[1]
    if work.rates[0] >= 1.0:  # no RPC: every row is a full sequence
        rows, s = n / m, pad(work.seq_len)
        pos = rows * (s if work.logits_on == "all" else urs * work.response_len)
        return BatchShape(rows * s, pos, s, rows * s, rows * s * s, pos)
    from nat_megatron.train.batching import plan_micro_batches

    # A representative step of at most REP_MICRO_BATCHES micro-batches (planning a large
    # one costs seconds): evenly spaced among the n cut quantiles, keeping the longest.
    mbs = n / m
    m_rep = min(m, C.REP_MICRO_BATCHES)
    n_rep = max(1, round(mbs * m_rep))
    cuts = work.cut_quantiles(n)
    if n_rep < n:
        cuts = [cuts[round(i * (n - 1) / max(1, n_rep - 1))] for i in range(n_rep)]
    # batching.py feeds prompt + first C - 1 response tokens (the C-th is a target only) and
    # skips C = 0.
    cuts = [c for c in cuts if c > 0] or [1]
    lens = [work.prompt_len + c - 1 for c in cuts]
    groups = plan_micro_batches(lens, seq_multiple=multiple, num_micro_batches=m_rep)
    width = max(len(g) for g in groups)
    longest = max(pad(x) for x in lens)
    tok, att, pos, seqs = [], [], [], []
    for g in groups:
        rows, s = (width, longest) if pad_to_step else (len(g), max(pad(lens[i]) for i in g))
        tok.append(rows * s)
        att.append(rows * s * s)
        seqs.append(s)
        pos.append(rows * s if work.logits_on == "all" else urs * sum(cuts[i] for i in g))
    means = (sum(tok) / m_rep, sum(att) / m_rep, sum(pos) / m_rep)
    if work.nat_peak == "full":  # size memory for a micro-batch of un-cut sequences
        full = mbs * pad(work.seq_len)
        return BatchShape(full, max(max(pos), mbs * urs * work.response_len), pad(work.seq_len), *means)
    peak = max(range(len(groups)), key=lambda i: tok[i])
    return BatchShape(tok[peak], max(pos), seqs[peak], *means)
