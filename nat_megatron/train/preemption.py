"""Preemption: finish the step in progress, save, and exit with EXIT_PREEMPTED for a requeue.

SLURM warns a job before its time limit (train.sbatch: `--signal=B:USR1@<lead seconds>`, which
the batch script passes on to every rank) and sends SIGTERM to every process of a job it
preempts or cancels. A rank's handler only records the signal. After each step all ranks
take the MAX of their flags (one tiny all_reduce), so a signal that reaches the ranks at
different moments still stops them all after the same step; the trainer then saves and
every rank exits with EXIT_PREEMPTED.

torchrun turns any rank's non-zero exit into its own exit code 1, so the code cannot reach
the batch script: with NAT_PREEMPTED_FILE set (train.sbatch sets it), rank 0 also writes the
saved step into that file, and the script requeues the job only when the file is there, i.e.
only after the checkpoint is complete.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
MARKER_ENV = "NAT_PREEMPTED_FILE"


class Preemption:
    """Records SIGTERM / SIGUSR1 and tells all ranks together when to stop."""

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS):
        self.received: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received = signum

    def requested(self) -> bool:
        """Collective: True on every rank when any rank has received a stop signal."""
        flag = 1.0 if self.received is not None else 0.0
        if not dist.is_initialized():
            return flag > 0
        device = torch.cuda.current_device() if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([flag], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def exit(self, step: int) -> None:
        """After the checkpoint of `step` is saved: tell the launcher (rank 0) and exit."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            name = signal.Signals(self.received).name if self.received else "a signal on another rank"
            print(
                f"preempted ({name}): checkpoint of step {step} saved; exiting with {EXIT_PREEMPTED} for a requeue",
                flush=True,
            )
            marker = os.environ.get(MARKER_ENV)
            if marker:
                Path(marker).write_text(f"{step}\n")
        raise SystemExit(EXIT_PREEMPTED)

    def restore(self) -> None:
        """Give the signals back their previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
