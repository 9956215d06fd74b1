"""One job per checkpoint.dir: a lock file naming its holder (host, pid, SLURM job).

Two jobs sharing a directory would resume from and prune each other's checkpoints. The lock
is created atomically (O_EXCL) by rank 0 and removed at the end of the run. A lock left by a
job that died without removing it (kill -9, a node failure) is taken over when its holder is
provably gone: a pid no longer alive on this same host, or the same SLURM job id (a requeued
job is a new incarnation of the holder). Anything else is an error naming the holder.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
from pathlib import Path

import torch.distributed as dist

LOCK = ".lock"


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID")}


def pid_alive(pid: int) -> bool:
    """True for a running process on this host (a zombie, dead but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _stale(holder: dict, me: dict) -> bool:
    if holder.get("slurm_job") and holder["slurm_job"] == me["slurm_job"]:
        return True
    return holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not pid_alive(holder["pid"])


class DirLock:
    """The lock of one directory, held by this process until release()."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK
        self.owner = _me()
        self.taken_over: dict | None = None

    def acquire(self) -> DirLock:
        """Create the lock file, taking over a stale one; ValueError naming a live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder == {}:  # removed meanwhile: try again
                    continue
                if holder is None or not _stale(holder, self.owner):
                    raise ValueError(self._busy(holder)) from None
                self.taken_over = holder
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
                f.flush()
                os.fsync(f.fileno())
            atexit.register(self.release)  # also when the job ends in an exception
            return self
        raise ValueError(self._busy(self._holder()))

    def holder(self) -> dict | None:
        """Who holds the lock: the lock file's content, {} when there is none, None if unreadable."""
        return self._holder()

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _busy(self, holder: dict | None) -> str:
        if holder is None:
            return (
                f"checkpoint.dir: {self.path.parent} is locked by an unreadable lock file {self.path}; "
                "if no other job uses this directory, delete that file"
            )
        job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
        return (
            f"checkpoint.dir: {self.path.parent} is in use by pid {holder.get('pid')} on host "
            f"{holder.get('host')}{job} (lock file {self.path}); give this job another checkpoint.dir, "
            "or stop that job (delete the lock file only if that job is gone)"
        )

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if self._holder() == self.owner:
            self.path.unlink(missing_ok=True)


def hold_checkpoint_dir(directory: str | Path) -> DirLock | None:
    """Collective: rank 0 takes the directory's lock; every rank raises the same error if it cannot."""
    lock, error = None, None
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        try:
            lock = DirLock(directory).acquire()
        except ValueError as e:
            error = str(e)
        if lock is not None and lock.taken_over:
            print(f"checkpoint: warning: took over the stale lock of {lock.taken_over} ({lock.path})", flush=True)
    box = [error]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise ValueError(box[0])
    return lock
