"""Optimal Token Baseline (nat_megatron/nat/otb.py): hand-computed values, the zero-tail and
group-of-one rules, grouping, eps, and the NAT rule (proxy only on the groups' kept prefixes)."""

import pytest
import torch

from nat_megatron.nat.loss import group_advantages
from nat_megatron.nat.otb import logit_gradient_proxy, optimal_token_baseline, outcome_returns, proxy_prefix_lengths
from nat_megatron.nat.selection import sample

D = torch.float64


def prefix_mask(lengths, T=None):
    lengths = torch.as_tensor(lengths)
    T = int(lengths.max()) if T is None else T
    return torch.arange(T)[None] < lengths[:, None]


def reference_otb(returns, proxy, mask, group_index, eps=1e-8, zero_tail=True):
    """Plain loops, group by group and position by position (verl's structure, nat.md's group
    of one)."""
    B, T = returns.shape
    adv = torch.zeros(B, T, dtype=D)
    W = (proxy.double() * mask).cumsum(-1)
    G = returns.double()
    for g in group_index.unique().tolist():
        rows = [i for i in range(B) if group_index[i] == g]
        lengths = [int(mask[i].sum()) for i in rows]
        for t in range(T):
            reach = [i for i in rows if mask[i, t]]
            num = sum(float(G[i, t] * W[i, t]) for i in reach)
            den = sum(float(W[i, t]) for i in reach)
            for i in reach:
                b = num / (den + eps)
                if len(rows) == 1:
                    b = float(G[i, t])
                elif zero_tail:
                    top = max(lengths)
                    second = sorted(lengths)[-2]
                    if lengths.count(top) == 1 and lengths[rows.index(i)] == top and t >= second:
                        b = 0.0
                adv[i, t] = G[i, t] - b
    return adv


# One group of three responses, lengths 3, 2, 4 (row 2 is strictly the longest).
#   row 0: G = 1, proxy [1, 1, 1]     -> W [1, 2, 3]
#   row 1: G = 0, proxy [2, 2]        -> W [2, 4]
#   row 2: G = 2, proxy [1, 0, 1, 2]  -> W [1, 1, 2, 4]
# t=0: rows 0,1,2: B = (1*1 + 0*2 + 2*1) / (1 + 2 + 1) = 3/4
# t=1: rows 0,1,2: B = (1*2 + 0*4 + 2*1) / (2 + 4 + 1) = 4/7
# t=2: rows 0,2:   B = (1*3 + 2*2) / (3 + 2)           = 7/5
# t=3: row 2 only: B = 2*4 / 4 = 2, but the zero tail (second-longest length 3) sets it to 0.
HAND_G = torch.tensor([1.0, 0.0, 2.0], dtype=D)
HAND_LENGTHS = [3, 2, 4]
HAND_PROXY = torch.tensor([[1, 1, 1, 0], [2, 2, 0, 0], [1, 0, 1, 2]], dtype=D)
HAND_ADV = torch.tensor(
    [
        [1 - 3 / 4, 1 - 4 / 7, 1 - 7 / 5, 0.0],
        [0 - 3 / 4, 0 - 4 / 7, 0.0, 0.0],
        [2 - 3 / 4, 2 - 4 / 7, 2 - 7 / 5, 2.0],  # last: baseline 0 (zero tail), A = G
    ],
    dtype=D,
)


def hand_inputs():
    mask = prefix_mask(HAND_LENGTHS)
    return outcome_returns(HAND_G, mask), HAND_PROXY.clone(), mask, torch.zeros(3, dtype=torch.long)


def test_hand_computed():
    returns, proxy, mask, gi = hand_inputs()
    adv = optimal_token_baseline(returns, proxy, mask, gi)
    torch.testing.assert_close(adv, HAND_ADV, rtol=0, atol=1e-7)
    assert adv.dtype == D
    torch.testing.assert_close(adv, reference_otb(returns, proxy, mask, gi), rtol=0, atol=1e-12)


