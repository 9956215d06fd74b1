"""NAT loss: hand values, bitwise equality with plain GRPO, global normaliser, unbiasedness."""

import math

import pytest
import torch
from torch import nn

from nat_megatron.nat.loss import (
    AGGREGATIONS,
    LossConfig,
    group_advantages,
    grpo_loss,
    nat_loss,
    nat_loss_sum,
    normaliser_count,
    token_objective,
)
from nat_megatron.nat.selection import sample

LENGTHS = torch.tensor([2, 5, 9, 13])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: on a busy 2-core machine a second intra-op thread mostly waits at
    barriers (observed: 10x slower under load), so run this module single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyPolicy(nn.Module):
    """Bigram policy: log p(token t+1 | token t), and the entropy of that distribution."""

    def __init__(self, vocab=6, dim=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens):
        logp_all = torch.log_softmax(self.out(torch.tanh(self.emb(tokens[:, :-1]))), -1)
        logprobs = logp_all.gather(-1, tokens[:, 1:, None]).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logprobs, entropy


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyPolicy()
    tokens = torch.randint(0, 6, (len(LENGTHS), int(LENGTHS.max()) + 1), generator=g)
    with torch.no_grad():
        lp, _ = model(tokens)
    # Off-policy enough that many ratios leave [0.8, 1.2] and get clipped.
    old = lp + 0.3 * torch.randn(lp.shape, generator=g)
    ref = lp + 0.5 * torch.randn(lp.shape, generator=g)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.2, 0.9]), 2)
    return model, tokens, old, ref, adv


def _cfg(aggregation, constant=None):
    return LossConfig(
        eps_low=0.2,
        eps_high=0.28,
        kl_beta=0.05,
        entropy_coef=0.01,
        aggregation=aggregation,
        seq_token_sum_constant=constant,
    )


CFGS = [_cfg(a) for a in AGGREGATIONS] + [_cfg("seq-mean-token-sum", 16.0)]
CFG_IDS = [c.aggregation + ("-K" if c.seq_token_sum_constant else "") for c in CFGS]


def _tis(old):
    """Fixed truncated-importance weights in [0.5, 2] (the trainer's min(pi_old/pi_rollout, C))."""
    return 0.5 + 1.5 * torch.rand(old.shape, generator=torch.Generator().manual_seed(5))


def _full(model, tokens, old, ref, adv, cfg, tis=False):
    lp, ent = model(tokens)
    loss, _ = grpo_loss(
        lp,
        old_logprobs=old,
        advantages=adv,
        lengths=LENGTHS,
        cfg=cfg,
        ref_logprobs=ref,
        entropy=ent,
        tis_weights=_tis(old) if tis else None,
    )
    return loss.detach(), _flat_grad(loss, model)


def _flat_grad(loss, model):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, model.parameters())])


def _monte_carlo(scheme, budget, cfg, options, *, hajek=False, tis=False, chunks=200, per_chunk=100):
    """Mean and standard error of the estimated loss and gradient over chunks * per_chunk draws.

    Each chunk stacks per_chunk independent draws as one batch: since nat_loss_sum is a sum,
    one call gives the chunk's mean, and the spread of the chunk means gives the SE.
    """
    model, tokens, old, ref, adv = _setup()
    gen = torch.Generator().manual_seed(99)
    lengths = LENGTHS.repeat(per_chunk)
    denom = normaliser_count(LENGTHS, cfg.aggregation) * per_chunk
    n_tok = int(LENGTHS.sum())
    losses, grads = [], []
    for _ in range(chunks):
        sel = sample(scheme, budget, lengths, gen, **options)
        prob = sel.prob
        if hajek:  # divide by the kept count |S| of each draw instead of N: prob' = |S| / N
            kept = sel.mask.view(per_chunk, -1).sum(-1).clamp(min=1).double() / n_tok
            prob = kept.repeat_interleave(len(LENGTHS))[:, None].expand_as(prob)
        lp, ent = model(tokens)
        lp, old_r, ref_r, ent = (x.repeat(per_chunk, 1) for x in (lp, old, ref, ent))
        tis_r = _tis(old).repeat(per_chunk, 1) if tis else None
        loss_sum, _ = nat_loss_sum(
            lp,
            old_logprobs=old_r,
            advantages=adv.repeat(per_chunk),
            selection_mask=sel.mask,
            selection_prob=prob,
            lengths=lengths,
            cfg=cfg,
            ref_logprobs=ref_r,
            entropy=ent,
            tis_weights=tis_r,
        )
        loss = loss_sum / denom
        grads.append(_flat_grad(loss, model))
        losses.append(loss.detach())
    losses, grads = torch.stack(losses).double(), torch.stack(grads).double()
    root = math.sqrt(chunks)
    return losses.mean(), losses.std() / root, grads.mean(0), grads.std(0) / root


