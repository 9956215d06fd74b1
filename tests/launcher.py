"""Run a function on N gloo ranks, each a fresh Python process, and collect what it returns.

    results = launch("tests.parallel.workers:train_step", nprocs=4, layout=..., ...)

Every rank calls the function with the same keyword arguments; each return value is saved
with torch.save and loaded back in rank order. A rank that fails (or a hang past `timeout`)
fails the test with every rank's stderr tail.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(target: str, nprocs: int, *, timeout: float = 600, **kwargs) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(kwargs, Path(tmp) / "kwargs.pt")
        port = free_port()
        procs, logs = [], []
        for rank in range(nprocs):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       OMP_NUM_THREADS=os.environ.get("NAT_TEST_THREADS", "1"),
                       PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
            log = open(Path(tmp) / f"rank{rank}.log", "w+")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.launcher", target, tmp], env=env, cwd=ROOT,
                stdout=log, stderr=subprocess.STDOUT))
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
        if failed:
            tails = []
            for rank, log in enumerate(logs):
                log.seek(0)
                tails.append(f"--- rank {rank} ---\n" + "".join(log.readlines()[-40:]))
            raise AssertionError(f"{target} on {nprocs} ranks: {failed}\n" + "\n".join(tails))
        for log in logs:
            log.close()
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