def test_zero_tail_off():
    returns, proxy, mask, gi = hand_inputs()
    adv = optimal_token_baseline(returns, proxy, mask, gi, zero_tail=False)
    # t=3: B = 2*4 / (4 + 1e-8), so A = 2 - B ~ 5e-9: the lone tail gets (almost) no signal.
    expected = HAND_ADV.clone()
    expected[2, 3] = 2.0 - 8.0 / (4.0 + 1e-8)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-7)
    assert abs(float(adv[2, 3])) < 1e-8
    torch.testing.assert_close(adv, reference_otb(returns, proxy, mask, gi, zero_tail=False), rtol=0, atol=1e-12)


def test_zero_tail_tied_longest():
    # lengths 4, 4, 2, proxy 1 everywhere (W = t + 1), G = 1, 3, 0.
    # t=0: B = (1*1 + 3*1 + 0*1) / 3 = 4/3;  t=1: (1*2 + 3*2 + 0*2) / 6 = 4/3
    # t=2, 3: rows 0, 1 only: B = (1 + 3) W / (2 W) = 2.  Tie for the longest: nothing zeroed.
    mask = prefix_mask([4, 4, 2])
    returns = outcome_returns(torch.tensor([1.0, 3.0, 0.0], dtype=D), mask)
    proxy = torch.ones(3, 4, dtype=D)
    adv = optimal_token_baseline(returns, proxy, mask, torch.tensor([5, 5, 5]))
    expected = torch.tensor(
        [[1 - 4 / 3, 1 - 4 / 3, -1.0, -1.0], [3 - 4 / 3, 3 - 4 / 3, 1.0, 1.0], [-4 / 3, -4 / 3, 0.0, 0.0]], dtype=D
    )
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-7)
    off = optimal_token_baseline(returns, proxy, mask, torch.tensor([5, 5, 5]), zero_tail=False)
    assert torch.equal(adv, off)


def test_zero_tail_second_longest_zero_length():
    # A unique longest (3) against an empty response: its whole response has baseline 0.
    mask = prefix_mask([3, 0])
    returns = outcome_returns(torch.tensor([0.5, 1.0], dtype=D), mask)
    adv = optimal_token_baseline(returns, torch.rand(2, 3, dtype=D), mask, torch.tensor([0, 0]))
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.0, 0.0]], dtype=D))


def test_group_of_one():
    # nat.md: the baseline is the return itself (A = 0); the zero tail does not apply.
    mask = prefix_mask([4, 2])
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0]], dtype=D)
    for proxy in (torch.rand(2, 4, dtype=D), torch.zeros(2, 4, dtype=D)):
        adv = optimal_token_baseline(returns, proxy, mask, torch.tensor([0, 1]))
        assert torch.equal(adv, torch.zeros(2, 4, dtype=D))


def test_interleaved_groups_match_separate_groups():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 3, 7, 2, 7, 4, 6])
    gi = torch.tensor([7, 3, 7, 3, 3, 9, 7])  # sizes 3, 3, 1; rows interleaved
    mask = prefix_mask(lengths, T=8)  # one spare column beyond every response
    returns = outcome_returns(torch.rand(7, generator=g, dtype=D), mask)
    proxy = torch.rand(7, 8, generator=g, dtype=D)
    proxy[~mask] = float("nan")  # off the mask: ignored, even nan
    adv = optimal_token_baseline(returns, proxy, mask, gi)
    assert torch.isfinite(adv).all() and not adv[~mask].any()
    torch.testing.assert_close(adv, reference_otb(returns, proxy.nan_to_num(0.0), mask, gi), rtol=0, atol=1e-12)
    for gid in (7, 3, 9):
        rows = (gi == gid).nonzero().squeeze(-1)
        alone = optimal_token_baseline(returns[rows], proxy[rows], mask[rows], gi[rows])
        torch.testing.assert_close(adv[rows], alone, rtol=0, atol=1e-12)
    assert not adv[5].any()  # the group of one
    # Row order does not matter.
    perm = torch.randperm(7, generator=g)
    shuffled = optimal_token_baseline(returns[perm], proxy[perm], mask[perm], gi[perm])
    torch.testing.assert_close(shuffled, adv[perm], rtol=0, atol=1e-12)


