"""NAT checks run on every rank by tests.launcher; results come back from global rank 0.

One launch (one layout) runs every check on one process-group set-up and one DDP model:
the selection hash on every rank, selected-position logits against the full output path, and
the NAT loss and gradients for RPC (truncated compute + selected outputs) and URS.
"""

from __future__ import annotations

import dataclasses
import hashlib
from types import SimpleNamespace

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nat_megatron.checkpoint.gather import gather_full
from nat_megatron.checkpoint.hf_io import HFReader
from nat_megatron.checkpoint.hf_mapping import load_hf_weights
from nat_megatron.model import output as output_module
from nat_megatron.model.arch import ModelArch
from nat_megatron.model.build import build_model
from nat_megatron.nat.loss import LossConfig, group_advantages, grpo_loss_sum
from nat_megatron.nat.selection import sample, selection_generators
from nat_megatron.parallel.distributed import init_distributed, shutdown
from nat_megatron.parallel.layout import Layout, token_multiple
from nat_megatron.train.batching import KEPT_FIELD, Sample, build_micro_batches, nat_loss_fn
from nat_megatron.train.forward_backward import MicroBatch, forward_backward
from nat_megatron.train.optimizer import wrap_ddp
from tests.device_guard import device_discipline
from tests.parallel.workers import dist_rank0

# (scheme, budget, aggregation): RPC skips some samples (cut 0) at this budget and seed.
CHECKS = {
    "rpc": ("rpc", 0.4, "token-mean"),
    "urs": ("urs", 0.5, "seq-mean-token-mean"),
    "rpc+urs": ("rpc+urs", 0.3, "seq-mean-token-sum"),
}
SEED, STEP = 11, 3


