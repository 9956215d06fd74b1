"""Stream the trainer's weights, as full HF-named tensors, into every rank's rollout engine.

A collective over the whole world: every rank calls `sync_weights` (or iterates
`hf_weight_stream` to the end) with its own model chunks, in any TP/PP/VPP/CP/DP layout.

The parameters are cut into buckets of at most `bucket_bytes` (a parameter larger than that
travels alone), in model order, each holding parameters of one pipeline stage. For a bucket,
the tensor-parallel group of the owning stage (in data-parallel and context-parallel replica 0)
gathers its shards straight into a flat buffer on its first rank, which broadcasts the buffer
to every rank (NCCL on GPU, gloo on CPU). Each rank then reassembles the full Megatron tensors,
splits them into HF tensors with the one mapping (checkpoint/hf_mapping.py) and hands them to
its engine, whose layerwise reload keeps only the slice for its own tensor-parallel rank
(vLLM's fused QKV and gate_up layouts are its own business, from HF names).

Memory: a rank holds one bucket plus the one full tensor being converted, beyond its shards.
Traffic: every rank receives the whole model once per sync (a broadcast); with several engines
that is what each engine needs anyway, and it keeps the trainer's and the engines' sharding
independent of each other. Without tensor and pipeline parallelism every rank already holds the
whole model, and each engine takes its own rank's copy: nothing travels.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nat_megatron.checkpoint.gather import unwrap
from nat_megatron.checkpoint.hf_mapping import from_megatron, global_name, megatron_names, partition_dim, tp_unshard
from nat_megatron.model.arch import ModelArch
from nat_megatron.parallel.distributed import cpu_group

MiB = 1024**2


@dataclass(frozen=True)
class _Param:
    """One global parameter: where it lives and how its TP shards make the full tensor."""

    name: str
    src: int  # global rank of TP rank 0 of the owning stage (DP 0, CP 0)
    shard_shape: tuple[int, ...]
    dtype: torch.dtype
    partition_dim: int | None  # None: replicated over TP

    def numel(self, tp: int) -> int:
        n = 1
        for d in self.shard_shape:
            n *= d
        return n * (tp if self.partition_dim is not None else 1)


def _is_source(name: str, model) -> bool:
    # The output layer of a tied model is a copy of the embedding on the last stage.
    return not (name == "output_layer.weight" and model.share_embeddings_and_output_weights)


def _local_params(models: list) -> dict[str, torch.nn.Parameter]:
    return {global_name(m, n): p for m in models for n, p in m.named_parameters() if _is_source(n, m)}


def _plan(models: list, arch: ModelArch) -> list[_Param]:
    """Every parameter in model order, as described by its source rank; identical on all ranks."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    mine = []
    if (
        parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
        and parallel_state.get_context_parallel_rank() == 0
    ):
        for name, p in _local_params(models).items():
            mine.append(_Param(name, dist.get_rank(), tuple(p.shape), p.dtype, partition_dim(p) if tp > 1 else None))
    held = [None] * dist.get_world_size()
    dist.all_gather_object(held, mine, group=cpu_group())
    where = {p.name: p for part in held for p in part}
    missing = [n for n in megatron_names(arch) if n not in where]
    if missing:
        raise ValueError(
            f"no rank holds {missing[:3]}...: the model chunks do not match the "
            f"{arch.family} arch with {arch.num_layers} layers"
        )
    return [where[n] for n in megatron_names(arch)]


def _buckets(plan: list[_Param], tp: int, bucket_bytes: int) -> list[list[_Param]]:
    """Consecutive parameters of one source and dtype, at most bucket_bytes each (or one)."""
    buckets, size = [], 0
    for p in plan:
        nbytes = p.numel(tp) * p.dtype.itemsize
        last = buckets[-1] if buckets else None
        if last and last[0].src == p.src and last[0].dtype == p.dtype and size + nbytes <= bucket_bytes:
            last.append(p)
            size += nbytes
        else:
            buckets.append([p])
            size = nbytes
    return buckets


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def hf_weight_stream(
    chunks: list, arch: ModelArch, *, to: int | None = None, bucket_bytes: int = 512 * MiB, stats: dict | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Generator of (HF name, full tensor) on every rank (to=None) or on global rank `to` only.

    Every rank must iterate its generator to the end (the collectives run while it does).
    Tensors keep the trainer's dtype and device; each is valid until the next one is asked
    for. `stats`, if given, receives "bytes" (the buffers this rank received or sent).
    """
    models = [unwrap(c) for c in chunks]
    plan = _plan(models, arch)
    local = _local_params(models)
    rank, device = dist.get_rank(), _device()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    # Only the DP-0 / CP-0 replica of each stage sends; the other replicas hold copies.
    in_source_replica = parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_context_parallel_rank() == 0
    if to is None and tp == 1 and parallel_state.get_pipeline_model_parallel_world_size() == 1:
        # Every rank holds the whole model (data/context-parallel replicas are identical after
        # the optimizer step): each engine takes its rank's own copy, nothing travels.
        for p in plan:
            yield from from_megatron(arch, p.name, local[p.name].detach().view(p.shard_shape)).items()
        if stats is not None:
            stats["bytes"] = 0
        return
    moved = 0
    for bucket in _buckets(plan, tp, bucket_bytes):
        src, dtype = bucket[0].src, bucket[0].dtype
        sizes = [p.numel(tp) for p in bucket]
        buffer = None
        if to is None or rank in (src, to):
            buffer = torch.empty(sum(sizes), dtype=dtype, device=device)
            regions = buffer.split(sizes)
        if in_source_replica and bucket[0].name in local:  # the TP group of the owning stage
            for i, p in enumerate(bucket):
                shard = local[p.name].detach().reshape(-1)
                if p.partition_dim is None:
                    if rank == src:
                        regions[i].copy_(shard)
                    continue
                parts = list(regions[i].view(tp, -1).unbind(0)) if rank == src else None
                dist.gather(shard, parts, dst=src, group=tp_group)
        if to is None:
            dist.broadcast(buffer, src=src)
        elif src != to and rank == src:
            dist.send(buffer, dst=to)
        elif src != to and rank == to:
            dist.recv(buffer, src=src)
        if buffer is None:
            continue
        moved += buffer.numel() * buffer.element_size()
        if to is not None and rank != to:
            del buffer, regions
            continue
        for p, region in zip(bucket, regions):
            if p.partition_dim is None:
                full = region.view(p.shard_shape)
            elif p.partition_dim == 0 and not p.name.endswith("linear_fc1.weight"):
                full = region.view(-1, *p.shard_shape[1:])  # the shards in rank order: no copy
            else:
                full = tp_unshard(p.name, list(region.view(tp, *p.shard_shape).unbind(0)), p.partition_dim)
            yield from from_megatron(arch, p.name, full).items()
            del full
        del buffer, regions
    if stats is not None:
        stats["bytes"] = moved


def sync_weights(chunks: list, arch: ModelArch, engine, *, bucket_bytes: int = 512 * MiB) -> dict:
    """Push the trainer's weights into this rank's `engine`; every rank calls it (a collective).

    Returns {"seconds": ..., "bytes": ...} (bytes this rank received or sent).
    """
    start = time.perf_counter()
    stats: dict = {}
    stream = hf_weight_stream(chunks, arch, bucket_bytes=bucket_bytes, stats=stats)
    engine.update_weights(stream)
    for _ in stream:  # finish the collectives should the engine have stopped early
        pass
    return {"seconds": time.perf_counter() - start, "bytes": stats.get("bytes", 0)}
