"""The OTB logit-gradient proxy, 1 - 2 p_y + sum_v p^2 from vocab_parallel_token_stats:
it equals ||e_y - softmax(z)||^2 from the full logits, the squared norm of d log p_y / d z by
autograd, and the same value under TP1 and TP2 (vocabulary padding on the last shard).

One launch of two processes at TP2 (tests/nat/otb_workers.py): each rank computes the TP2
value from its vocabulary slice and the TP1 value from the full logits (Megatron's TP size
overrides; a second launch would cost another ~10 s of imports). Two cases: random peaked
logits (vocab 37 in 40 columns) and a tiny random Llama's logits (vocab 100 in 104 columns).
Padding columns (on the last shard) hold large garbage: they must never enter the softmax.
"""

import pytest
import torch

from tests.launcher import launch

TOL = 1e-6
PAD_GARBAGE = 30.0  # larger than any real logit here: a leak would change every value


def random_case() -> dict:
    g = torch.Generator().manual_seed(0)
    V, width = 37, 40
    logits = 4.0 * torch.randn(3, 5, width, generator=g)
    targets = torch.randint(0, V, (3, 5), generator=g)
    logits[0, 0, targets[0, 0]] = 25.0  # p_y ~ 1: proxy ~ 0
    logits[0, 1, targets[0, 1]] = -25.0  # p_y ~ 0: proxy ~ 1 + sum p^2
    logits[..., V:] = PAD_GARBAGE
    return {"logits": logits, "targets": targets, "vocab_size": V}


def llama_case() -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    V, width = 100, 104
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # the random init gives near-uniform p; sharpen it for variety
        model.lm_head.weight.mul_(50.0)
        ids = torch.randint(0, V, (2, 12))
        z = model(input_ids=ids).logits[:, :-1]
    logits = torch.cat([z, torch.full((*z.shape[:-1], width - V), PAD_GARBAGE)], dim=-1)
    # Sampled tokens: the greedy one at even positions (small proxy), the next input elsewhere.
    even = torch.arange(z.shape[1]) % 2 == 0
    return {"logits": logits, "targets": torch.where(even, z.argmax(-1), ids[:, 1:]), "vocab_size": V}


@pytest.fixture(scope="module")
def runs():
    cases = [random_case(), llama_case()]
    ranks = launch("tests.nat.otb_workers:proxy_on_tp_ranks", 2, cases=cases, tp=2)
    assert [r["tp_size"] for r in ranks] == [2, 2] and [r["tp_size_after"] for r in ranks] == [2, 2]
    return cases, ranks


def results(ranks, k):
    """Case k's results: TP1 and TP2 on each rank."""
    return [r[key][k] for r in ranks for key in ("tp1", "tp")]


def full_vocab_proxy(case) -> torch.Tensor:
    """||e_y - softmax(z)||^2 in plain fp32 torch, on the real vocabulary columns."""
    z = case["logits"][..., : case["vocab_size"]].float()
    p = z.softmax(-1)
    e = torch.nn.functional.one_hot(case["targets"], case["vocab_size"]).float()
    return (e - p).square().sum(-1)


def autograd_proxy(case) -> torch.Tensor:
    """||d log p_y / d z||^2 per position, by autograd on the logits (a leaf)."""
    z = case["logits"][..., : case["vocab_size"]].float().clone().requires_grad_(True)
    logp = z.log_softmax(-1).gather(-1, case["targets"].unsqueeze(-1)).squeeze(-1)
    # log p at a position depends only on that position's logits, so the gradient of the sum
    # holds every position's own gradient d log p_t / d z_t in its row.
    (grad,) = torch.autograd.grad(logp.sum(), z)
    return grad.square().sum(-1)


@pytest.mark.dist
def test_proxy_equals_full_vocab_norm(runs):
    cases, ranks = runs
    for k, case in enumerate(cases):
        ref = full_vocab_proxy(case)
        assert ref.min() < 0.05 and ref.max() > 1.5  # each case spans small and large proxies
        lp = (
            case["logits"][..., : case["vocab_size"]]
            .float()
            .log_softmax(-1)
            .gather(-1, case["targets"].unsqueeze(-1))
            .squeeze(-1)
        )
        for res in results(ranks, k):
            assert res["proxy"].dtype == torch.float32
            torch.testing.assert_close(res["proxy"], ref, rtol=0, atol=TOL)
            torch.testing.assert_close(res["logprobs"], lp, rtol=0, atol=1e-5)


@pytest.mark.dist
def test_proxy_equals_autograd_grad_norm(runs):
    cases, ranks = runs
    for k, case in enumerate(cases):
        ref = autograd_proxy(case)
        for res in results(ranks, k):
            torch.testing.assert_close(res["proxy"], ref, rtol=0, atol=TOL)


@pytest.mark.dist
def test_tp2_equals_tp1(runs):
    cases, ranks = runs
    for k in range(len(cases)):
        tp1_r0, tp2_r0, tp1_r1, tp2_r1 = (r["proxy"] for r in results(ranks, k))
        # Both TP ranks hold the full (all-reduced) result, and agree with TP1.
        assert torch.equal(tp2_r0, tp2_r1) and torch.equal(tp1_r0, tp1_r1)
        torch.testing.assert_close(tp2_r0, tp1_r0, rtol=0, atol=TOL)
