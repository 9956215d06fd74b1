"""Distributed checkpoints (Megatron torch_dist): model, optimizer, RNG and trainer state.

Layout-independent: tensors are stored by global key and shape, so model weights saved at one
TP/PP layout load at another. A save is atomic: it is written into `<name>.partial/` and
renamed only after every rank finished and a manifest of its files (checkpoint/integrity.py)
is written and synced; `latest` is replaced atomically after that, so a crash during a save
leaves the previous checkpoint as the latest good one. A load first checks the files against
that manifest: a checkpoint is trusted input (see integrity.py), a mismatch is refused.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.serialization import load_tensors_metadata

from nat_megatron import patches
from nat_megatron.checkpoint.gather import unwrap
from nat_megatron.checkpoint.integrity import (
    COMPLETE_MARK,
    checkpoint_files,
    complete_checkpoints,
    fsync_dir,
    hash_share,
    prune,
    verify_share,
    write_manifest,
    write_pointer,
)

RUN_META = "run.json"  # the resolved config and dataset fingerprint: plain JSON, read before any load
# Fault injection for the kill-during-save test (tests/train/test_kill_resume.py): with this set
# to N seconds, every save sleeps N s between writing `<name>.partial/` and renaming it, after
# printing a line naming the partial directory, so a test can kill the job inside a save.
FAULT_SAVE_DELAY_ENV = "NAT_MEGATRON_FAULT_SAVE_DELAY_S"
# Optimizer state format: each rank saves and loads its own buffers with no gathering; the
# optimizer state then reshards over DP only (model weights load at any layout).
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def _model_keys(chunks: list) -> list[str]:
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _model_state(chunks: list) -> dict:
    return {k: unwrap(c).sharded_state_dict() for k, c in zip(_model_keys(chunks), chunks)}


def _rng_object() -> ShardedObject:
    """This rank's RNG states, one object per (pp, tp, cp) position, replicated over DP."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    ps = parallel_state
    shape = (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_context_parallel_world_size(),
    )
    offset = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_context_parallel_rank(),
    )
    return ShardedObject("rng_state", state, shape, offset, replica_id=ps.get_data_parallel_rank())


