"""RPC truncation and micro-batching (train/batching.py), single process, no model.

The loss check feeds known per-token log-probs through the micro-batches and compares the
summed micro-batch losses with nat_loss on the untruncated response grid.
"""

import dataclasses
import math

import pytest
import torch

from nat_megatron.model.layers import segment_attention_mask
from nat_megatron.model.output import positions_to_index, scatter_positions
from nat_megatron.nat.loss import AGGREGATIONS, LossConfig, nat_loss, normaliser_count
from nat_megatron.nat.selection import Selection, sample, selection_generators
from nat_megatron.train.batching import KEPT_FIELD, Sample, build_micro_batches, nat_loss_fn, plan_micro_batches


def make_samples(n: int, seed: int = 0, *, ref: bool = False) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        P, T = int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(1, 13, (1,), generator=g))
        out.append(
            Sample(
                prompt=torch.randint(0, 300, (P,), generator=g),
                response=torch.randint(0, 300, (T,), generator=g),
                old_logprobs=-torch.rand(T, generator=g) * 3,
                advantage=float(torch.randn((), generator=g)),  # distinct: identifies the row
                ref_logprobs=-torch.rand(T, generator=g) * 3 if ref else None,
            )
        )
    return out


def select(samples, scheme="rpc", budget=0.4, seed=3, **options) -> Selection:
    lengths = torch.tensor([len(s.response) for s in samples])
    return sample(scheme, budget, lengths, selection_generators(seed, 7, range(len(samples))), **options)


def rows_of(mbs, samples):
    """(micro-batch, row, sample index) for every row that holds a sample."""
    adv = {s.advantage: i for i, s in enumerate(samples)}
    for mb in mbs:
        for r in range(mb.tokens.shape[0]):
            on = mb.fields["response_pos"][r] > 0
            if on.any():
                yield mb, r, adv[float(mb.fields["advantages"][r, on][0])]


def test_rows_are_truncated_and_aligned():
    samples = make_samples(12)
    sel = select(samples)
    assert (sel.cut == 0).any() and (sel.cut > 0).any()  # the test covers skipping
    mbs = build_micro_batches(samples, sel, aggregation="token-mean", seq_multiple=4, num_micro_batches=3)
    assert 1 < len(mbs) <= 3 and len({mb.seq_len for mb in mbs}) > 1
    seen = set()
    for mb, r, i in rows_of(mbs, samples):
        smp, c, P = samples[i], int(sel.cut[i]), len(samples[i].prompt)
        assert mb.seq_len % 4 == 0 and i not in seen and c > 0
        seen.add(i)
        assert torch.equal(mb.tokens[r, :P], smp.prompt)
        assert torch.equal(mb.tokens[r, P : P + c - 1], smp.response[: c - 1])
        pos = mb.fields["response_pos"][r]
        at = torch.arange(P - 1, P - 1 + c)
        assert torch.equal(pos[at], torch.arange(1, c + 1)) and int((pos > 0).sum()) == c
        assert torch.equal(mb.targets[r, at], smp.response[:c])  # t predicts token t + 1
        assert torch.equal(mb.fields["old_logprobs"][r, at], smp.old_logprobs[:c])
        assert torch.equal(mb.fields[KEPT_FIELD][r, at], sel.mask[i, :c])
        assert torch.equal(mb.fields["prob"][r, at], sel.prob[i, :c])
        assert not mb.fields[KEPT_FIELD][r, pos == 0].any()
        assert (mb.fields["lengths"][r] == len(smp.response)).all()
    assert seen == {i for i in range(len(samples)) if sel.cut[i] > 0}


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_counts_use_full_lengths(aggregation):
    samples = make_samples(10, seed=1)
    sel = select(samples, budget=0.3)
    mbs = build_micro_batches(samples, sel, aggregation=aggregation, max_tokens=40)
    assert sum(mb.count for mb in mbs) == normaliser_count(sel.lengths, aggregation)
    skipped = normaliser_count(sel.lengths[sel.cut == 0], aggregation) if (sel.cut == 0).any() else 0
    for k, mb in enumerate(mbs):
        members = [i for m, _, i in rows_of([mb], samples)]
        assert mb.count == normaliser_count(sel.lengths[members], aggregation) + (skipped if k == 0 else 0)


