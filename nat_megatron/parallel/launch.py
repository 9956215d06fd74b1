"""Start the ranks a job needs.

- `relaunch`: re-run a command under torchrun (the CLI tools).
- `launch_function`: call module:function on N fresh local processes with env:// rendezvous
  (gloo on CPU, NCCL on GPU) and collect each rank's return value (tests, the tuner's
  --validate).
- `single_process_env`: make this process a world of one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_distributed_job() -> bool:
    """True inside torchrun/srun-started ranks (RANK is set)."""
    return "RANK" in os.environ


def threads_per_rank(nprocs: int) -> int:
    """This machine's cores (as far as this process may use them) shared out over nprocs ranks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // nprocs)


def relaunch(nprocs: int, args: list[str]) -> int:
    """Run `python <args>` as nprocs local ranks under torchrun; returns the exit code.

    Each rank gets cores/nprocs threads (torchrun alone would give every rank one thread):
    the trainer and the rank's rollout engine (which reads OMP_NUM_THREADS) both use them.
    An OMP_NUM_THREADS set by the user wins. The ranks find this package whatever the working
    directory (`args` may be `-m nat_megatron...`), as launch_function's do.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nprocs}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        *args,
    ]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nprocs)))
    return subprocess.call(cmd, env=env)


def single_process_env() -> None:
    """Make this process rank 0 of a world of 1 (env:// rendezvous on a free local port)."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def launch_function(target: str, nprocs: int, *, timeout: float = 600, threads: int = 1, **kwargs) -> list:
    """Call module:function on `nprocs` ranks; returns each rank's result."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(kwargs, Path(tmp) / "kwargs.pt")
        port = free_port()
        procs, logs = [], []
        for rank in range(nprocs):
            env = dict(
                os.environ,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(nprocs),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS=str(threads),
                PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            )
            log = open(Path(tmp) / f"rank{rank}.log", "w+")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "nat_megatron.parallel.launch", target, tmp],
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            logs.append(log)
        failed = None
        try:
            for rank, p in enumerate(procs):
                if p.wait(timeout=timeout) != 0 and failed is None:
                    failed = f"rank {rank} exited with {p.returncode}"
        except subprocess.TimeoutExpired:
            failed = f"timed out after {timeout} s"
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        tails = []
        for rank, log in enumerate(logs):
            log.seek(0)
            tails.append(f"--- rank {rank} ---\n" + "".join(log.readlines()[-40:]))
            log.close()
        if failed:
            raise RuntimeError(f"{target} on {nprocs} ranks: {failed}\n" + "\n".join(tails))
        return [torch.load(Path(tmp) / f"result{r}.pt", weights_only=False) for r in range(nprocs)]


def _main(target: str, tmp: str) -> None:
    import importlib

    import nat_megatron  # noqa: F401  (quiets optional-extension warnings)

    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    kwargs = torch.load(Path(tmp) / "kwargs.pt", weights_only=False)
    result = fn(**kwargs)
    torch.save(result, Path(tmp) / f"result{os.environ['RANK']}.pt")


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
