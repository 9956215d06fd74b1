"""Stream the trainer's weights, as full HF-named tensors, to the rank(s) running rollout engines.

A collective over the whole world: every rank calls `hf_weight_stream` (or `sync_weights`) with
its own model chunks, in any TP/PP/VPP/CP/DP layout. For each global Megatron parameter, in
model order, the TP group of its owning pipeline stage (DP and CP rank 0) all-gathers the shards,
TP rank 0 of that group sends the full tensor to each engine rank (unless it is one), and
each engine rank splits it into HF tensors with the one mapping in checkpoint/hf_mapping.py.
Only one full Megatron tensor is alive at a time, so memory stays at the largest parameter.
"""

from __future__ import annotations

import time
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nat_megatron.checkpoint.gather import unwrap
from nat_megatron.checkpoint.hf_mapping import from_megatron, global_name, megatron_names, tp_unshard
from nat_megatron.model.arch import ModelArch


def _is_source(name: str, model) -> bool:
    # The output layer of a tied model is a copy of the embedding on the last stage.
    return not (name == "output_layer.weight" and model.share_embeddings_and_output_weights)


def _plan(models: list, arch: ModelArch) -> list[tuple[str, int, tuple, torch.dtype]]:
    """(global name, source rank, full shape, dtype) for every parameter, in model order.

    Identical on every rank: each TP-rank-0 / DP-rank-0 / CP-rank-0 process lists what it holds.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    mine = []
    if (parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0
            and parallel_state.get_context_parallel_rank() == 0):
        for model in models:
            for local, p in model.named_parameters():
                if not _is_source(local, model):
                    continue
                shape = list(p.shape)
                if getattr(p, "tensor_model_parallel", False) and tp > 1:
                    shape[p.partition_dim] *= tp
                mine.append((global_name(model, local), tuple(shape), p.dtype))
    held = [None] * dist.get_world_size()
    dist.all_gather_object(held, mine)
    where = {name: (rank, shape, dtype) for rank, part in enumerate(held) for name, shape, dtype in part}
    missing = [n for n in megatron_names(arch) if n not in where]
    if missing:
        raise ValueError(f"no rank holds {missing[:3]}...: the model chunks do not match {arch.family} "
                         f"arch with {arch.num_layers} layers")
    return [(n, *where[n]) for n in megatron_names(arch)]


def hf_weight_stream(chunks: list, arch: ModelArch, *,
                     engine_ranks: Sequence[int] = (0,)) -> Iterator[tuple[str, torch.Tensor]]:
    """Generator of (HF name, full tensor) on the `engine_ranks` (global); empty elsewhere.

    Every rank must iterate its generator to the end (the sends and gathers happen while it
    runs); `sync_weights` does that. Tensors keep the trainer's dtype and device.
    """
    models = [unwrap(c) for c in chunks]
    plan = _plan(models, arch)
    local = {global_name(m, n): p for m in models for n, p in m.named_parameters() if _is_source(n, m)}
    rank = dist.get_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    # Only the DP-0 / CP-0 replica of each stage takes part; the other replicas hold copies.
    in_source_replica = (parallel_state.get_data_parallel_rank() == 0
                         and parallel_state.get_context_parallel_rank() == 0)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    for name, src, shape, dtype in plan:
        full = None
        if in_source_replica and name in local:
            param = local[name]
            t = param.detach()
            if tp > 1:
                parts = [torch.empty_like(t) for _ in range(tp)]
                dist.all_gather(parts, t.contiguous(), group=tp_group)
                t = tp_unshard(name, parts, param)
            full = t
        if rank == src:
            for dst in engine_ranks:
                if dst != src:
                    dist.send(full.contiguous(), dst=dst)
        elif rank in engine_ranks:
            full = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(full, src=src)
        if rank in engine_ranks:
            yield from from_megatron(arch, name, full).items()
        del full


def sync_weights(chunks: list, arch: ModelArch, engine=None, *,
                 engine_ranks: Sequence[int] = (0,)) -> float:
    """Push the trainer's weights into `engine` (given on the engine ranks only); returns seconds.

    A collective: every rank calls it; ranks not in `engine_ranks` pass engine=None. With one
    engine per DP replica, `engine_ranks` lists each replica's first rank.
    """
    start = time.perf_counter()
    stream = hf_weight_stream(chunks, arch, engine_ranks=engine_ranks)
    if dist.get_rank() in engine_ranks:
        if engine is None:
            raise ValueError(f"rank {dist.get_rank()} is an engine rank but was given no engine")
        engine.update_weights(stream)
    for _ in stream:  # drive the sends/gathers (and finish the stream if the engine stopped early)
        pass
    return time.perf_counter() - start
