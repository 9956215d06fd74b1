"""Functions run by tests.launcher for the rollout tests (each rank a fresh process)."""

from __future__ import annotations

import time
import zlib

import torch
import torch.distributed as dist

from nat_megatron.rollout.engine import RolloutEngine, SamplingConfig, logprob_mismatch

ENGINE = dict(dtype="float32", max_model_len=256, kv_cache_gib=0.25)


def hf_token_logprobs(model, prompts, groups) -> list[torch.Tensor]:
    """transformers' log-probs of every completion's tokens, in generate() order."""
    out = []
    for prompt, group in zip(prompts, groups):
        for c in group:
            ids = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                lp = model(ids).logits[0].float().log_softmax(-1)
            out.append(lp[len(prompt) - 1:-1].gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0])
    return out


def engine_lps(groups) -> list[list[float]]:
    return [c.logprobs for g in groups for c in g]


def engine_vs_hf(*, hf_dir: str, prompts: list[list[int]], max_new_tokens: int) -> dict:
    """Generate, compare with transformers; push perturbed weights, compare; push originals back."""
    from transformers import AutoModelForCausalLM

    res = {}
    t = time.perf_counter()
    engine = RolloutEngine(hf_dir, SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens, n=2,
                                                  seed=0), **ENGINE)
    res["init_s"] = time.perf_counter() - t
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    engine.generate(prompts)  # first call warms up
    t = time.perf_counter()
    base = engine.generate(prompts)
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
    pert = engine.generate(prompts)
    res["perturbed"] = logprob_mismatch(engine_lps(pert), hf_token_logprobs(hf, prompts, pert))

    engine.update_weights(original.items())
    again = engine.generate(prompts)
    res["restored_tokens_equal"] = [c.token_ids for g in again for c in g] == [c.token_ids for g in base for c in g]
    res["restored"] = logprob_mismatch(engine_lps(again), engine_lps(base))
    return res


def _perturb(chunks) -> None:
    """Deterministic multiplicative noise keyed by global name (tied copies get the same)."""
    from nat_megatron.checkpoint.hf_mapping import global_name

    with torch.no_grad():
        for chunk in chunks:
            for local, p in chunk.named_parameters():
                name = global_name(chunk, local)
                if name == "output_layer.weight" and chunk.share_embeddings_and_output_weights:
                    name = "embedding.word_embeddings.weight"
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g))


def _megatron_logprobs(chunks, arch, seqs: list[list[int]]) -> list[torch.Tensor] | None:
    """Per-position log p(next token) of each sequence, on every rank."""
    from megatron.core import parallel_state

    from nat_megatron.train.forward_backward import MicroBatch, forward_backward

    mbs = []
    for s in seqs:
        tok = torch.tensor([s])
        tgt = torch.cat([tok[:, 1:], tok[:, :1]], dim=1)
        mbs.append(MicroBatch(tokens=tok, targets=tgt, count=1))
    outs = forward_backward(chunks, mbs, lambda st, mb: (st["logprobs"].sum(), mb.count),
                            vocab_size=arch.vocab_size, forward_only=True)
    last = parallel_state.is_pipeline_last_stage()
    result = []
    for i, s in enumerate(seqs):
        buf = outs[i]["stats"]["logprobs"][0].float().clone() if last else torch.zeros(len(s))
        dist.all_reduce(buf)  # only the last stage contributes
        result.append(buf)
    return result


def pp2_sync(*, hf_dir: str, prompts: list[list[int]], max_new_tokens: int) -> dict | None:
    """SmolLM2 in Megatron at PP2, perturbed, synced into an engine on rank 0; compare log-probs."""
    from nat_megatron.checkpoint.hf_io import HFReader
    from nat_megatron.checkpoint.hf_mapping import load_hf_weights
    from nat_megatron.model.arch import ModelArch
    from nat_megatron.model.build import build_model
    from nat_megatron.parallel.distributed import init_distributed, shutdown
    from nat_megatron.parallel.layout import Layout
    from nat_megatron.rollout.weight_sync import sync_weights

    lay = Layout(pp=2)
    init_distributed(lay, seed=1234)
    arch = ModelArch.from_hf_dir(hf_dir)
    chunks = build_model(arch, lay)
    load_hf_weights(chunks, arch, HFReader(hf_dir))
    for c in chunks:
        c.eval()
    rank0 = dist.get_rank() == 0
    engine = None
    if rank0:
        engine = RolloutEngine(hf_dir, SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens,
                                                      seed=0), **ENGINE)
    dist.barrier()
    before = engine.generate(prompts) if rank0 else None
    _perturb(chunks)
    sync_s = sync_weights(chunks, arch, engine)
    after = engine.generate(prompts) if rank0 else None
    box = [before, after]
    dist.broadcast_object_list(box, src=0)
    before, after = box
    res = {"sync_s": sync_s}
    for key, groups in (("stale", before), ("synced", after)):
        seqs = [p + g[0].token_ids for p, g in zip(prompts, groups)]
        lps = _megatron_logprobs(chunks, arch, seqs)
        mine = [lp[len(p) - 1:len(s) - 1] for lp, p, s in zip(lps, prompts, seqs)]
        res[key] = logprob_mismatch(engine_lps(groups), mine)
        res[key + "_tokens"] = sum(len(s) - len(p) for s, p in zip(seqs, prompts))
    shutdown()
    return res if rank0 else None