MC_SCHEMES = [
    ("urs", 0.25, {}),
    ("rpc", 0.25, {}),
    ("rpc", 0.5, {"rpc_floor": 0.1}),
    ("rpc+urs", 0.25, {"urs_budget": 0.5}),
]


@pytest.mark.parametrize("cfg", CFGS, ids=CFG_IDS)
@pytest.mark.parametrize("scheme,budget,options", MC_SCHEMES, ids=[f"{s}-{b}-{o}" for s, b, o in MC_SCHEMES])
def test_monte_carlo_loss_and_gradient_are_unbiased(scheme, budget, options, cfg):
    full_loss, full_grad = _full(*_setup(), cfg)
    loss, loss_se, grad, grad_se = _monte_carlo(scheme, budget, cfg, options)
    assert loss_se > 0 and abs(float(loss - full_loss)) <= 4 * float(loss_se)
    assert (grad_se > 0).sum() > len(grad) // 2, "most gradient components must vary"
    assert ((grad - full_grad.double()).abs() <= 4 * grad_se + 1e-9).all(), (
        (grad - full_grad.double()).abs() / grad_se
    ).max()


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("scheme,budget,options", MC_SCHEMES[1:3], ids=["rpc-0.25", "rpc-0.5-floor"])
def test_monte_carlo_unbiased_with_kl_tis_and_dual_clip(scheme, budget, options, estimator):
    """The KL term (each estimator), TIS weights and the dual clip carry the same 1/pi weight
    as the policy term: the estimate stays unbiased (loss and every gradient component)."""
    cfg = LossConfig(
        eps_low=0.2,
        eps_high=0.28,
        kl_beta=0.5,
        kl_estimator=estimator,
        clip_ratio_c=1.5,
        tis_cap=2.0,
        old_logprobs="recompute",
        entropy_coef=0.01,
    )
    full_loss, full_grad = _full(*_setup(), cfg, tis=True)
    loss, loss_se, grad, grad_se = _monte_carlo(scheme, budget, cfg, options, tis=True)
    assert loss_se > 0 and abs(float(loss - full_loss)) <= 4 * float(loss_se)
    assert ((grad - full_grad.double()).abs() <= 4 * grad_se + 1e-9).all(), (
        (grad - full_grad.double()).abs() / grad_se
    ).max()


def test_hajek_estimator_is_detected_as_biased():
    """The same check must fail for a biased estimator, or it has no power."""
    cfg = _cfg("token-mean")
    full_loss, full_grad = _full(*_setup(), cfg)
    loss, loss_se, grad, grad_se = _monte_carlo("rpc", 0.25, cfg, {}, hajek=True)
    z_loss = abs(float(loss - full_loss)) / float(loss_se)
    z_grad = ((grad - full_grad.double()).abs() / grad_se.clamp(min=1e-12)).max()
    assert z_loss > 4 and z_grad > 4, (z_loss, z_grad)  # about 19 and 130 at this seed


