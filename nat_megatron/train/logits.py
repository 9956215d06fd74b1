"""Full-vocabulary logits through the trainer's forward (forward_backward, forward only), for
checks: a converted checkpoint against its Hugging Face model (`nat-megatron convert verify`),
one layout against another (tests)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nat_megatron.train.forward_backward import MicroBatch, forward_backward


def full_logits(chunks: list, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, V] of one token batch on global rank 0 (None elsewhere).

    Collective over the whole world; for checks, not training (it gathers the vocabulary).
    """
    for c in chunks:
        c.eval()
    mb = MicroBatch(tokens=tokens, targets=tokens, count=0)
    zero = lambda stats, _mb: (stats["logprobs"].sum() * 0, 0)  # noqa: E731
    outs = forward_backward(chunks, [mb], zero, vocab_size=vocab_size, forward_only=True, keep_logits=True)
    full = torch.zeros(*tokens.shape, vocab_size)
    if outs and parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0:
        idx = mb.for_cp_rank().position_ids()[0]
        full[:, idx] = outs[0]["logits"].float().cpu()[:, : len(idx)]
    dist.all_reduce(full)  # exactly one rank per position contributes
    return full if dist.get_rank() == 0 else None
