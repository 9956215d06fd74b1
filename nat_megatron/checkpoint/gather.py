"""Gather full, unsharded Megatron tensors from every TP/PP rank (tests, weight export)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nat_megatron.checkpoint.hf_mapping import global_name, partition_dim, tp_unshard


def unwrap(chunk):
    """The GPTModel inside a DDP (or Float16Module) wrapper."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def gather_full(chunks: list, *, grads: bool = False) -> dict[str, torch.Tensor] | None:
    """{global Megatron name: full tensor} of weights (or DDP main_grads) on global rank 0.

    Other ranks return None. Collective over the whole world: every rank must call it. The TP
    all-gather runs on the parameters' device (NCCL needs CUDA tensors); the result is on CPU.
    Tied output weights (a copy of the embedding on the last stage) are left out.
    """
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    local: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        model = unwrap(chunk)
        for name, param in model.named_parameters():
            if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
                continue
            # Gathered where it lives: NCCL groups move CUDA tensors only. To the CPU after.
            t = (param.main_grad if grads else param.data).detach().contiguous()
            if tp > 1:
                parts = [torch.empty_like(t) for _ in range(tp)]
                dist.all_gather(parts, t, group=tp_group)
                t = tp_unshard(name, parts, partition_dim(param))
            local[global_name(model, name)] = t.float().cpu()
    first_of_replica = (
        parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
        and parallel_state.get_context_parallel_rank() == 0
    )
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local if first_of_replica else None)
    if dist.get_rank() != 0:
        return None
    full: dict[str, torch.Tensor] = {}
    for part in gathered:
        for k, v in (part or {}).items():
            full.setdefault(k, v)
    return full