@pytest.mark.parametrize("cfg", CFGS, ids=CFG_IDS)
def test_scheme_none_equals_plain_grpo_bitwise(cfg):
    model, tokens, old, ref, adv = _setup()
    sel = sample("none", 1.0, LENGTHS, torch.Generator())
    results = []
    for use_nat in (True, False):
        model.zero_grad()
        lp, ent = model(tokens)
        lp.retain_grad()
        kw = dict(old_logprobs=old, advantages=adv, lengths=LENGTHS, cfg=cfg, ref_logprobs=ref, entropy=ent)
        if use_nat:
            loss, metrics = nat_loss(lp, selection_mask=sel.mask, selection_prob=sel.prob, **kw)
        else:
            loss, metrics = grpo_loss(lp, **kw)
        loss.backward()
        results.append((loss, lp.grad, [p.grad.clone() for p in model.parameters()], metrics))
    (l1, g1, p1, m1), (l2, g2, p2, m2) = results
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)


def test_micro_batches_with_global_normaliser_match_the_whole_batch():
    model, tokens, old, ref, adv = _setup()
    sel = sample("rpc+urs", 0.5, LENGTHS, torch.Generator().manual_seed(3))
    splits = [[0, 3], [1], [2]]  # uneven: lengths 2+13, 5, 9

    def run(cfg, per_micro_batch_mean=False):
        model.zero_grad()
        lp, ent = model(tokens)

        def kw(i):
            return dict(
                old_logprobs=old[i],
                advantages=adv[i],
                selection_mask=sel.mask[i],
                selection_prob=sel.prob[i],
                lengths=LENGTHS[i],
                cfg=cfg,
                ref_logprobs=ref[i],
                entropy=ent[i],
            )

        if per_micro_batch_mean:  # Megatron-style averaging: each micro-batch by its own count
            total = sum(nat_loss(lp[i], **kw(i))[0] for i in splits) / len(splits)
        else:
            count = sum(normaliser_count(LENGTHS[i], cfg.aggregation) for i in splits)
            assert count == normaliser_count(LENGTHS, cfg.aggregation)
            total = sum(nat_loss_sum(lp[i], **kw(i))[0] for i in splits) / count
        total.backward()
        return total.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    for cfg in CFGS:
        model.zero_grad()
        lp, ent = model(tokens)
        whole, _ = nat_loss(
            lp,
            old_logprobs=old,
            advantages=adv,
            selection_mask=sel.mask,
            selection_prob=sel.prob,
            lengths=LENGTHS,
            cfg=cfg,
            ref_logprobs=ref,
            entropy=ent,
        )
        whole.backward()
        whole_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        split_loss, split_grad = run(cfg)
        assert torch.allclose(split_loss, whole.detach(), atol=1e-7, rtol=0)
        assert torch.allclose(split_grad, whole_grad, atol=1e-7, rtol=0)
        naive_loss, _ = run(cfg, per_micro_batch_mean=True)
        assert abs(float(naive_loss - whole)) > 1e-4, cfg.aggregation


def _one_token(logp, old, adv, cfg, ref=None):
    lp = torch.tensor([[logp]], requires_grad=True)
    loss, metrics = grpo_loss(
        lp,
        old_logprobs=torch.tensor([[old]]),
        advantages=torch.tensor([adv]),
        lengths=torch.tensor([1]),
        cfg=cfg,
        ref_logprobs=None if ref is None else torch.tensor([[ref]]),
    )
    return float(loss), metrics


