"""Start the ranks a command needs: re-run it under torchrun, or set up a 1-process world."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_distributed_job() -> bool:
    """True inside torchrun/srun-started ranks (RANK is set)."""
    return "RANK" in os.environ


def relaunch(nprocs: int, args: list[str]) -> int:
    """Run `python <args>` as nprocs local ranks under torchrun; returns the exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nprocs}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", *args]
    return subprocess.call(cmd)


def single_process_env() -> None:
    """Make this process rank 0 of a world of 1 (env:// rendezvous on a free local port)."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