def grouped(samples: list[Sample], size: int) -> list[Sample]:
    """The samples with the prompt of the first of every `size` (GRPO groups)."""
    return [dataclasses.replace(s, prompt=samples[size * (i // size)].prompt) for i, s in enumerate(samples)]


@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("scheme,budget", [("rpc", 0.4), ("urs", 0.5), ("rpc+urs", 0.3), ("none", 1.0)])
def test_loss_fn_equals_nat_loss_on_the_full_grid(aggregation, scheme, budget, share_prompt):
    samples = make_samples(9, seed=2, ref=True)
    if share_prompt:
        samples = grouped(samples, 3)
    sel = select(samples, scheme, budget)
    cfg = LossConfig(
        aggregation=aggregation,
        kl_beta=0.1,
        entropy_coef=0.01,
        seq_token_sum_constant=16.0 if aggregation == "seq-mean-token-sum" else None,
    )
    B, T = sel.mask.shape
    g = torch.Generator().manual_seed(5)
    lp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 2).requires_grad_()
    ent = torch.rand(B, T, generator=g, dtype=torch.float64)
    mbs = build_micro_batches(
        samples, sel, aggregation=aggregation, seq_multiple=2, num_micro_batches=2, share_prompt=share_prompt
    )
    if share_prompt:  # some row holds several responses
        assert any(len((mb.fields["segment"][r]).unique()) > 2 for mb in mbs for r in range(mb.tokens.shape[0]))
    fn, total, count = nat_loss_fn(cfg), 0.0, 0
    for mb in mbs:
        row = (mb.fields["sample"] - 1).clamp(min=0)
        col = (mb.fields["response_pos"] - 1).clamp(min=0)
        on = mb.fields["response_pos"] > 0
        stats = {k: torch.where(on, x[row, col], torch.zeros(())) for k, x in (("logprobs", lp), ("entropy", ent))}
        loss_sum, c, _ = fn(stats, mb)
        total, count = total + loss_sum, count + c
    old = torch.nn.utils.rnn.pad_sequence([s.old_logprobs for s in samples], batch_first=True)
    ref = torch.nn.utils.rnn.pad_sequence([s.ref_logprobs for s in samples], batch_first=True)
    want, _ = nat_loss(
        lp,
        old_logprobs=old,
        advantages=torch.tensor([s.advantage for s in samples]),
        selection_mask=sel.mask,
        selection_prob=sel.prob,
        lengths=sel.lengths,
        cfg=cfg,
        ref_logprobs=ref,
        entropy=ent,
    )
    got = total / count
    assert count == normaliser_count(sel.lengths, aggregation)
    assert math.isclose(float(got), float(want), rel_tol=1e-6, abs_tol=1e-9), (got, want)
    (g_got,) = torch.autograd.grad(got, lp)
    (g_want,) = torch.autograd.grad(want, lp)
    assert torch.allclose(g_got, g_want, rtol=1e-6, atol=1e-9)


def test_every_sample_cut_to_zero_keeps_one_prompt_row():
    samples = make_samples(4, seed=3)
    lengths = torch.tensor([len(s.response) for s in samples])
    T = int(lengths.max())
    valid = torch.arange(T)[None] < lengths[:, None]
    sel = Selection(torch.zeros_like(valid), valid.double() * 0.25, torch.zeros(4, dtype=torch.long), lengths)
    mbs = build_micro_batches(samples, sel, aggregation="token-mean", seq_multiple=4, num_micro_batches=2)
    assert len(mbs) == 1 and mbs[0].tokens.shape[0] == 1 and mbs[0].count == int(lengths.sum())
    assert mbs[0].seq_len % 4 == 0 and not (mbs[0].fields["response_pos"] > 0).any()
    stats = {"logprobs": torch.full(mbs[0].tokens.shape, -1.0, requires_grad=True)}
    loss_sum, _, _ = nat_loss_fn(LossConfig())(stats, mbs[0])
    loss_sum.backward()  # connected to the graph, with zero gradient
    assert float(loss_sum) == 0.0 and not stats["logprobs"].grad.any()


def test_plan_balances_sorted_groups():
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(5, 200, (32,), generator=g).tolist()
    cost = lambda plan: max(len(p) * max(-(-lens[i] // 8) * 8 for i in p) for p in plan)  # noqa: E731
    for m in (1, 3, 4, 7):
        plan = plan_micro_batches(lens, seq_multiple=8, num_micro_batches=m)
        assert len(plan) <= m and sorted(sum(plan, [])) == list(range(32))
        base = plan_micro_batches(lens, seq_multiple=8, num_micro_batches=m, sort=False)
        assert cost(plan) <= cost(base)
    plan = plan_micro_batches(lens, seq_multiple=8, max_tokens=400)
    assert cost(plan) <= 400 and sorted(sum(plan, [])) == list(range(32))
    with pytest.raises(ValueError, match="max_tokens=100 is below"):
        plan_micro_batches(lens, max_tokens=100)
    with pytest.raises(ValueError, match="exactly one of"):
        plan_micro_batches(lens)


def test_pad_rows_and_padding_multiples():
    samples = make_samples(7, seed=4)
    mbs = build_micro_batches(
        samples,
        select(samples, budget=0.7),
        aggregation="token-mean",
        seq_multiple=16,
        num_micro_batches=3,
        pad_rows=True,
    )
    assert len({mb.tokens.shape[0] for mb in mbs}) == 1 and all(mb.seq_len % 16 == 0 for mb in mbs)


def test_bad_inputs_name_the_field():
    samples = make_samples(3, seed=5)
    sel = select(samples)
    kw = dict(aggregation="token-mean", num_micro_batches=1)
    with pytest.raises(ValueError, match="selection must be a Selection drawn for exactly"):
        build_micro_batches(samples[:2], sel, **kw)
    longer = sample("none", 1.0, sel.lengths + 1, torch.Generator())
    with pytest.raises(ValueError, match=r"samples\[0\].response has"):
        build_micro_batches(samples, longer, **kw)
    empty = [Sample(torch.zeros(0, dtype=torch.long), s.response, s.old_logprobs, 0.0) for s in samples]
    with pytest.raises(ValueError, match=r"samples\[0\].prompt"):
        build_micro_batches(empty, sel, **kw)
    with pytest.raises(ValueError, match="seq_multiple"):
        build_micro_batches(samples, sel, seq_multiple=0, **kw)


def test_position_index_round_trip():
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(0)) < 0.5
    idx = positions_to_index(mask)
    values = torch.arange(1.0, idx.numel() + 1)
    grid = scatter_positions(values, idx, 3, 5)
    assert torch.equal(grid != 0, mask)
    # Seq-major order: index p * b + i for position p of row i.
    assert torch.equal(grid.t().reshape(-1)[idx], values)


def test_pad_rows_keeps_the_micro_batch_count_when_samples_are_skipped():
    samples = make_samples(6, seed=6)
    sel = select(samples, budget=0.05)  # most cuts are 0
    live = int((sel.cut > 0).sum())
    assert live < 4
    mbs = build_micro_batches(
        samples, sel, aggregation="seq-mean-token-mean", seq_multiple=2, num_micro_batches=4, pad_rows=True
    )
    assert len(mbs) == 4 and len({mb.tokens.shape[0] for mb in mbs}) == 1
    assert sum(mb.count for mb in mbs) == len(samples)
    assert sum(int((mb.fields["response_pos"] == 1).sum()) for mb in mbs) == live
    fn = nat_loss_fn(LossConfig(aggregation="seq-mean-token-mean"))
    for mb in mbs:  # empty micro-batches still give a loss connected to the graph
        loss_sum, *_ = fn({"logprobs": torch.zeros(mb.tokens.shape, requires_grad=True)}, mb)
        assert loss_sum.requires_grad


def test_empty_sample_list_gives_one_zero_weight_row():
    """A DP rank that got no sample still runs the step: one all-zero row, count 0."""
    for pad_rows, n in ((False, 1), (True, 2)):
        mbs = build_micro_batches(
            [], None, aggregation="token-mean", seq_multiple=4, num_micro_batches=2, pad_rows=pad_rows
        )
        assert len(mbs) == n
        for mb in mbs:
            assert mb.tokens.shape == (1, 4) and mb.count == 0 and not mb.tokens.any()
            assert not any(v.any() for v in mb.fields.values())
            loss, count, _ = nat_loss_fn(LossConfig())({"logprobs": torch.zeros(1, 4)}, mb)
            assert float(loss) == 0.0 and count == 0
    with pytest.raises(ValueError, match="selection must be a Selection"):
        build_micro_batches(make_samples(2), None, aggregation="token-mean", num_micro_batches=1)


@pytest.mark.parametrize("max_tokens", [None, 24])
def test_shared_prompt_rows(max_tokens):
    """share_prompt: the prompt once per row, then one segment per response of that prompt, each
    with the last prompt token first, its rotary positions continuing the prompt's, and the same
    targets and fields as in a row of its own; a row never passes max_tokens."""
    samples = grouped(make_samples(12, seed=7), 4)
    sel = select(samples, budget=0.6)
    size = {"max_tokens": max_tokens} if max_tokens else {"num_micro_batches": 2}
    mbs = build_micro_batches(samples, sel, aggregation="token-mean", seq_multiple=4, share_prompt=True, **size)
    seen = []
    for mb in mbs:
        f = mb.fields
        assert mb.seq_len % 4 == 0 and (max_tokens is None or mb.tokens.numel() <= max_tokens)
        for r in range(mb.tokens.shape[0]):
            segments = [int(k) for k in f["segment"][r].unique() if k > 0]
            if not segments:
                continue
            first = int(f["sample"][r][f["segment"][r] == 1][0]) - 1
            p = samples[first].prompt
            P = len(p)
            assert torch.equal(mb.tokens[r, : P - 1], p[:-1]) and not f["segment"][r, : P - 1].any()
            assert torch.equal(f["position_ids"][r, : P - 1], torch.arange(P - 1))
            for k in segments:
                at = (f["segment"][r] == k).nonzero().squeeze(1)
                i = int(f["sample"][r, at[0]]) - 1
                smp, c = samples[i], int(sel.cut[i])
                assert torch.equal(smp.prompt, p) and len(at) == c and torch.equal(at, at[0] + torch.arange(c))
                assert int(mb.tokens[r, at[0]]) == int(p[-1])
                assert torch.equal(mb.tokens[r, at[1:]], smp.response[: c - 1])
                assert torch.equal(mb.targets[r, at], smp.response[:c])
                assert torch.equal(f["position_ids"][r, at], torch.arange(P - 1, P - 1 + c))
                assert torch.equal(f["response_pos"][r, at], torch.arange(1, c + 1))
                assert torch.equal(f[KEPT_FIELD][r, at], sel.mask[i, :c])
                assert torch.equal(f["old_logprobs"][r, at], smp.old_logprobs[:c])
                assert (f["advantages"][r, at] == smp.advantage).all()
                assert (f["lengths"][r, at] == len(smp.response)).all()
                seen.append(i)
    assert sorted(seen) == [i for i in range(len(samples)) if sel.cut[i] > 0]
    assert sum(mb.count for mb in mbs) == int(sel.lengths.sum())
    unshared = build_micro_batches(samples, sel, aggregation="token-mean", seq_multiple=4, num_micro_batches=2)
    fed = lambda batches: sum(int((mb.fields["response_pos"] > 0).sum()) for mb in batches)  # noqa: E731
    assert fed(mbs) == fed(unshared)  # the same response positions, fewer prompt tokens
    if max_tokens is None:
        assert sum(mb.tokens.numel() for mb in mbs) < sum(mb.tokens.numel() for mb in unshared)


def test_segment_attention_mask():
    # prompt (0), response 1 (two positions), response 2 (two), padding (0)
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, 0]])
    masked = segment_attention_mask(seg)[0, 0]
    sees = [set((~masked[q]).nonzero().squeeze(1).tolist()) for q in range(7)]
    assert sees[1] == {0, 1}
    assert sees[3] == {0, 1, 2, 3}  # the prompt and its own segment, causally
    assert sees[5] == {0, 1, 4, 5}  # never the other response
    assert sees[6] == {0, 1, 6}  # padding sees something (finite), and no real position sees it
    assert not any(6 in sees[q] for q in range(6))
