"""Forward-only per-token statistics of a replica's samples, gathered onto all its ranks.

OTB needs the logit-gradient proxy of every group member before the loss can be formed, and
Bingo's reference-proxy scorer needs the reference policy's log-probs of every response: both
are one forward-only pass of a Megatron model over given response prefixes, whose results every
rank of the data-parallel replica needs (it forms the advantages and rewards of its groups).
The pass reuses the training path: truncated micro-batches (batching.build_micro_batches with
a "keep the prefix" selection) and the selected-position output layer, so only the asked-for
positions reach the vocabulary projection, and the statistics come from the vocab-parallel
reductions (no full-vocab gather).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nat_megatron.nat.selection import Selection
from nat_megatron.parallel.distributed import replica_group
from nat_megatron.train.batching import KEPT_FIELD, Sample, build_micro_batches
from nat_megatron.train.forward_backward import forward_backward, is_loss_owner


def positions_selection(lengths: torch.Tensor, keep: torch.Tensor) -> Selection:
    """A Selection of exactly the `keep` positions (probability 1); the forward pass of a
    response runs up to its last kept position."""
    width = max(int(lengths.max()) if lengths.numel() else 0, 1)
    valid = torch.arange(width)[None] < lengths[:, None]
    mask = torch.zeros_like(valid)
    mask[:, : keep.shape[1]] = keep[:, :width]
    mask &= valid
    cut = (mask * torch.arange(1, width + 1)).amax(1)
    return Selection(mask=mask, prob=valid.double(), cut=cut, lengths=lengths.clone())


def _forward_only_loss(stats: dict, mb):
    return 0.0 * stats["logprobs"].sum(), mb.count


@torch.no_grad()
def token_stats(
    chunks: list,
    samples: list[Sample],
    keep: torch.Tensor,
    *,
    layout,
    vocab_size: int,
    micro_batch_size: int = 1,
    sum_p2: bool = False,
    temperature: float = 1.0,
    micro_batching: dict | None = None,
) -> dict[str, torch.Tensor]:
    """log p (and sum_v p^2) of response token t of sample i where keep[i, t], on every rank
    of this data-parallel replica (`samples`: the replica's samples, the same on its ranks).

    Returns fp32 CPU tensors [N, T_max], zero where keep is False. `micro_batching`: the
    grouping options of build_micro_batches (the trainer's); default micro_batch_size sequences
    per micro-batch, lengths padded to the layout's multiple.
    """
    n = len(samples)
    lengths = torch.tensor([len(s.response) for s in samples])
    width = max(int(lengths.max()), 1)
    names = ["logprobs"] + (["sum_p2"] if sum_p2 else [])
    out = torch.zeros(len(names), n, width, dtype=torch.float32)
    grouping = micro_batching or {
        "seq_multiple": layout.seq_multiple,
        "pad_rows": layout.vpp is not None,
        "num_micro_batches": -(-n // micro_batch_size),
    }
    micro_batches = build_micro_batches(
        samples, positions_selection(lengths, keep), aggregation="token-mean", **grouping
    )
    outs = forward_backward(
        chunks,
        micro_batches,
        _forward_only_loss,
        vocab_size=vocab_size,
        forward_only=True,
        sum_p2=sum_p2,
        output_mask=KEPT_FIELD,
        temperature=temperature,
    )
    if is_loss_owner():  # each CP rank owns its own positions
        for o in outs:
            mb = o["micro_batch"]
            at = mb.fields[KEPT_FIELD]
            rows = mb.fields["sample"][at] - 1
            cols = mb.fields["response_pos"][at] - 1
            for k, name in enumerate(names):
                out[k, rows, cols] = o["stats"][name].cpu()[at].float()
    dist.all_reduce(out, group=replica_group())  # each (sample, position) has one owner
    return dict(zip(names, out))
