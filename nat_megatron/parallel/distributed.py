"""Process-group set-up: torch.distributed, Megatron's parallel_state and the RNG trackers.

Besides Megatron's groups (NCCL on GPU) the job gets gloo groups for control data that lives
in host memory (rollout samples, rewards, per-step metrics): `cpu_group()` spans the world,
`replica_group()` the ranks of this data-parallel replica (every TP, PP and CP rank that trains
the same samples). A CPU tensor must never meet an NCCL group, so host data goes through these.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from nat_megatron import patches
from nat_megatron.parallel.layout import Layout


def init_distributed(layout: Layout, *, seed: int = 1234, timeout_minutes: int = 30) -> None:
    """Join the job's process group (env:// from torchrun/srun) and build Megatron's groups."""
    _die_with_launcher()
    patches.enable_cpu_megatron()
    patches.quiet_third_party_warnings()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    if dist.get_world_size() != layout.world_size:
        raise ValueError(
            f"layout tp*pp*cp*dp = {layout.world_size} but the job has {dist.get_world_size()} "
            "processes; change dp (or tp/pp/cp), or the number of processes"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
    )
    _build_cpu_groups()
    set_seed(seed)


_GROUPS: dict[str, dist.ProcessGroup] = {}


def _build_cpu_groups() -> None:
    """The gloo world and one gloo group per data-parallel replica (every rank builds all)."""
    _GROUPS.clear()
    gloo = dist.get_backend() == "gloo"
    _GROUPS["world"] = dist.group.WORLD if gloo else dist.new_group(backend="gloo")
    replica_of = [None] * dist.get_world_size()
    dist.all_gather_object(replica_of, parallel_state.get_data_parallel_rank(), group=_GROUPS["world"])
    for replica in sorted(set(replica_of)):
        ranks = [r for r, d in enumerate(replica_of) if d == replica]
        group = dist.new_group(ranks, backend="gloo")
        if replica == replica_of[dist.get_rank()]:
            _GROUPS["replica"] = group
            _GROUPS["replica_ranks"] = ranks


def cpu_group() -> dist.ProcessGroup:
    """A gloo group over the whole job, for host-memory collectives."""
    return _GROUPS["world"]


def replica_group() -> dist.ProcessGroup:
    """A gloo group over the ranks of this data-parallel replica (same samples, all stages)."""
    return _GROUPS["replica"]


def replica_ranks() -> list[int]:
    """Global ranks of this data-parallel replica, ascending; the first one leads it."""
    return _GROUPS["replica_ranks"]


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() == 1:  # the parent died before we asked
        os._exit(1)


def _die_with_launcher() -> None:
    """torchrun starts every rank in a session of its own, so a kill -9 of the launcher (or of
    a job step) would leave the ranks training on as orphans, still writing checkpoints. On
    Linux, ask the kernel to kill this rank when its parent (torchrun's agent) dies."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()


def set_seed(seed: int) -> None:
    """Seed torch and Megatron's tensor-parallel RNG tracker (same DP seed, per-TP-rank offsets)."""
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Tear down Megatron's groups and the process group (gloo ranks may abort otherwise)."""
    _GROUPS.clear()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