def test_eps_when_w_is_zero():
    # Proxy 0 (every sampled token had p = 1): W = 0, B = 0 / (0 + eps) = 0, so A = G.
    mask = prefix_mask([3, 2])
    returns = outcome_returns(torch.tensor([1.0, -2.0], dtype=D), mask)
    adv = optimal_token_baseline(returns, torch.zeros(2, 3, dtype=D), mask, torch.tensor([0, 0]))
    assert torch.equal(adv, returns)
    # eps sits in the denominator: with W = 1 for both rows and eps = 1,
    # B = (1*1 + 3*1) / (1 + 1 + 1) = 4/3 instead of the mean 2.
    mask = prefix_mask([1, 1])
    returns = outcome_returns(torch.tensor([1.0, 3.0], dtype=D), mask)
    adv = optimal_token_baseline(returns, torch.ones(2, 1, dtype=D), mask, torch.tensor([0, 0]), eps=1.0)
    torch.testing.assert_close(adv, torch.tensor([[1 - 4 / 3], [3 - 4 / 3]], dtype=D))


def test_equal_w_is_the_group_mean():
    # Same proxy c for every token of every row: W_it = c (t+1) is the same for all rows that
    # reach t, so B*_t is the mean return of those rows (Dr. GRPO's baseline where all reach).
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([5, 3, 6, 4])
    mask = prefix_mask(lengths)
    rewards = torch.rand(4, generator=g, dtype=D)
    adv = optimal_token_baseline(
        outcome_returns(rewards, mask), torch.full((4, 6), 0.3, dtype=D), mask, torch.zeros(4, dtype=torch.long)
    )
    drgrpo = group_advantages(rewards, 4, scale="none")
    torch.testing.assert_close(adv[:, :3], drgrpo[:, None].expand(4, 3), rtol=0, atol=1e-7)
    # t = 3: rows 0, 2, 3 reach it; their mean is the baseline.
    reach = torch.tensor([0, 2, 3])
    torch.testing.assert_close(adv[reach, 3], rewards[reach] - rewards[reach].mean(), rtol=0, atol=1e-7)


def test_float32_in_float32_out():
    returns, proxy, mask, gi = hand_inputs()
    adv = optimal_token_baseline(returns.float(), proxy.float(), mask, gi)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, HAND_ADV.float(), rtol=0, atol=1e-6)


def test_helpers():
    lp = torch.tensor([0.0, -1.0, -0.1])
    s2 = torch.tensor([1.0, 0.2, 0.85])  # sum p^2 >= p_y^2
    expected = torch.tensor([0.0, 1 - 2 * torch.e**-1 + 0.2, 1 - 2 * torch.e**-0.1 + 0.85])
    torch.testing.assert_close(logit_gradient_proxy(lp, s2), expected)
    assert logit_gradient_proxy(lp.double(), s2.bfloat16()).dtype == torch.float32
    # p_y = 1 within rounding: never below 0.
    assert logit_gradient_proxy(torch.tensor([-1e-9]), torch.tensor([1.0 - 4e-9])).item() == 0.0
    mask = prefix_mask([2, 0, 3])
    ret = outcome_returns(torch.tensor([0.5, 1.0, -1.0]), mask)
    assert torch.equal(ret, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [-1.0, -1.0, -1.0]]))


