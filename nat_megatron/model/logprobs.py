"""Per-token statistics of target tokens from vocab-parallel logits, without a full-vocab gather.

Each TP rank holds a [.., V/tp] slice of the logits. The log-softmax of the target token needs
only three all-reduces of [..]-shaped tensors over TP: the max, the sum of exponentials, and
the target logit (held by exactly one rank). Vocabulary padding columns (Megatron pads the
vocabulary to a multiple of 128) are masked out, so they never enter the softmax.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


def _tp_sum(x: torch.Tensor) -> torch.Tensor:
    # Forward all-reduce, backward identity: every TP rank computes the same loss.
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return x
    return reduce_from_tensor_model_parallel_region(x)


def vocab_parallel_token_stats(
    logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, *, entropy: bool = False, sum_p2: bool = False
) -> dict[str, torch.Tensor]:
    """log p(target) for every position, plus optional entropy and sum_v p_v^2.

    logits: [..., V_local] (this TP rank's vocabulary slice, fp32 or lower);
    targets: [...] global token ids. Returns fp32 tensors shaped like `targets`:
    "logprobs", and "entropy" / "sum_p2" when asked (sum_v p^2 = exp(LSE(2z) - 2 LSE(z)),
    the term of the OTB logit-gradient proxy).
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    v_local = logits.shape[-1]
    start = tp_rank * v_local
    z = logits.float()
    if start + v_local > vocab_size:  # this shard holds vocabulary padding
        pad = torch.arange(start, start + v_local, device=z.device) >= vocab_size
        z = z.masked_fill(pad, float("-inf"))
    with torch.no_grad():
        zmax = z.max(dim=-1).values
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    shifted = z - zmax.unsqueeze(-1)
    exp = shifted.exp()
    sum_exp = _tp_sum(exp.sum(dim=-1))
    local_t = targets - start
    in_shard = (local_t >= 0) & (local_t < v_local)
    picked = shifted.gather(-1, local_t.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
    target_shifted = _tp_sum(torch.where(in_shard, picked, torch.zeros_like(picked)))
    log_z = sum_exp.log()
    out = {"logprobs": target_shifted - log_z}
    if entropy:
        # H = log Z - sum_v p_v * shifted_v (padding columns have p = 0; avoid 0 * -inf).
        p_shift = torch.where(exp > 0, exp * shifted, torch.zeros_like(exp)).sum(dim=-1)
        out["entropy"] = log_z - _tp_sum(p_shift) / sum_exp
    if sum_p2:
        out["sum_p2"] = _tp_sum((2 * shifted).exp().sum(dim=-1)) / sum_exp.square()
    return out
