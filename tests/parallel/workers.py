"""Functions run on every rank by tests.launcher: one layout, one batch, results on rank 0."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nat_megatron.checkpoint.gather import gather_full
from nat_megatron.checkpoint.hf_io import HFReader
from nat_megatron.checkpoint.hf_mapping import load_hf_weights
from nat_megatron.model.arch import ModelArch
from nat_megatron.model.build import build_model
from nat_megatron.parallel.distributed import init_distributed, shutdown
from nat_megatron.parallel.layout import Layout
from nat_megatron.train.forward_backward import MicroBatch, forward_backward
from nat_megatron.train.optimizer import build_optimizer, wrap_ddp


def weighted_nll(stats, mb):
    """-sum_t w_t log p_t over the micro-batch, normalised later by the global weight count."""
    w = mb.fields["w"]
    return -(stats["logprobs"] * w).sum(), mb.count


def make_micro_batches(tokens: torch.Tensor, weights: torch.Tensor, lengths: list[int]) -> list[MicroBatch]:
    """tokens/weights [n_mb, b, s_max]; micro-batch i is cut to lengths[i] (variable lengths)."""
    out = []
    for i, s in enumerate(lengths):
        tok = tokens[i, :, :s]
        tgt = torch.cat([tok[:, 1:], tok[:, :1]], dim=1)  # last position has weight 0
        w = weights[i, :, :s].clone()
        w[:, -1] = 0
        out.append(MicroBatch(tokens=tok, targets=tgt, fields={"w": w}, count=int((w > 0).sum())))
    return out


def _to_rank0(t: torch.Tensor | None, have: bool, shape, dtype=torch.float32) -> torch.Tensor:
    """Move a tensor that lives on one rank (have=True) to global rank 0 via an all-reduce."""
    buf = t.detach().float().cpu().clone() if have else torch.zeros(shape)
    dist.all_reduce(buf)
    return buf


def logits_for_models(*, layout: dict, hf_dirs: list[str], tokens, weights, lengths):
    """Full logits of every model in hf_dirs under one layout (one process-group set-up)."""
    out = [
        run_layout(
            layout=layout, hf_dir=d, tokens=tokens, weights=weights, lengths=lengths, mode="logits", keep_groups=True
        )
        for d in hf_dirs
    ]
    shutdown()
    return out if dist_rank0() else None


def run_layouts(*, runs: list[dict], **common):
    """Several layouts in one launch (start-up is most of a launch's time): run_layout for
    each dict of `runs` (layout, distributed_optimizer) on fresh Megatron groups."""
    out = []
    for run in runs:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        out.append(run_layout(**common, **run, keep_groups=True))
    shutdown()
    return out if dist_rank0() else None


def run_layout(
    *,
    layout: dict,
    hf_dir: str,
    tokens: torch.Tensor,
    weights: torch.Tensor,
    lengths: list[int],
    mode: str = "train",
    lr: float = 1000.0,
    distributed_optimizer: bool = True,
    keep_groups: bool = False,
):
    """mode="logits": full logits of every micro-batch; mode="train": loss, grads and the
    weights after one SGD step. Returns a dict on global rank 0, None elsewhere."""
    lay = Layout(**layout)
    if not parallel_state.model_parallel_is_initialized():
        init_distributed(lay, seed=1234)
    arch = ModelArch.from_hf_dir(hf_dir)
    chunks = build_model(arch, lay)
    load_hf_weights(chunks, arch, HFReader(hf_dir))
    mbs = make_micro_batches(tokens, weights, lengths)
    dp, dp_rank = lay.dp, parallel_state.get_data_parallel_rank()
    mine = mbs[dp_rank::dp]
    last = parallel_state.is_pipeline_last_stage()
    result = {}
    if mode == "logits":
        for c in chunks:
            c.eval()
        outs = forward_backward(
            chunks, mine, weighted_nll, vocab_size=arch.vocab_size, forward_only=True, keep_logits=True
        )
        logits = []
        longest = max(mb.seq_len for mb in mine)
        for i, mb in enumerate(mine):
            # Reassemble CP slices: every CP rank contributes its positions. Interleaved
            # schedules pad every micro-batch to the longest one; cut the padding off.
            padded = mb.pad_to(longest) if lay.vpp else mb
            full = torch.zeros(mb.tokens.shape[0], padded.seq_len, arch.vocab_size)
            if last and parallel_state.get_tensor_model_parallel_rank() == 0 and dp_rank == 0:
                idx = padded.for_cp_rank().position_ids()[0]
                full[:, idx] = outs[i]["logits"].float()
            dist.all_reduce(full)
            logits.append(full[:, : mb.seq_len])
        result["logits"] = logits
    else:
        ddp = wrap_ddp(chunks, use_distributed_optimizer=distributed_optimizer)
        # Adam with eps >> |g|: the first step is lr * g / (|g| + eps) ~ lr * g, smooth in g, so
        # rounding-level gradient differences stay rounding-level in the weights (plain
        # Adam's first step, lr * sign(g), would amplify them). The distributed optimizer
        # supports only Adam.
        opt = build_optimizer(
            ddp, lr=lr, optimizer="adam", clip_grad=0.0, adam_eps=1.0, use_distributed_optimizer=distributed_optimizer
        )
        before = gather_full(ddp)
        for c in ddp:
            c.zero_grad_buffer()
        opt.zero_grad()
        outs = forward_backward(ddp, mine, weighted_nll, vocab_size=arch.vocab_size)
        loss_sum = sum(o["loss_sum"] for o in outs) if outs else torch.zeros(())
        count = sum(o["count"] for o in outs) if outs else torch.zeros((), dtype=torch.int)
        # Partial sums live on the last stage's TP-rank-0 processes (one per DP and CP rank).
        contributes = last and parallel_state.get_tensor_model_parallel_rank() == 0
        both = torch.stack([loss_sum.float(), count.float()]) if contributes else torch.zeros(2)
        dist.all_reduce(both)
        result["loss"] = both[0] / both[1]
        if not (distributed_optimizer and dp * lay.cp > 1):
            # The distributed optimizer reduce-scatters grads over DP x CP: each rank then
            # holds a valid shard only, so full grads are compared without it.
            result["grads"] = gather_full(ddp, grads=True)
        opt.step()
        after = gather_full(ddp)
        if after is not None:
            result["update"] = {k: after[k] - before[k] for k in after}
    if not keep_groups:
        shutdown()
    return result if dist_rank0() else None


def dist_rank0() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