def test_proxy_prefix_lengths():
    lengths = torch.tensor([5, 3, 6, 4, 2, 7, 3])
    gi = torch.tensor([0, 0, 1, 0, 1, 2, 0])
    # group 0: rows 0,1,3,6 keep up to 2,3,0,1 -> t_max 3; group 1: rows 2,4 keep 0,0 -> 0;
    # group 2 (row 5): 4.
    last = torch.tensor([2, 3, 0, 1, 0, 4, 1])
    assert proxy_prefix_lengths(lengths, last, gi).tolist() == [3, 3, 0, 3, 0, 4, 3]
    # t_max 5 is capped by each row's own length.
    last = torch.tensor([5, 0, 0, 0, 0, 0, 0])
    assert proxy_prefix_lengths(lengths, last, gi).tolist() == [5, 3, 0, 4, 0, 0, 3]
    assert proxy_prefix_lengths(lengths, lengths, gi).tolist() == lengths.tolist()


@pytest.mark.parametrize("scheme,budget", [("urs", 0.3), ("rpc", 0.4), ("rpc+urs", 0.3)])
def test_nat_rule_truncated_proxy_is_exact_on_kept_positions(scheme, budget):
    g = torch.Generator().manual_seed(2)
    B, n_groups = 24, 6
    lengths = torch.randint(1, 30, (B,), generator=g)
    gi = torch.randperm(B, generator=g) % n_groups  # interleaved groups of 4
    sel = sample(scheme, budget, lengths, g)
    T = int(lengths.max())
    mask = prefix_mask(lengths, T)
    returns = outcome_returns(torch.rand(B, generator=g, dtype=D), mask)
    proxy = torch.rand(B, T, generator=g, dtype=D)
    positions = torch.arange(1, T + 1)
    last_kept = (sel.mask * positions).amax(-1)  # 1-based, 0 = nothing kept
    assert (last_kept == 0).any() or scheme == "urs"
    prefix = proxy_prefix_lengths(lengths, last_kept, gi)
    beyond = positions[None] > prefix[:, None]
    full = optimal_token_baseline(returns, proxy, mask, gi)
    kept_or_before = positions[None] <= last_kept[:, None]  # every row: t <= its last kept
    changed = False
    for junk in (
        torch.zeros(B, T, dtype=D),
        100 * torch.rand(B, T, generator=g, dtype=D),
        torch.full((B, T), float("nan"), dtype=D),
    ):
        trunc = optimal_token_baseline(returns, torch.where(beyond, junk, proxy), mask, gi)
        torch.testing.assert_close(trunc[kept_or_before], full[kept_or_before], rtol=1e-12, atol=1e-12)
        changed |= not torch.allclose(trunc[mask], full[mask])
    assert changed  # the truncation did change advantages off the kept positions


def test_bad_inputs():
    returns, proxy, mask, gi = hand_inputs()
    with pytest.raises(ValueError, match="returns"):
        optimal_token_baseline(returns[0], proxy, mask, gi)
    with pytest.raises(ValueError, match="proxy"):
        optimal_token_baseline(returns, proxy[:, :3], mask, gi)
    with pytest.raises(ValueError, match="mask"):
        optimal_token_baseline(returns, proxy, mask.float(), gi)
    with pytest.raises(ValueError, match="mask must be a prefix"):
        optimal_token_baseline(returns, proxy, torch.tensor([[True, False, True, False]] * 3), gi)
    with pytest.raises(ValueError, match="group_index"):
        optimal_token_baseline(returns, proxy, mask, gi[:2])
    with pytest.raises(ValueError, match="group_index"):
        optimal_token_baseline(returns, proxy, mask, gi.float())
    with pytest.raises(ValueError, match="eps"):
        optimal_token_baseline(returns, proxy, mask, gi, eps=0.0)
    with pytest.raises(ValueError, match="zero_tail"):
        optimal_token_baseline(returns, proxy, mask, gi, zero_tail=1)
    with pytest.raises(ValueError, match="sum_p2"):
        logit_gradient_proxy(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="mask"):
        outcome_returns(torch.zeros(3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="last_kept"):
        proxy_prefix_lengths(torch.tensor([3, 2]), torch.tensor([4, 0]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="lengths"):
        proxy_prefix_lengths(torch.tensor([3.0, 2.0]), torch.tensor([1, 0]), torch.tensor([0, 0]))
