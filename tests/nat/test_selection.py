"""Selection: exact inclusion probabilities (closed form and Monte-Carlo), budgets, determinism."""

import math

import pytest
import torch

from nat_megatron.nat.selection import Selection, rpc_inclusion_prob, sample, selection_generators

LENGTHS = torch.tensor([1, 2, 3, 5, 8, 13])
DRAWS = 20_000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: on a busy 2-core machine a second intra-op thread mostly waits at
    barriers (observed: 10x slower under load), so run this module single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (scheme, budget, options, expected kept fraction)
MC_CASES = [
    *[("urs", b, {}, b) for b in (0.25, 0.5, 0.75)],
    *[("rpc", b, {}, b) for b in (0.25, 0.5, 0.75)],
    *[("rpc+urs", b, {}, b) for b in (0.25, 0.5, 0.75)],
    ("rpc+urs", 0.25, {"urs_budget": 0.5, "rpc_floor": 0.2}, 0.25),
    ("rpc", 0.25, {"rpc_floor": 0.1}, 0.25),
    ("rpc", 0.5, {"rpc_floor": 0.5}, 0.5),  # floor == budget: whole response or nothing
    ("urs", 0.3, {"urs_fixed_count": True}, sum(math.ceil(0.3 * t) for t in LENGTHS.tolist()) / int(LENGTHS.sum())),
]


@pytest.mark.parametrize("scheme,budget,options,expected", MC_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in MC_CASES])
def test_monte_carlo_inclusion_matches_prob(scheme, budget, options, expected):
    gen = torch.Generator().manual_seed(1234)
    sel = sample(scheme, budget, LENGTHS.repeat(DRAWS), gen, **options)
    B, T = len(LENGTHS), int(LENGTHS.max())
    prob = sel.prob.view(DRAWS, B, T)
    assert torch.equal(prob, prob[:1].expand_as(prob)), "prob must not depend on the draw"
    prob = prob[0]
    valid = torch.arange(T)[None] < LENGTHS[:, None]
    assert (prob[valid] > 0).all() and (prob[~valid] == 0).all() and (prob <= 1).all()

    freq = sel.mask.view(DRAWS, B, T).double().mean(0)
    se = (prob * (1 - prob) / DRAWS).sqrt()
    assert ((freq - prob).abs() <= 4 * se).all(), (freq - prob).abs() / se

    # Kept fraction: its exact expectation, and the Monte-Carlo mean within 4 SE.
    assert float(prob.sum()) / int(LENGTHS.sum()) == pytest.approx(expected, abs=1e-12)
    per_draw = sel.mask.view(DRAWS, -1).sum(-1).double() / int(LENGTHS.sum())
    se_frac = float(per_draw.std()) / math.sqrt(DRAWS)
    assert abs(float(per_draw.mean()) - expected) <= 4 * se_frac

    # Every kept position lies inside the kept prefix; pure RPC keeps the whole prefix.
    t = torch.arange(T)[None]
    assert not (sel.mask & (t >= sel.cut[:, None])).any()
    if scheme == "rpc":
        assert torch.equal(sel.mask, t < sel.cut[:, None])
    if scheme == "urs":
        assert torch.equal(sel.cut, sel.lengths)
    if options.get("urs_fixed_count"):
        k = torch.ceil(0.3 * LENGTHS.double() - 1e-9).long().repeat(DRAWS)
        assert torch.equal(sel.mask.sum(-1), k)


def test_rpc_cut_distribution_is_the_discrete_one_pi_describes():
    """P(C = c) = pi_c - pi_{c+1} (pi_0 = 1, pi_{T+1} = 0), C = 0 included."""
    lengths = torch.tensor([4, 7])
    gen = torch.Generator().manual_seed(7)
    for budget in (0.25, 0.75):
        sel = sample("rpc", budget, lengths.repeat(DRAWS), gen)
        pi = rpc_inclusion_prob(lengths, budget)
        for i, T in enumerate(lengths.tolist()):
            surv = torch.cat([torch.ones(1), pi[i, :T], torch.zeros(1)]).double()
            p_c = surv[:-1] - surv[1:]  # c = 0..T
            cuts = sel.cut.view(DRAWS, -1)[:, i]
            freq = torch.bincount(cuts, minlength=T + 1).double() / DRAWS
            se = (p_c * (1 - p_c) / DRAWS).sqrt()
            assert (p_c >= 0).all()
            assert ((freq - p_c).abs() <= 4 * se).all()


