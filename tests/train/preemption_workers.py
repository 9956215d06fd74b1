"""Rank functions for the preemption test (run by tests.launcher): no model, just the protocol."""

from __future__ import annotations

import os
import signal

import torch.distributed as dist


def stop_together(*, signal_rank: int, signal_at: int, marker: str, steps: int = 50):
    """Every rank loops 'steps'; one rank signals itself during iteration `signal_at`. Returns the
    iteration at which each rank stopped, and the exit code Preemption.exit raised."""
    from nat_megatron.train.preemption import EXIT_PREEMPTED, MARKER_ENV, Preemption

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    os.environ[MARKER_ENV] = marker
    p = Preemption()
    stopped, code = None, None
    for step in range(1, steps + 1):
        if rank == signal_rank and step == signal_at:
            os.kill(os.getpid(), signal.SIGUSR1 if signal_rank == 0 else signal.SIGTERM)
        if p.requested():
            stopped = step
            try:
                p.exit(step)
            except SystemExit as e:
                code = e.code
            break
    p.restore()
    dist.destroy_process_group()
    return {"rank": rank, "stopped": stopped, "code": code, "expected_code": EXIT_PREEMPTED}