def test_clip_and_k3_by_hand():
    cfg = LossConfig(eps_low=0.2, eps_high=0.3)
    up, down = math.log(1.5), math.log(0.5)
    # rho = 1.5: A > 0 takes the clipped 1.3 * A; A < 0 takes the unclipped rho * A.
    assert _one_token(up, 0.0, 2.0, cfg)[0] == pytest.approx(-2.6)
    assert _one_token(up, 0.0, -2.0, cfg)[0] == pytest.approx(3.0)
    # rho = 0.5: A > 0 takes rho * A; A < 0 takes the clipped 0.8 * A.
    assert _one_token(down, 0.0, 2.0, cfg)[0] == pytest.approx(-1.0)
    assert _one_token(down, 0.0, -2.0, cfg)[0] == pytest.approx(1.6)
    loss, metrics = _one_token(up, 0.0, 2.0, cfg)
    assert float(metrics["clip_fraction"]) == 1.0
    assert float(metrics["ratio_mean"]) == pytest.approx(1.5)
    assert float(_one_token(down, 0.0, 2.0, cfg)[1]["clip_fraction"]) == 0.0
    # k3 with ref - logp = log 2: 2 - log 2 - 1; beta = 0.5; on-policy so the PG term is -A.
    kl = LossConfig(kl_beta=0.5)
    loss, metrics = _one_token(0.0, 0.0, 1.0, kl, ref=math.log(2.0))
    assert float(metrics["kl_mean"]) == pytest.approx(1 - math.log(2.0))
    assert loss == pytest.approx(-1.0 + 0.5 * (1 - math.log(2.0)))
    # Per-token values directly, with separate eps_low / eps_high.
    lp = torch.log(torch.tensor([[0.7, 1.0, 1.4]]))
    loss, ratio, clipped, _ = token_objective(
        lp, torch.zeros(1, 3), torch.tensor([-1.0]), LossConfig(eps_low=0.1, eps_high=0.3)
    )
    assert torch.allclose(loss, torch.tensor([[0.9, 1.0, 1.4]]))
    assert clipped.tolist() == [[True, False, False]]


def test_aggregation_normalisers_by_hand():
    """Per-token losses 1..: token-mean / N, seq-mean-token-mean 1/T_i, token-sum / K."""
    lengths = torch.tensor([1, 3])
    lp = torch.zeros(2, 3)  # on-policy: l_it = -A_i
    adv = torch.tensor([-1.0, -2.0])

    def val(aggregation, constant=None):
        cfg = LossConfig(aggregation=aggregation, seq_token_sum_constant=constant)
        return float(grpo_loss(lp, old_logprobs=lp, advantages=adv, lengths=lengths, cfg=cfg)[0])

    assert val("token-mean") == pytest.approx((1 + 3 * 2) / 4)
    assert val("seq-mean-token-mean") == pytest.approx((1 + 2) / 2)
    assert val("seq-mean-token-sum") == pytest.approx((1 + 6) / 2)
    assert val("seq-mean-token-sum", 4.0) == pytest.approx((1 / 4 + 6 / 4) / 2)
    assert normaliser_count(lengths, "token-mean") == 4
    assert normaliser_count(lengths, "seq-mean-token-mean") == 2


def test_weights_and_ignored_positions():
    """Kept tokens weigh 1/prob; garbage beyond lengths or at dropped tokens changes nothing."""
    lengths = torch.tensor([2, 3])
    mask = torch.tensor([[True, False, False], [False, True, True]])
    prob = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]], dtype=torch.float64)
    clean = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    cfg = LossConfig()
    loss, m = nat_loss_sum(
        clean,
        old_logprobs=torch.zeros(2, 3),
        advantages=adv,
        selection_mask=mask,
        selection_prob=prob,
        lengths=lengths,
        cfg=cfg,
    )
    assert float(loss) == pytest.approx(-1 / 0.5 + 1 / 0.25 + 1 / 0.5)
    assert float(m["weight_sum"]) == pytest.approx(8.0) and int(m["kept_tokens"]) == 3
    dirty = torch.tensor([[0.0, float("nan"), float("inf")], [-float("inf"), 0.0, 0.0]], requires_grad=True)
    dirty_old = torch.full((2, 3), float("nan")).masked_fill(mask, 0.0)
    loss2, _ = nat_loss_sum(
        dirty,
        old_logprobs=dirty_old,
        advantages=adv,
        selection_mask=mask,
        selection_prob=prob,
        lengths=lengths,
        cfg=cfg,
    )
    loss.backward()
    loss2.backward()
    assert torch.equal(loss, loss2) and torch.equal(clean.grad, dirty.grad)
    assert torch.isfinite(dirty.grad).all()