def make_samples(n: int = 8, vocab: int = 300, seed: int = 0) -> list[Sample]:
    """Deterministic rollout-like samples: prompts 3-8 tokens, responses 5-24, GRPO advantages."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.rand(n, generator=g)
    adv = group_advantages(rewards, group_size=4)
    out = []
    for i in range(n):
        P, T = int(torch.randint(3, 9, (1,), generator=g)), int(torch.randint(5, 25, (1,), generator=g))
        out.append(
            Sample(
                prompt=torch.randint(0, vocab, (P,), generator=g),
                response=torch.randint(0, vocab, (T,), generator=g),
                # around a random model's log p (~ -log 300): ratios clip both ways
                old_logprobs=-4.0 - 3.0 * torch.rand(T, generator=g),
                advantage=float(adv[i]),
            )
        )
    return out


def draw(samples, scheme, budget, order):
    """The selection, drawn with the samples in `order` (per-sample generators), in sample order."""
    lengths = torch.tensor([len(samples[i].response) for i in order])
    sel = sample(scheme, budget, lengths, selection_generators(SEED, STEP, order))
    inv = torch.argsort(torch.tensor(order))
    T = int(sel.lengths.max())
    return type(sel)(sel.mask[inv, :T], sel.prob[inv, :T], sel.cut[inv], sel.lengths[inv])


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _loss_and_grads(ddp, mbs, loss_fn, vocab, output_mask):
    """Global loss (sum / count over the world) and full gradients on rank 0."""
    for c in ddp:
        c.zero_grad_buffer()
    outs = forward_backward(ddp, mbs, loss_fn, vocab_size=vocab, output_mask=output_mask)
    last = parallel_state.is_pipeline_last_stage()
    contributes = last and parallel_state.get_tensor_model_parallel_rank() == 0
    both = torch.zeros(2, dtype=torch.float64)
    if contributes:
        both += torch.stack([sum(o["loss_sum"] for o in outs).double(), sum(o["count"] for o in outs).double()])
    dist.all_reduce(both)
    return {"loss": float(both[0] / both[1]), "grads": gather_full(ddp, grads=True)}


def _selected_vs_full(ddp, mbs, vocab) -> dict[str, float]:
    """Max relative difference of logits and log-probs at kept positions, selected vs full."""
    runs = [
        forward_backward(
            ddp,
            mbs,
            lambda st, mb: (st["logprobs"].sum() * 0, 0),
            vocab_size=vocab,
            forward_only=True,
            keep_logits=True,
            output_mask=m,
        )
        for m in (None, KEPT_FIELD)
    ]
    if len(ddp) > 1:  # the interleaved schedule padded every micro-batch to the longest
        mbs = [mb.pad_to(max(m.seq_len for m in mbs)) for mb in mbs]
    diff = torch.zeros(3, dtype=torch.float64)  # logits, logprobs, number of compared positions
    for mb, full, sel in zip(mbs, *runs):  # empty lists off the last stage
        kept = mb.for_cp_rank().fields[KEPT_FIELD]
        assert not sel["logits"][~kept].any()  # nothing computed off the selection
        if not kept.any():  # e.g. a CP rank that holds only prompt positions of this one
            continue
        ref = full["logits"][kept]
        diff[0] = max(diff[0], float((sel["logits"][kept] - ref).abs().max() / ref.abs().max()))
        lp_ref = full["stats"]["logprobs"][kept]
        diff[1] = max(diff[1], float((sel["stats"]["logprobs"][kept] - lp_ref).abs().max() / lp_ref.abs().max()))
        diff[2] += int(kept.sum())
    d = diff[:2].clone()
    dist.all_reduce(d, op=dist.ReduceOp.MAX)
    n = diff[2:].clone()
    dist.all_reduce(n)
    return {"logits": float(d[0]), "logprobs": float(d[1]), "positions": int(n[0])}


def plain_grpo(ddp, samples, vocab, cfg):
    """Plain GRPO through Megatron, independent of batching.py: one full-length sample per
    micro-batch, response log-probs sliced by hand, grpo_loss_sum."""
    mbs = []
    for i, s in enumerate(samples):
        seq = torch.cat([s.prompt, s.response])
        mbs.append(
            MicroBatch(
                tokens=seq[None, :-1],
                targets=seq[None, 1:],
                count=len(s.response),
                fields={"i": torch.full((1, len(seq) - 1), i)},
            )
        )

    def loss_fn(stats, mb):
        s = samples[int(mb.fields["i"][0, 0])]
        P, T = len(s.prompt), len(s.response)
        lp = stats["logprobs"][:, P - 1 : P - 1 + T]
        loss, _ = grpo_loss_sum(
            lp,
            old_logprobs=s.old_logprobs[None],
            lengths=torch.tensor([T]),
            advantages=torch.tensor([s.advantage]),
            cfg=cfg,
        )
        return loss, mb.count

    return _loss_and_grads(ddp, mbs, loss_fn, vocab, None)


def _otb_check(ddp, samples, sel, lay, vocab, micro_batches):
    """OTB as the trainer does it: the forward-only proxy pass (token_stats) over the prefixes
    the RPC selection needs (groups of 2), per-token advantages, then the NAT loss and grads."""
    from dataclasses import replace

    from nat_megatron.nat.otb import logit_gradient_proxy, optimal_token_baseline, outcome_returns, proxy_prefix_lengths
    from nat_megatron.train.token_stats import token_stats

    n = len(samples)
    group = torch.arange(n) // 2
    last = (sel.mask * torch.arange(1, sel.mask.shape[1] + 1)).amax(1)
    prefix = proxy_prefix_lengths(sel.lengths, last, group)
    keep = torch.arange(int(sel.lengths.max()))[None] < prefix[:, None]
    stats = token_stats(ddp, samples, keep, layout=lay, vocab_size=vocab, micro_batch_size=2, sum_p2=True)
    pos = torch.arange(stats["logprobs"].shape[1])[None]
    mask = pos < sel.lengths[:, None]
    proxy = torch.where(pos < prefix[:, None], logit_gradient_proxy(stats["logprobs"], stats["sum_p2"]), 0.0)
    rewards = torch.tensor([float(s.advantage) for s in samples])
    adv = optimal_token_baseline(outcome_returns(rewards, mask), proxy, mask, group)
    otb = [replace(s, advantage=adv[i, : len(s.response)].clone()) for i, s in enumerate(samples)]
    mbs = build_micro_batches(
        otb,
        sel,
        aggregation="token-mean",
        seq_multiple=token_multiple(lay),
        num_micro_batches=micro_batches,
        pad_rows=lay.vpp is not None,
    )
    stats["prefix"] = prefix
    return stats, _loss_and_grads(ddp, mbs, nat_loss_fn(LossConfig()), vocab, KEPT_FIELD)


def _two_updates(ddp, samples, sel, lay, vocab) -> dict:
    """The trainer's update loop: the samples in two mini-batches, one optimizer (SGD) step
    each, with the KL term on. On rank 0: the gradients of both updates (the second one at the
    weights the first step made) and the full weights before and after."""
    from dataclasses import replace

    from nat_megatron.nat.selection import Selection
    from nat_megatron.train.optimizer import build_optimizer

    g = torch.Generator().manual_seed(7)
    samples = [
        replace(s, ref_logprobs=s.old_logprobs + 0.3 * torch.randn(len(s.response), generator=g)) for s in samples
    ]
    # Plain SGD: the update is linear in the gradients (Adam's first step is not, see
    # tests/parallel).
    opt = build_optimizer(
        ddp, lr=0.05, optimizer="sgd", sgd_momentum=0.0, use_distributed_optimizer=False, clip_grad=0.0
    )
    cfg = LossConfig(kl_beta=0.5, kl_estimator="k3")
    before, grads = gather_full(ddp), []
    for part in torch.arange(len(samples)).tensor_split(2):
        mine = [samples[i] for i in part.tolist()]
        sub = Selection(sel.mask[part], sel.prob[part], sel.cut[part], sel.lengths[part])
        mbs = build_micro_batches(
            mine,
            sub,
            aggregation=cfg.aggregation,
            seq_multiple=lay.seq_multiple,
            num_micro_batches=2,
            pad_rows=lay.vpp is not None,
        )
        for c in ddp:
            c.zero_grad_buffer()
        opt.zero_grad()
        forward_backward(ddp, mbs, nat_loss_fn(cfg), vocab_size=vocab, output_mask=KEPT_FIELD)
        grads.append(gather_full(ddp, grads=True))
        opt.step()
    return {"before": before, "after": gather_full(ddp), "grads": grads}


def _shared_prompt_check(ddp, samples, sels, lay, vocab, micro_batches) -> dict:
    """Responses of one prompt in one row (share_prompt: a segment mask, rotary positions that
    continue the prompt) against a row each: {check: (a row each, shared)} loss and gradients,
    through the selected last layer (rpc, urs) and the full output path (rpc_full)."""
    grouped = [dataclasses.replace(s, prompt=samples[4 * (i // 4)].prompt) for i, s in enumerate(samples)]
    out = {}
    for check, name, output_mask in (("rpc", "rpc", KEPT_FIELD), ("urs", "urs", KEPT_FIELD), ("rpc_full", "rpc", None)):
        agg = CHECKS[name][2]
        cfg = LossConfig(aggregation=agg, seq_token_sum_constant=32.0 if agg == "seq-mean-token-sum" else None)
        pair = []
        for share in (False, True):
            mbs = build_micro_batches(
                grouped,
                sels[name],
                aggregation=agg,
                seq_multiple=token_multiple(lay),
                num_micro_batches=micro_batches,
                pad_rows=lay.vpp is not None,
                share_prompt=share,
            )
            pair.append(_loss_and_grads(ddp, mbs, nat_loss_fn(cfg), vocab, output_mask))
        out[check] = pair
    return out


def nat_checks_layouts(*, runs: list[dict], hf_dir: str):
    """nat_checks for each dict of `runs` (layout, micro_batches) in one launch."""
    out = [nat_checks(hf_dir=hf_dir, keep_groups=True, **run) for run in runs]
    shutdown()
    return out if dist_rank0() else None


def nat_checks(*, layout: dict, hf_dir: str, plain: bool = False, micro_batches: int = 4, keep_groups: bool = False):
    """Every NAT check under one layout; a dict on global rank 0, None elsewhere."""
    lay = Layout(**layout)
    if parallel_state.model_parallel_is_initialized():  # a previous layout of this launch
        parallel_state.destroy_model_parallel()
    init_distributed(lay, seed=1234)
    arch = ModelArch.from_hf_dir(hf_dir)
    chunks = build_model(arch, lay)
    load_hf_weights(chunks, arch, HFReader(hf_dir))
    ddp = wrap_ddp(chunks, use_distributed_optimizer=False)
    samples = make_samples()
    n, multiple = len(samples), token_multiple(lay)
    result = {"checks": {}}

    # Same selection on every rank, whatever order a rank draws it in.
    rank = dist.get_rank()
    order = list(range(n)) if rank % 2 == 0 else list(reversed(range(n)))
    sels = {name: draw(samples, scheme, budget, order) for name, (scheme, budget, _) in CHECKS.items()}
    mbs = {
        name: build_micro_batches(
            samples,
            sels[name],
            aggregation=agg,
            seq_multiple=multiple,
            num_micro_batches=micro_batches,
            pad_rows=lay.vpp is not None,
        )
        for name, (_, _, agg) in CHECKS.items()
    }
    digest = _digest([t for name in CHECKS for t in (sels[name].mask, sels[name].prob, sels[name].cut)])
    shapes = [[tuple(mb.tokens.shape) for mb in mbs[k]] for k in CHECKS]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (digest, shapes))
    result["selection_digests"] = [d for d, _ in everyone]
    result["shapes_equal"] = all(s == shapes for _, s in everyone)
    result["rpc_cuts"] = sels["rpc"].cut.tolist()
    result["rpc_seq_lens"] = [mb.seq_len for mb in mbs["rpc"]]

    result["selected_vs_full"] = _selected_vs_full(ddp, mbs["rpc"], arch.vocab_size)
    for name, (_, _, agg) in CHECKS.items():
        cfg = LossConfig(aggregation=agg, seq_token_sum_constant=32.0 if agg == "seq-mean-token-sum" else None)
        result["checks"][name] = _loss_and_grads(ddp, mbs[name], nat_loss_fn(cfg), arch.vocab_size, KEPT_FIELD)
    # The selected path (last layer, final norm and output layer on the kept positions only)
    # against the full path: same loss, same gradient of every parameter.
    urs_cfg = LossConfig(aggregation=CHECKS["urs"][2])
    result["urs_full_path"] = _loss_and_grads(ddp, mbs["urs"], nat_loss_fn(urs_cfg), arch.vocab_size, None)
    # MXFP8's selected-count multiple (32 rows per TP rank), forced through the real rule with
    # an FP8 view of the config (no Transformer Engine on CPU). The padding rows must change
    # nothing.
    plain_multiple = output_module.selected_count_multiple
    output_module.selected_count_multiple = lambda config: plain_multiple(
        SimpleNamespace(sequence_parallel=config.sequence_parallel, fp8="hybrid", fp8_recipe="mxfp8")
    )
    try:
        result["rpc_pad_fp8"] = _loss_and_grads(ddp, mbs["rpc"], nat_loss_fn(LossConfig()), arch.vocab_size, KEPT_FIELD)
    finally:
        output_module.selected_count_multiple = plain_multiple
    if lay.cp == 1:
        result["shared"] = _shared_prompt_check(ddp, samples, sels, lay, arch.vocab_size, micro_batches)
    result["otb_stats"], result["otb"] = _otb_check(ddp, samples, sels["rpc"], lay, arch.vocab_size, micro_batches)
    if plain:  # scheme "none" through batching + NAT loss against plain GRPO
        cfg = LossConfig()
        none = build_micro_batches(
            samples,
            draw(samples, "none", 1.0, list(range(n))),
            aggregation=cfg.aggregation,
            seq_multiple=multiple,
            num_micro_batches=micro_batches,
        )
        result["none"] = _loss_and_grads(ddp, none, nat_loss_fn(cfg), arch.vocab_size, KEPT_FIELD)
        result["plain"] = plain_grpo(ddp, samples, arch.vocab_size, cfg)
        # The selected last layer under full-layer recompute (the decoder replays layer ranges
        # in the backward, with the last layer taken out of it) gives the same gradients.
        from nat_megatron.model.recompute import RECOMPUTE

        recomputed = build_model(arch, lay, **RECOMPUTE["full"])
        load_hf_weights(recomputed, arch, HFReader(hf_dir))
        result["urs_full_recompute"] = _loss_and_grads(
            wrap_ddp(recomputed, use_distributed_optimizer=False),
            mbs["urs"],
            nat_loss_fn(LossConfig(aggregation=CHECKS["urs"][2])),
            arch.vocab_size,
            KEPT_FIELD,
        )
    # Device discipline: gathering grads must keep them on the model's device for the
    # collectives (NCCL on GPUs); tests/device_guard.py refuses anything else.
    with device_discipline(ddp):
        guarded = gather_full(ddp, grads=True)
    plain_grads = gather_full(ddp, grads=True)
    if plain_grads is not None:
        result["guarded_gather_equal"] = guarded.keys() == plain_grads.keys() and all(
            torch.equal(guarded[k], plain_grads[k]) and type(guarded[k]) is torch.Tensor for k in plain_grads
        )
    # Last: it changes the weights.
    result["two_updates"] = _two_updates(ddp, samples, sels["rpc"], lay, arch.vocab_size)
    if not keep_groups:
        shutdown()
    return result if dist_rank0() else None
