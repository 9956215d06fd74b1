"""Process-group set-up: torch.distributed, Megatron's parallel_state and the RNG trackers."""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from nat_megatron.parallel import cpu_compat
from nat_megatron.parallel.layout import Layout


def init_distributed(layout: Layout, *, seed: int = 1234, timeout_minutes: int = 30) -> None:
    """Join the job's process group (env:// from torchrun/srun) and build Megatron's groups."""
    _die_with_launcher()
    cpu_compat.enable()
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
    set_seed(seed)


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
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