def test_truncated_width_matches_full_width():
    """RPC forward on prefixes only: [B, max cut] inputs give the same loss as [B, T_max]."""
    model, tokens, old, ref, adv = _setup()
    sel = sample("rpc", 0.5, LENGTHS, torch.Generator().manual_seed(4))
    width = int(sel.cut.max())
    assert width < int(LENGTHS.max())
    cfg = _cfg("seq-mean-token-mean")
    lp, ent = model(tokens)

    def kw(w):
        return dict(
            old_logprobs=old[:, :w],
            advantages=adv,
            selection_mask=sel.mask[:, :w],
            selection_prob=sel.prob[:, :w],
            lengths=LENGTHS,
            cfg=cfg,
            ref_logprobs=ref[:, :w],
            entropy=ent[:, :w],
        )

    full, _ = nat_loss(lp, **kw(lp.shape[1]))
    short, _ = nat_loss(lp[:, :width], **kw(width))
    assert torch.allclose(full, short, atol=1e-7, rtol=0)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 3.0, 3.0, 2.0, 4.0])
    a = group_advantages(r, 2)
    s = math.sqrt(0.5)  # unbiased std of {0, 1}
    assert torch.allclose(
        a, torch.tensor([0.5 / (s + 1e-6), -0.5 / (s + 1e-6), 0, 0, -1 / (2 * s + 1e-6), 1 / (2 * s + 1e-6)])
    )
    assert torch.allclose(group_advantages(r, 3, scale="none"), torch.tensor([-1 / 3, -4 / 3, 5 / 3, 0, -1, 1]))
    assert torch.equal(group_advantages(r, 1), torch.zeros(6))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(eps_low=-0.1), "eps_low"),
        (dict(eps_low=1.5), "eps_low"),
        (dict(eps_high=float("inf")), "eps_high"),
        (dict(kl_beta=-1.0), "kl_beta"),
        (dict(entropy_coef=float("nan")), "entropy_coef"),
        (dict(aggregation="mean"), "aggregation"),
        (dict(seq_token_sum_constant=4.0), "seq_token_sum_constant"),
        (dict(aggregation="seq-mean-token-sum", seq_token_sum_constant=0.0), "seq_token_sum_constant"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)


