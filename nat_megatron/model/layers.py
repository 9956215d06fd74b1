"""The two layers we own inside Megatron's transformer: RMSNorm and a fused-attention core.

- `RMSNorm` computes in fp32 like Hugging Face's LlamaRMSNorm (so logits match transformers)
  and marks its weight `sequence_parallel`, so Megatron all-reduces its gradient over TP when
  sequence parallelism splits the tokens (Megatron's torch-norm wrapper refuses SP).
- `selected_query_attention`: the same attention for selected query positions only, used by
  the selected-token path through the last layer (model/output.py).
- `SDPAttention` replaces Megatron's local DotProductAttention, which materialises the full
  [s, s] score matrix (O(s^2) memory) and has no context parallelism. It calls
  torch's scaled_dot_product_attention (flash / memory-efficient kernels on GPU) and supports
  context parallel by all-gathering K/V over the CP group and masking by global position. It
  also takes an explicit mask (`segment_attention_mask`: shared-prompt rows, cp=1), which
  Transformer Engine's causal attention would ignore.
  Transformer Engine's attention is used instead whenever TE is installed (see build.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule


class RMSNorm(torch.nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back like transformers."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class _GatherAlongDim(torch.autograd.Function):
    """All-gather over a group, concatenated along `dim`; backward sums each rank's slice.

    torch.distributed.nn's all_gather emulates reduce-scatter with all-to-all on gloo, which
    gives wrong gradients on sub-groups; this uses reduce-scatter on NCCL and all-reduce +
    slice elsewhere.
    """

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        group, dim = ctx.group, ctx.dim
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        chunks = [c.contiguous() for c in grad.chunk(size, dim=dim)]
        if dist.get_backend(group) == "nccl":
            out = torch.empty_like(chunks[rank])
            dist.reduce_scatter(out, chunks, group=group)
            return out, None, None
        grad = grad.contiguous()
        dist.all_reduce(grad, group=group)
        return grad.chunk(size, dim=dim)[rank].contiguous(), None, None


def cp_chunk_positions(local_len: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """Global token positions held by a CP rank under Megatron's load-balanced split.

    The sequence is cut into 2*cp chunks; rank r holds chunks r and 2*cp-1-r (so causal work is
    balanced), which is what `get_batch_on_this_cp_rank` produces.
    """
    half = local_len // 2
    first = torch.arange(cp_rank * half, (cp_rank + 1) * half, device=device)
    last_chunk = 2 * cp_size - 1 - cp_rank
    second = torch.arange(last_chunk * half, (last_chunk + 1) * half, device=device)
    return torch.cat([first, second])


def segment_attention_mask(segment: torch.Tensor) -> torch.Tensor:
    """The attention mask of shared-prompt rows (train/batching.py, share_prompt) from their
    per-position segment ids [b, s] (0: the shared prompt, k >= 1: the k-th response): a
    position sees the earlier positions of the prompt and of its own segment. [b, 1, s, s] bool,
    True where attention is masked out (Megatron's convention)."""
    s = segment.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment.device).tril()
    q, k = segment[:, :, None], segment[:, None, :]
    return ~(causal & ((k == 0) | (k == q))).unsqueeze(1)


def check_no_cp_for_masks() -> None:
    """Explicit masks and per-token rotary positions (shared-prompt rows) assume one CP rank."""
    if parallel_state.get_context_parallel_world_size() > 1:
        raise ValueError(
            "an explicit attention mask or rotary positions (parallel.share_prompt) need cp=1; "
            "set parallel.share_prompt=false"
        )


class SDPAttention(MegatronModule):
    """Causal core attention over [s, b, heads, dim] tensors, with GQA and context parallel."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale or config.kv_channels**-0.5
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention takes padded batches without attention bias")
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask, causal = None, True
        if attention_mask is not None:  # [b, 1, s, s], True = masked out
            check_no_cp_for_masks()
            mask, causal = ~attention_mask, False
        elif parallel_state.get_context_parallel_world_size() > 1:
            k, v, q_pos, k_pos = _keys_over_cp(k, v)
            mask, causal = q_pos[:, None] >= k_pos[None, :], False
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        s, b = out.shape[2], out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def _keys_over_cp(k: torch.Tensor, v: torch.Tensor):
    """K and V [b, g, s, d] of every CP rank (cat along s), this rank's global query positions
    and the keys' global positions. Without CP: the inputs and positions 0..s-1."""
    local = k.shape[2]
    cp = parallel_state.get_context_parallel_world_size()
    if cp == 1:
        pos = torch.arange(local, device=k.device)
        return k, v, pos, pos
    group = parallel_state.get_context_parallel_group()
    rank = dist.get_rank(group)
    # Each rank's K/V gradient is summed back to it from every rank's queries.
    # One collective for K and V together: autograd may run two independent backward
    # collectives in a different order on different ranks, pairing K with V.
    k, v = _GatherAlongDim.apply(torch.stack([k, v]), group, 3).unbind(0)
    q_pos = cp_chunk_positions(local, rank, cp, k.device)
    k_pos = torch.cat([cp_chunk_positions(local, r, cp, k.device) for r in range(cp)])
    return k, v, q_pos, k_pos


def selected_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    index: torch.Tensor,
    *,
    scale: float,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention for the queries at `index` only, over every key (nat.md §2, URS).

    query [s, b, heads, d], key/value [s, b, groups, d]: this rank's positions (this CP rank's
    chunks; keys of the other CP ranks are all-gathered as in SDPAttention). `index` holds flat
    seq-major indices p * b + i into the [s, b] grid, repeats allowed. Returns [k, heads * d]
    in index order. The queries are regrouped per batch row into [b, k_max] slots, so the score
    matrix is b x k_max x keys (never k x b x keys); slots a row does not fill attend to every
    key (finite) and are dropped. `attention_mask` [b, 1, s, s] (True = masked out,
    segment_attention_mask; cp=1) replaces the causal rule.
    """
    s, b, heads, d = query.shape
    k, v = (t.permute(1, 2, 0, 3) for t in (key, value))  # [b, g, s, d]
    k, v, q_pos_local, k_pos = _keys_over_cp(k, v)
    rows, pos = index % b, index // b
    n = index.numel()
    counts = torch.bincount(rows, minlength=b)
    order = torch.argsort(rows, stable=True)
    slot = torch.empty_like(index)
    slot[order] = torch.arange(n, device=index.device) - (counts.cumsum(0) - counts)[rows[order]]
    k_max = int(counts.max())
    q = query.reshape(s * b, heads, d).index_select(0, index)
    q = q.new_zeros(b, k_max, heads, d).index_put((rows, slot), q)
    if attention_mask is not None:
        check_no_cp_for_masks()
        seen = ~attention_mask[rows, 0, pos]  # [n, s]: the keys each selected query sees
        mask = torch.ones(b, k_max, s, dtype=torch.bool, device=index.device)
        mask = mask.index_put((rows, slot), seen).unsqueeze(1)
    else:
        q_pos = torch.full((b, k_max), int(k_pos.max()), device=index.device)
        q_pos = q_pos.index_put((rows, slot), q_pos_local[pos])
        mask = q_pos[:, None, :, None] >= k_pos[None, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=mask, scale=scale, enable_gqa=heads != k.shape[1]
    )
    return out.transpose(1, 2)[rows, slot].reshape(n, heads * d)
