"""Functions run by tests.launcher for the rollout tests (each rank a fresh process)."""

from __future__ import annotations

import time

import torch

from nat_megatron.rollout.engine import RolloutEngine, SamplingConfig

ENGINE = dict(dtype="float32", max_model_len=256, kv_cache_gb=0.25, enforce_eager=True)


def logprob_mismatch(engine_logprobs: list[list[float]], trainer_logprobs: list[torch.Tensor]) -> dict:
    """Mean and max |engine - trainer| over the same sampled tokens."""
    a = torch.tensor([x for row in engine_logprobs for x in row], dtype=torch.float64)
    b = torch.cat([torch.as_tensor(t, dtype=torch.float64).reshape(-1) for t in trainer_logprobs])
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a - b).abs()
    return {"mean_abs": diff.mean().item(), "max_abs": diff.max().item()}


def hf_token_logprobs(model, prompts, groups) -> list[torch.Tensor]:
    """transformers' log-probs of every completion's tokens, in generate() order."""
    out = []
    for prompt, group in zip(prompts, groups):
        for c in group:
            ids = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                lp = model(ids).logits[0].float().log_softmax(-1)
            out.append(lp[len(prompt) - 1 : -1].gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0])
    return out


def engine_lps(groups) -> list[list[float]]:
    return [c.logprobs for g in groups for c in g]


def engine_vs_hf(*, hf_dir: str, prompts: list[list[int]], max_new_tokens: int) -> dict:
    """Generate, compare with transformers; push perturbed weights, compare; push originals back."""
    from transformers import AutoModelForCausalLM

    res = {}
    t = time.perf_counter()
    engine = RolloutEngine(hf_dir, **ENGINE)
    res["init_s"] = time.perf_counter() - t
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    sampling, seeds = SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens, n=2), [0, 1]
    engine.generate(prompts, sampling, seeds)  # first call warms up
    t = time.perf_counter()
    base = engine.generate(prompts, sampling, seeds)
    res["gen_s"] = time.perf_counter() - t
    res["gen_tokens"] = sum(len(c.token_ids) for g in base for c in g)
    res["finish"] = sorted({c.finish_reason for g in base for c in g})
    res["base"] = logprob_mismatch(engine_lps(base), hf_token_logprobs(hf, prompts, base))

    original = {k: v.clone() for k, v in hf.state_dict().items()}
    with torch.no_grad():  # the tied embedding too: the output layer must follow it
        for name, p in hf.named_parameters():
            if "layers.3." in name or "layers.17." in name or "embed_tokens" in name:
                p.mul_(1.05)
    res["stale"] = logprob_mismatch(engine_lps(base), hf_token_logprobs(hf, prompts, base))
    t = time.perf_counter()
    engine.update_weights((k, v) for k, v in hf.state_dict().items() if k != "lm_head.weight")
    res["update_s"] = time.perf_counter() - t
    pert = engine.generate(prompts, sampling, seeds)
    res["perturbed"] = logprob_mismatch(engine_lps(pert), hf_token_logprobs(hf, prompts, pert))

    engine.update_weights(original.items())
    again = engine.generate(prompts, sampling, seeds)
    res["restored_tokens_equal"] = [c.token_ids for g in again for c in g] == [c.token_ids for g in base for c in g]
    res["restored"] = logprob_mismatch(engine_lps(again), [torch.tensor(x) for x in engine_lps(base)])
    engine.close()
    return res