def test_bad_loss_inputs_raise():
    lp = torch.zeros(2, 3)
    ok = dict(
        old_logprobs=lp,
        advantages=torch.zeros(2),
        selection_mask=lp > -1,
        selection_prob=torch.ones(2, 3),
        lengths=torch.tensor([3, 3]),
        cfg=LossConfig(),
    )
    cases = [
        (dict(old_logprobs=torch.zeros(2, 4)), "old_logprobs"),
        (dict(advantages=torch.zeros(3)), "advantages"),
        (dict(selection_mask=torch.ones(2, 3)), "selection_mask"),
        (dict(selection_prob=torch.ones(2, 2)), "selection_prob"),
        (dict(lengths=torch.tensor([3.0, 3.0])), "lengths"),
        (dict(lengths=torch.tensor([3, 0])), "lengths"),
        (dict(lengths=torch.tensor([2, 3])), "beyond a response's length"),
        (dict(selection_prob=torch.zeros(2, 3)), "selection_prob"),
        (dict(cfg=LossConfig(kl_beta=0.1)), "ref_logprobs"),
        (dict(cfg=LossConfig(entropy_coef=0.1)), "entropy"),
        (dict(cfg="token-mean"), "LossConfig"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            nat_loss_sum(lp, **{**ok, **change})
    with pytest.raises(ValueError, match="logprobs"):
        nat_loss_sum(lp[0], **ok)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(6), 3, scale="mad")
    with pytest.raises(ValueError, match="aggregation"):
        normaliser_count(torch.tensor([3]), "sum")


def test_kl_estimators_by_hand():
    from nat_megatron.nat.loss import kl_penalty

    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    d = math.log(0.5) - math.log(0.25)  # log(pi / pi_ref) = log 2
    assert float(kl_penalty(lp, ref, "k1")) == pytest.approx(d)
    assert float(kl_penalty(lp, ref, "k2")) == pytest.approx(0.5 * d * d)
    assert float(kl_penalty(lp, ref, "k3")) == pytest.approx(0.5 - math.log(0.5) - 1)  # r - log r - 1
    # k3 is clamped like verl's low_var_kl: log-ratio to +-20, the estimate to +-10.
    assert float(kl_penalty(torch.tensor([0.0]), torch.tensor([-5.0]), "k3")) == pytest.approx(math.exp(-5) + 5 - 1)
    assert float(kl_penalty(torch.tensor([0.0]), torch.tensor([-50.0]), "k3")) == 10.0
    assert float(kl_penalty(torch.tensor([-50.0]), torch.tensor([0.0]), "k3")) == 10.0
    # The estimator enters the loss with kl_beta; on-policy, so the PG term is -A.
    for est, value in (("k1", d), ("k2", 0.5 * d * d)):
        cfg = LossConfig(kl_beta=0.5, kl_estimator=est)
        loss, metrics = _one_token(math.log(0.5), math.log(0.5), 1.0, cfg, ref=math.log(0.25))
        assert loss == pytest.approx(-1.0 + 0.5 * value)
        assert float(metrics["kl_mean"]) == pytest.approx(value)


def test_dual_clip_and_tis_by_hand():
    cfg = LossConfig(eps_low=0.2, eps_high=0.2, clip_ratio_c=3.0)
    # rho = 5, A = -1: plain PPO gives max(5, 1.2) = 5; dual clip caps it at -A * c = 3.
    assert _one_token(math.log(5.0), 0.0, -1.0, cfg)[0] == pytest.approx(3.0)
    assert _one_token(math.log(5.0), 0.0, -1.0, LossConfig())[0] == pytest.approx(5.0)
    # A > 0 is untouched by the dual clip: min(5 * 2, 1.2 * 2) -> -2.4.
    assert _one_token(math.log(5.0), 0.0, 2.0, cfg)[0] == pytest.approx(-2.4)
    # TIS weights multiply the policy term (not the KL term), per token.
    lp = torch.zeros(1, 2)
    tis = torch.tensor([[0.5, 2.0]])
    loss, _, _, _ = token_objective(
        lp, lp, torch.tensor([1.0]), LossConfig(kl_beta=1.0, kl_estimator="k1"), ref_logprobs=lp - 1.0, tis_weights=tis
    )
    assert torch.allclose(loss, torch.tensor([[-0.5 + 1.0, -2.0 + 1.0]]))
    # Clip sides: rho 0.5 with A < 0 is clipped low, rho 1.5 with A > 0 clipped high.
    _, low = _one_token(math.log(0.5), 0.0, -1.0, LossConfig())
    _, high = _one_token(math.log(1.5), 0.0, 1.0, LossConfig())
    assert float(low["clip_low_fraction"]) == 1.0 and float(low["clip_high_fraction"]) == 0.0
    assert float(high["clip_high_fraction"]) == 1.0 and float(high["ratio_max"]) == pytest.approx(1.5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(clip_ratio_c=1.0), "clip_ratio_c"),
        (dict(tis_cap=2.0), "tis_cap needs"),
        (dict(tis_cap=0.0, old_logprobs="recompute"), "tis_cap"),
        (dict(old_logprobs="engine"), "old_logprobs"),
    ],
)
def test_new_loss_keys_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)
