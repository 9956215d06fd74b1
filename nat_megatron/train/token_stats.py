"""Forward-only per-token statistics of whole batches, gathered onto every rank.

OTB needs the logit-gradient proxy of every group member before the loss can be formed, and
Bingo's reference-proxy scorer needs the reference policy's log-probs of every response: both
are one forward-only pass of a Megatron model over given response prefixes, whose results all
ranks need (every rank forms the same advantages and rewards). The pass reuses the training
path: truncated micro-batches (batching.build_micro_batches with a "keep the prefix" selection)
and the selected-position output layer, so only the asked-for positions reach the vocabulary
projection, and the statistics come from the vocab-parallel reductions (no full-vocab gather).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nat_megatron.nat.selection import Selection
from nat_megatron.train.batching import KEPT_FIELD, Sample, build_micro_batches
from nat_megatron.train.forward_backward import forward_backward


def prefix_selection(lengths: torch.Tensor, prefix: torch.Tensor) -> Selection:
    """A Selection that keeps positions < prefix[i] of every response (probability 1)."""
    width = max(int(lengths.max()) if lengths.numel() else 0, 1)
    mask = torch.arange(width)[None] < prefix[:, None]
    valid = torch.arange(width)[None] < lengths[:, None]
    return Selection(mask=mask, prob=valid.double(), cut=prefix.clone(), lengths=lengths.clone())


def _forward_only_loss(stats: dict, mb):
    return 0.0 * stats["logprobs"].sum(), mb.count


@torch.no_grad()
def token_stats(chunks: list, samples: list[Sample], prefix: torch.Tensor, *, layout, vocab_size: int,
                micro_batch_size: int, sum_p2: bool = False) -> dict[str, torch.Tensor]:
    """log p (and sum_v p^2) of response token t of sample i for t < prefix[i], on every rank.

    `samples` is the whole step's list (the same on every rank); each data-parallel rank runs
    its share (samples[dp_rank::dp], as the training pass does). Returns fp32 [N, T_max]
    tensors, zero at positions >= prefix[i].
    """
    n = len(samples)
    lengths = torch.tensor([len(s.response) for s in samples])
    width = max(int(lengths.max()), 1)
    names = ["logprobs"] + (["sum_p2"] if sum_p2 else [])
    out = torch.zeros(len(names), n, width, dtype=torch.float32)
    dp, dp_rank = layout.dp, parallel_state.get_data_parallel_rank()
    mine = list(range(n))[dp_rank::dp]
    if mine:
        share = [samples[i] for i in mine]
        selection = prefix_selection(lengths[mine], prefix[mine])
        micro_batches = build_micro_batches(
            share, selection, aggregation="token-mean", seq_multiple=layout.seq_multiple,
            num_micro_batches=-(-len(share) // micro_batch_size), pad_rows=layout.vpp is not None)
        outs = forward_backward(chunks, micro_batches, _forward_only_loss, vocab_size=vocab_size,
                                forward_only=True, sum_p2=sum_p2, output_mask=KEPT_FIELD)
        owner = (parallel_state.is_pipeline_last_stage()
                 and parallel_state.get_tensor_model_parallel_rank() == 0)
        if owner:
            longest = max(mb.seq_len for mb in micro_batches)
            for o, mb in zip(outs, micro_batches):
                # The positions the stats describe: padded as under interleaving, this CP rank's.
                mb = (mb.pad_to(longest) if layout.vpp else mb).for_cp_rank()
                at = mb.fields[KEPT_FIELD]
                rows = torch.tensor(mine)[mb.fields["sample"][at] - 1]
                cols = mb.fields["response_pos"][at] - 1
                for k, name in enumerate(names):
                    out[k, rows, cols] = o["stats"][name][at].float().cpu()
    dist.all_reduce(out)  # each (sample, position) has exactly one owner: a sum is a gather
    return dict(zip(names, out))