@pytest.mark.parametrize("floor", [0.0, 0.05, 0.2])
def test_rpc_expected_fraction_is_exact_for_every_length(floor):
    lengths = torch.arange(1, 400)
    for budget in (0.2, 0.25, 0.3, 0.5, 0.5001, 0.75, 0.9, 0.999):
        pi = rpc_inclusion_prob(lengths, budget, floor=floor)
        valid = torch.arange(int(lengths.max()))[None] < lengths[:, None]
        rel = (pi.sum(-1) - budget * lengths.double()) / lengths.double()
        assert rel.abs().max() < 1e-13
        assert (pi[valid] > 0).all() and (pi[~valid] == 0).all() and (pi <= 1).all()
        assert (pi[:, :-1] >= pi[:, 1:]).all(), "a survival function must not increase"
        if floor:
            assert (pi[valid] >= floor - 1e-15).all(), "the floor bounds every weight"


def test_rpc_half_budget_near_uniform_cut_and_closed_form():
    lengths = torch.tensor([5])
    t = torch.arange(1, 6, dtype=torch.float64)
    # b = (T+1)/(2T) is exactly the uniform cut of nat.md, pi_t = (T - t + 1)/T.
    assert torch.allclose(rpc_inclusion_prob(lengths, 0.6)[0], (6 - t) / 5, atol=1e-15)
    # Low branch: pi_t = 2b(T - t + 1)/(T + 1).
    assert torch.allclose(rpc_inclusion_prob(lengths, 0.3)[0], 0.6 * (6 - t) / 6, atol=1e-15)
    # High branch: w = (2bT - T - 1)/(T - 1), pi_t = w + (1 - w)(T - t + 1)/T.
    w = (2 * 0.8 * 5 - 6) / 4
    assert torch.allclose(rpc_inclusion_prob(lengths, 0.8)[0], w + (1 - w) * (6 - t) / 5, atol=1e-15)


@pytest.mark.parametrize(
    "scheme,options", [("urs", {}), ("rpc", {}), ("rpc", {"rpc_floor": 0.3}), ("rpc+urs", {"urs_budget": 1.0})]
)
def test_budget_one_keeps_everything_with_prob_one(scheme, options):
    gen = torch.Generator().manual_seed(0)
    full = sample("none", 1.0, LENGTHS, gen)
    sel = sample(scheme, 1.0, LENGTHS, gen, **options)
    assert torch.equal(sel.mask, full.mask) and torch.equal(sel.cut, LENGTHS)
    assert torch.equal(sel.prob, full.prob)
    assert (full.prob[full.mask] == 1.0).all() and full.kept_fraction == 1.0


def test_same_generator_seed_gives_same_selection():
    a = sample("rpc+urs", 0.4, LENGTHS, torch.Generator().manual_seed(5))
    b = sample("rpc+urs", 0.4, LENGTHS, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip((a.mask, a.prob, a.cut), (b.mask, b.prob, b.cut)))


@pytest.mark.parametrize("scheme", ["urs", "rpc", "rpc+urs"])
def test_per_sample_generators_ignore_batch_order_and_padding(scheme):
    ids = [11, 3, 42, 7]
    lengths = torch.tensor([6, 3, 9, 4])
    base = sample(scheme, 0.5, lengths, selection_generators(1, 17, ids))
    # A different rank holds the same samples in another order, next to a longer one.
    order = [2, 0, 3, 1]
    other = sample(
        scheme,
        0.5,
        torch.cat([lengths[order], torch.tensor([20])]),
        selection_generators(1, 17, [ids[i] for i in order] + [99]),
    )
    for j, i in enumerate(order):
        n = int(lengths[i])
        assert torch.equal(other.mask[j, :n], base.mask[i, :n])
        assert torch.equal(other.prob[j, :n], base.prob[i, :n])
        assert int(other.cut[j]) == int(base.cut[i])
    # Another step draws differently.
    later = sample(scheme, 0.5, lengths, selection_generators(1, 18, ids))
    assert not torch.equal(later.mask, base.mask)


