"""From rollout samples and a NAT selection to Megatron micro-batches, and the NAT loss on them.

Truncated compute (RPC). Attention is causal, so the log-probs of kept tokens do not depend on
anything after the last kept one: a response kept up to its cut C is fed as the prompt and its
first C - 1 tokens (C-th token: a target, never an input), BEFORE the model runs, so every
layer's forward and backward shrink. A sample with C = 0 is skipped entirely: it has no kept
token, so it cannot change the loss or the gradient, and its forward would be pure waste. It
still counts in the normaliser (nat.md §2: full-sequence denominator). A rank whose every sample
is skipped keeps one prompt-only row with zero weight, so it still takes part in the schedule
and the gradient all-reduces.

Shared prompts (share_prompt=True). The responses of one prompt (a GRPO group) can share one row:
the prompt's first P - 1 tokens once, then one segment per response, [last prompt token,
response[:C - 1]] at positions P - 1 .. P - 2 + C. Each segment attends to the shared prompt and
to itself only (an attention mask built from the per-position "segment" field: 0 prompt, k the
k-th segment) and its rotary positions continue the prompt's ("position_ids" field), so every
kept token sees exactly the context it has in a row of its own and gets the same log-prob, the
same loss and the same gradient, while the prompt is fed forward and backward once per row
instead of once per response (the default job's prompt is ~54 tokens against responses of
~50: full training feeds ~40% fewer tokens). A group longer than `max_tokens` is split over
several rows, each with the prompt. It needs an attention that takes the mask (layers.py's
SDPAttention; not Transformer Engine's) and cp=1.

Micro-batches are padded, not packed: our SDPA attention (and Megatron's pipeline shape
exchange) take [b, s] batches; packing would need variable-length attention. Padding is kept
small by sorting the sequences by truncated length and cutting the sorted list into contiguous
groups, either balanced so that at most `num_micro_batches` groups have the smallest possible
largest padded size (b * s_pad; the step's peak memory), or greedily up to `max_tokens` padded
tokens each. tools/bench_nat.py measures the padding this saves against unsorted fixed-size
micro-batches. Every length pads up to `seq_multiple`: `parallel.layout.token_multiple(layout,
fp8=recipe)`, which keeps every rank's share aligned under CP, SP and FP8; padding carries
zero weight.

Per-position fields ([b, s], position t predicts token t + 1), zero on padding:
  response_pos  j + 1 where position t predicts response token j (0: prompt or padding)
  old_logprobs  pi_old log-prob of that response token   (ref_logprobs, tis_weights likewise, if given)
  kept, prob    Selection.mask / Selection.prob of that token
  advantages    the token's advantage (a sequence advantage is broadcast over the response)
  lengths       the sample's FULL response length (broadcast)
  sample        1 + the sample's index in `samples` (0: padding), to map statistics back
  position_ids, segment   with share_prompt only: rotary position and segment (0: prompt)
`count` is the micro-batch's share of the global normaliser from FULL response lengths
(token-mean: response tokens; seq-mean modes: samples), skipped samples' shares included.

Every rank that builds micro-batches from the same samples and the same Selection gets the same
micro-batches (the plan is a deterministic function of the lengths), so every pipeline stage
knows each micro-batch's shape before the schedule runs. Draw the Selection with
`selection.selection_generators(seed, step, sample_ids)` so that it is the same on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nat_megatron.nat.loss import LossConfig, nat_loss_sum, normaliser_count
from nat_megatron.nat.selection import Selection
from nat_megatron.train.forward_backward import MicroBatch

KEPT_FIELD = "kept"  # pass as forward_backward(output_mask=KEPT_FIELD) for the selected-output path


@dataclass(frozen=True)
class Sample:
    """One rollout response: token ids, rollout log-probs [T] and its advantage.

    advantage: a float (GRPO: one per response) or a float tensor [T] (OTB: one per token).
    """

    prompt: torch.Tensor
    response: torch.Tensor
    old_logprobs: torch.Tensor
    advantage: float | torch.Tensor
    ref_logprobs: torch.Tensor | None = None  # [T], the reference policy's (KL term)
    tis_weights: torch.Tensor | None = None  # [T], truncated importance weights (nat/loss.py)


OPTIONAL = ("ref_logprobs", "tis_weights")  # per-token Sample fields: all samples or none


def plan_micro_batches(
    seq_lens: Sequence[int],
    *,
    seq_multiple: int = 1,
    num_micro_batches: int | None = None,
    max_tokens: int | None = None,
    sort: bool = True,
) -> list[list[int]]:
    """Group sequence indices into micro-batches (module docstring). Deterministic.

    Sorted (longest first), contiguous groups: first the smallest largest group (padded
    b * s_pad, what sets peak memory) within `num_micro_batches` groups, or the fewest groups
    within `max_tokens`; then, among those, the least total padding (what costs time).
    sort=False keeps the given order in equal-count groups (or greedy up to max_tokens): the
    unsorted baseline that tools/bench_nat.py compares against.
    """
    if (num_micro_batches is None) == (max_tokens is None):
        raise ValueError(
            "set exactly one of num_micro_batches (a fixed count per step) or "
            "max_tokens (padded tokens per micro-batch)"
        )
    n = len(seq_lens)
    padded = [-(-int(s) // seq_multiple) * seq_multiple for s in seq_lens]
    order = sorted(range(n), key=lambda i: -padded[i]) if sort else list(range(n))
    if max_tokens is not None and max_tokens < max(padded):
        raise ValueError(
            f"max_tokens={max_tokens} is below the longest padded sequence ({max(padded)} tokens); raise max_tokens"
        )
    if num_micro_batches is None:
        groups = _greedy(order, padded, max_tokens)
        return _least_padding(order, padded, max_tokens, len(groups)) if sort else groups
    if isinstance(num_micro_batches, bool) or not isinstance(num_micro_batches, int) or (num_micro_batches < 1):
        raise ValueError(f"num_micro_batches={num_micro_batches!r} must be an int >= 1")
    if not sort:
        size = -(-n // num_micro_batches)
        return [order[i : i + size] for i in range(0, n, size)]
    # Smallest budget whose greedy cut needs <= num_micro_batches groups (the count is
    # non-increasing in the budget, and greedy is optimal for contiguous sorted groups).
    lo, hi = max(padded), max(padded) * n
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(_greedy(order, padded, mid)) <= num_micro_batches else (mid + 1, hi)
    return _least_padding(order, padded, lo, min(num_micro_batches, n))


def _greedy(order: list[int], padded: list[int], budget: int) -> list[list[int]]:
    groups, cur, longest = [], [], 0
    for i in order:
        if cur and (len(cur) + 1) * max(longest, padded[i]) > budget:
            groups.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, padded[i])
    return groups + [cur]


def _least_padding(order: list[int], padded: list[int], budget: int, groups: int) -> list[list[int]]:
    """`groups` contiguous groups of the sorted `order`, each at most `budget` padded tokens,
    with the least total padded tokens (dynamic programme over split points, O(groups n^2)).
    Splitting a sorted group never adds padding, so using every allowed group is optimal."""
    n = len(order)
    L = torch.tensor([padded[i] for i in order], dtype=torch.long)
    start, end = torch.arange(n)[:, None], torch.arange(n + 1)[None, :]
    cost = (end - start) * L[:, None]  # group = sorted rows start..end-1, longest first
    big = torch.iinfo(torch.long).max // 4
    cost = torch.where((end > start) & (cost <= budget), cost, big)
    best = torch.full((n + 1,), big)
    best[0] = 0
    back = []
    for _ in range(groups):  # best[j]: least total over rows 0..j-1 in the groups so far
        total = best[:n, None] + cost
        best, arg = total.min(0)
        best = torch.cat([best.new_full((1,), big), best[1:]]).clamp(max=big)
        back.append(arg)
    cuts, j = [], n
    for arg in reversed(back):
        i = int(arg[j])
        cuts.append((i, j))
        j = i
    assert j == 0, "a feasible plan exists for this budget and group count"
    return [order[i:j] for i, j in reversed(cuts)]


def build_micro_batches(
    samples: Sequence[Sample],
    selection: Selection | None,
    *,
    aggregation: str,
    seq_multiple: int = 1,
    num_micro_batches: int | None = None,
    max_tokens: int | None = None,
    sort: bool = True,
    pad_rows: bool = False,
    share_prompt: bool = False,
) -> list[MicroBatch]:
    """Truncate every sample to its kept prefix and group the rows into MicroBatches.

    `selection` is `selection.sample(...)` over these samples' response lengths, in order.
    An empty `samples` list (a data-parallel rank that got no sample; `selection` None) gives
    one micro-batch of one all-zero row with count 0, so the rank still takes part in the
    schedule and the gradient all-reduce. pad_rows=True gives every micro-batch the same number
    of rows and, with num_micro_batches, makes exactly that many micro-batches (zero-weight rows
    and micro-batches): the interleaved schedule needs one shape for the whole step
    (forward_backward rounds the count up to whole groups of pp). share_prompt=True puts the
    responses of one prompt in one row (module docstring).
    """
    _check(samples, selection, seq_multiple)
    if not samples:  # a rank without samples (fewer samples than DP ranks) still runs the step
        count = num_micro_batches if pad_rows and num_micro_batches else 1
        return [_micro_batch([], selection, [None], seq_multiple, prompt_only=None, count=0)] * count
    cuts = selection.cut.tolist()
    live = [i for i, c in enumerate(cuts) if c > 0]
    # rows: (the samples of the row, its length in tokens)
    if share_prompt:
        rows = _shared_rows(samples, live, cuts, seq_multiple, max_tokens)
    else:
        rows = [((i,), len(samples[i].prompt) + cuts[i] - 1) for i in live]
    if not rows:  # every sample skipped: one prompt-only row keeps this rank in the schedule
        rows = [((0,), len(samples[0].prompt))]
    plan = plan_micro_batches(
        [n for _, n in rows],
        seq_multiple=seq_multiple,
        num_micro_batches=num_micro_batches,
        max_tokens=max_tokens,
        sort=sort,
    )
    if pad_rows and num_micro_batches is not None:  # the interleaved schedule's fixed count
        plan += [[] for _ in range(num_micro_batches - len(plan))]
    full = selection.lengths
    shares = [normaliser_count(full[[i for r in g for i in rows[r][0]]], aggregation) if g else 0 for g in plan]
    shares[0] += normaliser_count(full, aggregation) - sum(shares)  # the skipped samples
    width = max(len(g) for g in plan) if pad_rows else 0
    out = []
    for group, share in zip(plan, shares):
        longest = max((rows[r][1] for r in group), default=1)
        s_pad = -(-longest // seq_multiple) * seq_multiple
        members = [rows[r][0] for r in group] if live else [None] * len(group)
        members += [None] * (width - len(members))
        prompt_only = rows[0][0][0] if group and not live else None
        batch = _micro_batch(
            samples, selection, members, s_pad, prompt_only=prompt_only, count=share, shared=share_prompt
        )
        out.append(batch)
    return out


def _shared_rows(samples, live: list[int], cuts: list[int], multiple: int, max_tokens: int | None) -> list:
    """(samples, length) rows of one prompt each: P - 1 prompt tokens, then each response's
    segment of C tokens, a new row (with the prompt again) where max_tokens would be passed."""
    groups: dict[tuple, list[int]] = {}
    for i in live:
        groups.setdefault(tuple(samples[i].prompt.tolist()), []).append(i)
    rows = []
    for members in groups.values():
        base = len(samples[members[0]].prompt) - 1
        cur, n = [], base
        for i in members:
            if cur and max_tokens is not None and -(-(n + cuts[i]) // multiple) * multiple > max_tokens:
                rows.append((tuple(cur), n))
                cur, n = [], base
            cur.append(i)
            n += cuts[i]
        rows.append((tuple(cur), n))
    return rows


_FIELD_DTYPES = {
    "response_pos": torch.long,
    KEPT_FIELD: torch.bool,
    "prob": torch.float64,
    "lengths": torch.long,
    "sample": torch.long,
    "position_ids": torch.long,
    "segment": torch.long,
}  # every other field is float32


def _zero_fields(samples, b: int, s_pad: int, extra: tuple = ()) -> tuple[dict, list]:
    """The per-position fields of b rows of s_pad positions, all zero, and the OPTIONAL names
    the samples carry."""
    optional = [n for n in OPTIONAL if samples and getattr(samples[0], n) is not None]
    names = ["response_pos", "old_logprobs", KEPT_FIELD, "prob", "advantages", "lengths", "sample", *extra]
    return {k: torch.zeros(b, s_pad, dtype=_FIELD_DTYPES.get(k, torch.float32)) for k in [*names, *optional]}, optional


def _put_response(f: dict, optional: list, r: int, at: slice, span: slice, smp: Sample, i: int, c: int, selection):
    """Sample i's fields in row r: per token at the positions `at` of its c kept tokens, and its
    sequence-wide values (a scalar advantage, the full length, the sample id) over `span` (the
    whole row when the row holds this sample only)."""
    f["response_pos"][r, at] = torch.arange(1, c + 1)
    f["old_logprobs"][r, at] = smp.old_logprobs[:c].float()
    f[KEPT_FIELD][r, at] = selection.mask[i, :c]
    f["prob"][r, at] = selection.prob[i, :c]
    if isinstance(smp.advantage, torch.Tensor):
        f["advantages"][r, at] = smp.advantage[:c].float()
    else:
        f["advantages"][r, span] = float(smp.advantage)
    f["lengths"][r, span] = int(selection.lengths[i])
    f["sample"][r, span] = i + 1
    for n in optional:
        f[n][r, at] = getattr(smp, n)[:c].float()


def _micro_batch(samples, selection, members, s_pad, *, prompt_only, count, shared=False) -> MicroBatch:
    """Rows for `members` (tuples of sample indices; None: an empty zero-weight row) padded to
    s_pad positions."""
    if shared:
        return _shared_micro_batch(samples, selection, members, s_pad, prompt_only=prompt_only, count=count)
    members = [None if m is None else m[0] for m in members]
    b = len(members)
    tokens = torch.zeros(b, s_pad + 1, dtype=torch.long)  # + 1: the last target
    f, optional = _zero_fields(samples, b, s_pad)
    for r, i in enumerate(members):
        if i is None:
            if prompt_only is not None and r == 0:
                p = samples[prompt_only].prompt
                tokens[r, : len(p)] = p
            continue
        smp, c = samples[i], int(selection.cut[i])
        p = len(smp.prompt)
        tokens[r, :p] = smp.prompt
        tokens[r, p : p + c] = smp.response[:c]
        at = slice(p - 1, p - 1 + c)  # position p - 1 + j predicts response token j
        _put_response(f, optional, r, at, slice(None), smp, i, c, selection)
    return MicroBatch(tokens=tokens[:, :-1].clone(), targets=tokens[:, 1:].clone(), fields=f, count=count)


def _shared_micro_batch(samples, selection, members, s_pad, *, prompt_only, count) -> MicroBatch:
    """Rows of one prompt and several response segments (module docstring, share_prompt)."""
    b = len(members)
    tokens = torch.zeros(b, s_pad, dtype=torch.long)
    targets = torch.zeros(b, s_pad, dtype=torch.long)
    f, optional = _zero_fields(samples, b, s_pad, extra=("position_ids", "segment"))
    for r, row in enumerate(members):
        if row is None:
            if prompt_only is not None and r == 0:
                p = samples[prompt_only].prompt
                tokens[r, : len(p)], targets[r, : len(p) - 1] = p, p[1:]
                f["position_ids"][r, : len(p)] = torch.arange(len(p))
            continue
        p = samples[row[0]].prompt
        t = len(p) - 1  # the prompt's first P - 1 tokens, once
        tokens[r, :t], targets[r, :t] = p[:-1], p[1:]
        f["position_ids"][r, :t] = torch.arange(t)
        for k, i in enumerate(row, start=1):
            smp, c = samples[i], int(selection.cut[i])
            at = slice(t, t + c)  # segment k: the last prompt token, then response[:c - 1]
            tokens[r, t] = p[-1]
            tokens[r, t + 1 : t + c] = smp.response[: c - 1]
            targets[r, at] = smp.response[:c]
            f["position_ids"][r, at] = torch.arange(len(p) - 1, len(p) - 1 + c)
            f["segment"][r, at] = k
            _put_response(f, optional, r, at, at, smp, i, c, selection)
            t += c
    return MicroBatch(tokens=tokens, targets=targets, fields=f, count=count)


def nat_loss_fn(cfg: LossConfig):
    """A forward_backward loss_fn: the NAT loss sum (nat_loss_sum) of one micro-batch.

    Per-position statistics are scattered back onto the response grid [b, W] (W = the longest
    kept prefix), so nat_loss_sum sees response-aligned tensors. Under context parallelism a
    rank holds only some positions; the rest stay unkept and each rank returns its part of
    the sum (the parts add up over CP like the gradients do).
    """
    if not isinstance(cfg, LossConfig):
        raise ValueError(f"cfg must be a LossConfig, got {type(cfg).__name__}")

    def loss_fn(stats: dict, mb: MicroBatch):
        f = {k: v.to(stats["logprobs"].device) for k, v in mb.fields.items()}
        on = f["response_pos"] > 0
        width = int(f["response_pos"].max()) if bool(on.any()) else 0
        col = torch.where(on, f["response_pos"] - 1, width)  # off-response: a dropped column
        # One grid row per batch row, or under share_prompt per sample (a batch row holds
        # several; positions of no sample share one all-zero grid row).
        if "segment" in f:
            _, slot = torch.unique(f["sample"], return_inverse=True)
        else:
            slot = torch.arange(on.shape[0], device=on.device)[:, None].expand_as(col)
        rows = int(slot.max()) + 1 if slot.numel() else 0
        flat = (slot * (width + 1) + col).reshape(-1)

        def grid(x):
            out = x.new_zeros(rows * (width + 1)).scatter(0, flat, x.reshape(-1))
            return out.view(rows, width + 1)[:, :width]

        adv = grid(f["advantages"])  # per token; a sequence advantage is the same on every one
        # Exact per-row scalar (a max over identical values, no rounding); 1 on empty rows.
        lengths = f["lengths"].new_zeros(rows)
        lengths = lengths.scatter_reduce(0, slot.reshape(-1), f["lengths"].reshape(-1), "amax").clamp(min=1)
        extra = {n: grid(f[n]) for n in OPTIONAL if n in f}
        if "entropy" in stats:
            extra["entropy"] = grid(stats["entropy"])
        loss_sum, metrics = nat_loss_sum(
            grid(stats["logprobs"]),
            old_logprobs=grid(f["old_logprobs"]),
            advantages=adv,
            selection_mask=grid(f[KEPT_FIELD] & on),
            selection_prob=grid(f["prob"]),
            lengths=lengths,
            cfg=cfg,
            **extra,
        )
        if width == 0:  # nothing of this micro-batch here: keep the graph for backward
            loss_sum = loss_sum + 0.0 * stats["logprobs"].sum()
        return loss_sum, mb.count, metrics

    return loss_fn


def _check(samples, selection, seq_multiple):
    nothing = not samples and (
        selection is None or (isinstance(selection, Selection) and selection.lengths.numel() == 0)
    )
    if not nothing and (not isinstance(selection, Selection) or selection.lengths.numel() != len(samples)):
        raise ValueError(
            "selection must be a Selection drawn for exactly these samples "
            "(selection.sample over their response lengths, in order)"
        )
    if isinstance(seq_multiple, bool) or not isinstance(seq_multiple, int) or seq_multiple < 1:
        raise ValueError(f"seq_multiple={seq_multiple!r} must be an int >= 1 (parallel.layout.token_multiple)")
    given = {n: bool(samples) and getattr(samples[0], n) is not None for n in OPTIONAL}
    for i, smp in enumerate(samples):
        T = int(selection.lengths[i])
        if smp.prompt.dim() != 1 or len(smp.prompt) < 1:
            raise ValueError(
                f"samples[{i}].prompt must be a 1-D tensor of >= 1 token ids "
                "(the first response token is predicted from the prompt)"
            )
        if smp.response.dim() != 1 or len(smp.response) != T:
            raise ValueError(
                f"samples[{i}].response has {len(smp.response)} tokens but "
                f"selection.lengths[{i}] = {T}; draw the selection from the "
                "response lengths"
            )
        if isinstance(smp.advantage, torch.Tensor) and tuple(smp.advantage.shape) != (T,):
            raise ValueError(
                f"samples[{i}].advantage is a tensor of shape "
                f"{tuple(smp.advantage.shape)}; per-token advantages need shape ({T},)"
            )
        for name in ("old_logprobs", *OPTIONAL):
            x = getattr(smp, name)
            if name in given and (x is not None) != given[name]:
                raise ValueError(f"samples[{i}].{name}: give {name} for every sample or for none")
            if x is not None and tuple(x.shape) != (T,):
                raise ValueError(f"samples[{i}].{name} must have shape ({T},), one per response token")