def _restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded: its files do not match its manifest."""


def _writer_manager_init() -> None:
    """Start of the checkpoint writer's Manager process (patches.writer_results_die_with_rank):
    die with the rank; ignore SIGTERM/SIGUSR1/SIGINT. A job's stop signal reaches every process
    of the job, and the rank saves a checkpoint after it (train/preemption.py), which needs this
    process alive."""
    import signal

    from nat_megatron.parallel.distributed import die_with_parent

    die_with_parent()
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def save_checkpoint(
    path: str | Path, chunks: list, *, optimizer=None, extra: dict | None = None, meta: dict | None = None
) -> Path:
    """Save model (+ optimizer, RNG, `extra` trainer state) atomically as `path`, with `meta`
    (JSON) as run.json and a manifest of every file."""
    patches.writer_results_die_with_rank(_writer_manager_init)
    final = Path(path)
    partial = final.with_name(final.name + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    state = _model_state(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(_model_state(chunks), metadata=OPTIMIZER_FORMAT)
        state["rng_state"] = _rng_object()
        state["adam_steps"] = _adam_steps(optimizer)
    state["extra"] = extra or {}
    dist_checkpointing.save(state, str(partial))
    dist.barrier()
    _write_manifest(partial, meta)
    delay = float(os.environ.get(FAULT_SAVE_DELAY_ENV) or 0)
    if delay > 0:  # fault injection only (see FAULT_SAVE_DELAY_ENV)
        if dist.get_rank() == 0:
            print(f"fault injection: {FAULT_SAVE_DELAY_ENV}={delay}: sleeping in save of {partial}", flush=True)
        time.sleep(delay)
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        fsync_dir(final.parent)
    dist.barrier()
    return final


def _write_manifest(partial: Path, meta: dict | None) -> None:
    """Every rank hashes (and syncs) its share of the files; rank 0 writes run.json and the manifest."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0 and meta is not None:
        (partial / RUN_META).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    names = [checkpoint_files(partial) if rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    shares = [None] * world
    dist.all_gather_object(shares, hash_share(partial, names[0], rank=rank, world=world))
    if rank == 0:
        write_manifest(partial, {k: v for share in shares for k, v in share.items()})
    dist.barrier()


def mark_latest(
    root: str | Path, name: str, *, keep_last: int | None = None, protect: tuple[Path | None, ...] = ()
) -> None:
    """Point root/latest at root/name (atomically, synced), then delete the complete
    checkpoints beyond the keep_last highest steps, never root/name nor one in `protect`."""
    root = Path(root)
    write_pointer(root, name)
    if keep_last:
        prune(root, keep_last, protect=(root / name, *protect))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under root, or None (not yet verified)."""
    found = complete_checkpoints(Path(root))
    return found[0] if found else None


def read_meta(path: str | Path) -> dict | None:
    """The run.json a checkpoint was saved with (None for one saved without)."""
    f = Path(path) / RUN_META
    return json.loads(f.read_text()) if f.is_file() else None


def verify_checkpoint(path: str | Path) -> None:
    """Collective: check every file of `path` against its manifest (ranks share the hashing);
    CheckpointError naming the files otherwise, on every rank."""
    path = Path(path)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problems = verify_share(path, rank=rank, world=world)
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, problems)
        problems = [p for share in shares for p in share]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"checkpoint {path} fails its manifest check: {'; '.join(problems[:3])}{more}; "
            "it is not loaded (a checkpoint is trusted input): resume from another one"
        )


def _check_against_metadata(path: Path, state: dict) -> None:
    """Name the first tensor the checkpoint lacks or stores with another shape."""
    stored = load_tensors_metadata(str(path))
    for item in _leaves(state):
        if isinstance(item, ShardedTensor):
            if item.key not in stored:
                raise ValueError(
                    f"checkpoint {path} has no tensor {item.key!r}: it was saved from "
                    "another model (check config.json / the model preset)"
                )
            if tuple(stored[item.key].global_shape) != tuple(item.global_shape):
                raise ValueError(
                    f"checkpoint {path}: tensor {item.key!r} has shape "
                    f"{tuple(stored[item.key].global_shape)}, the model expects "
                    f"{tuple(item.global_shape)}: the checkpoint belongs to another model size"
                )


def _leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


def _torch_adams(optimizer):
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            yield inner


def _ensure_adam_state(optimizer) -> None:
    """Give a fresh torch Adam the per-parameter state a step would create (zeros, step 0).

    Without Apex/TE, Megatron's optimizer state dict reads each parameter's 'step', so a
    never-stepped optimizer cannot build the state dict that the checkpoint loads into.
    """
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.zeros_like(p),
                    }


def _adam_steps(optimizer) -> list[float]:
    """Each torch Adam's step count (the same for all its parameters)."""
    return [
        max((float(st["step"]) for st in inner.state.values() if "step" in st), default=0.0)
        for inner in _torch_adams(optimizer)
    ]


def _restore_adam_steps(optimizer, steps: list[float]) -> None:
    """Set each parameter's own 'step' tensor after a load.

    Megatron's load (torch-optimizer fallback) does not bring the step count back from a
    dp_reshardable checkpoint, and it gives every parameter the SAME step tensor, which torch
    Adam then increments in place once per parameter. Adam's bias correction needs the right
    count, so it travels in the checkpoint explicitly.
    """
    for inner, step in zip(_torch_adams(optimizer), steps):
        for state in inner.state.values():
            state["step"] = torch.tensor(float(step))


def load_checkpoint(
    path: str | Path, chunks: list, *, optimizer=None, load_rng: bool = True, verify: bool = True
) -> dict:
    """Load weights (any layout), and optimizer + RNG when given/asked; returns `extra`.
    The files are checked against the manifest first (CheckpointError on a mismatch)."""
    path = Path(path)
    if not (path / COMPLETE_MARK).is_file():
        raise ValueError(f"{path} is not a complete distributed checkpoint (no {COMPLETE_MARK})")
    if verify:  # verify=False: the caller just ran verify_checkpoint
        verify_checkpoint(path)
    state = _model_state(chunks)
    _check_against_metadata(path, state)
    if optimizer is not None:
        _ensure_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            _model_state(chunks), is_loading=True, metadata=OPTIMIZER_FORMAT
        )
        if load_rng:
            state["rng_state"] = _rng_object()
    loaded = dist_checkpointing.load(state, str(path))
    for key, chunk in zip(_model_keys(chunks), chunks):
        unwrap(chunk).load_state_dict(loaded[key])
    if optimizer is not None:
        # In fp32 training the optimizer's main params are views of the model params, which
        # Megatron copies into in place: that is only legal outside autograd.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer, loaded["adam_steps"])
        if load_rng:
            _restore_rng(loaded["rng_state"])
    return dist_checkpointing.load_common_state_dict(str(path)).get("extra", {})