def test_selection_telemetry_by_hand():
    mask = torch.tensor([[True, False, True], [True, False, False]])
    prob = torch.tensor([[0.5, 0.5, 0.25], [1.0, 0.0, 0.0]], dtype=torch.float64)
    sel = Selection(mask, prob, torch.tensor([3, 1]), torch.tensor([3, 1]))
    assert sel.kept_tokens == 3 and sel.total_tokens == 4 and sel.kept_fraction == 0.75
    assert sel.weight_max == 4.0 and sel.weight_mean == pytest.approx(7 / 3)
    assert torch.equal(sel.weights, torch.tensor([[2.0, 0, 4.0], [1.0, 0, 0]], dtype=torch.float64))
    assert set(sel.telemetry()) == {"kept_fraction", "weight_max", "weight_mean"}
    empty = Selection(mask & False, prob, torch.tensor([0, 0]), torch.tensor([3, 1]))
    assert empty.weight_max == 0.0 and empty.weight_mean == 0.0 and empty.kept_fraction == 0.0


GEN = torch.Generator().manual_seed(0)
BAD = [
    (("urs", 0.0, LENGTHS), {}, "budget"),
    (("urs", 1.5, LENGTHS), {}, "budget"),
    (("urs", float("nan"), LENGTHS), {}, "budget"),
    (("urs", True, LENGTHS), {}, "budget"),
    (("urs", "0.5", LENGTHS), {}, "budget"),
    (("none", 0.5, LENGTHS), {}, "budget=1.0"),
    (("random", 0.5, LENGTHS), {}, "scheme"),
    (("urs", 0.5, LENGTHS[None]), {}, "1-D"),
    (("urs", 0.5, LENGTHS.float()), {}, "integer dtype"),
    (("urs", 0.5, torch.tensor([3, -1])), {}, ">= 0"),
    (("urs", 0.5, torch.tensor([], dtype=torch.long)), {}, "non-empty"),
    (("urs", 0.5, [3, 4]), {}, "lengths"),
    (("urs", 0.5, LENGTHS), {"urs_fixedcount": True}, "urs_fixedcount"),
    (("rpc", 0.5, LENGTHS), {"urs_fixed_count": True}, "urs_fixed_count"),
    (("urs", 0.5, LENGTHS), {"urs_fixed_count": 1}, "urs_fixed_count"),
    (("rpc", 0.5, LENGTHS), {"rpc_floor": 0.6}, "rpc_floor"),
    (("rpc", 0.5, LENGTHS), {"rpc_floor": -0.1}, "rpc_floor"),
    (("rpc", 1.0, LENGTHS), {"rpc_floor": 1.0}, "rpc_floor"),
    (("rpc+urs", 0.5, LENGTHS), {"urs_budget": 0.4}, "urs_budget"),
    (("rpc+urs", 0.5, LENGTHS), {"urs_budget": 0.0}, "urs_budget"),
    (("rpc+urs", 0.25, LENGTHS), {"urs_budget": 0.5, "rpc_floor": 0.6}, "rpc_floor"),
]


@pytest.mark.parametrize("args,options,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_raises_value_error_naming_the_field(args, options, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        sample(*args, GEN, **options)


def test_bad_generator_list_and_bad_floor_in_closed_form():
    with pytest.raises(ValueError, match="generator"):
        sample("urs", 0.5, LENGTHS, selection_generators(0, 0, range(3)))
    with pytest.raises(ValueError, match="rpc_floor"):
        rpc_inclusion_prob(LENGTHS, 0.3, floor=0.4)


@pytest.mark.parametrize("scheme,budget", [("none", 1.0), ("urs", 0.5), ("rpc", 0.5), ("rpc+urs", 0.5)])
def test_empty_response_keeps_nothing(scheme, budget):
    lengths = torch.tensor([0, 5, 0])
    sel = sample(scheme, budget, lengths, selection_generators(0, 1, range(3)))
    assert sel.cut[0] == 0 and sel.cut[2] == 0
    assert not sel.mask[0].any() and not sel.mask[2].any()
    assert sel.total_tokens == 5
    everything_empty = sample(scheme, budget, torch.tensor([0, 0]), selection_generators(0, 1, range(2)))
    assert everything_empty.kept_tokens == 0 and everything_empty.cut.tolist() == [0, 0]
