"""Scoring with a hard per-sample deadline: a persistent worker process, killed when a sample
runs past reward.timeout.

Why a process: a deadline raised inside the scoring thread (SIGALRM, rewards/deadline.py)
only fires between Python bytecodes, so C-level work (a regex backtracking, sympy's C
helpers, a native extension in a custom reward) runs on past it. Killing the process that
does the work stops anything. The worker is started once per process that scores (spawned:
no copy of the trainer's threads, CUDA context or gloo state), warms math-verify before it
takes work (its start-up never counts against a sample's deadline), and is restarted only
after it was killed for a timeout or died. Samples go one at a time over a pipe: the round
trip is ~0.1 ms, so one worker costs nothing next to a step, and each sample gets its own
deadline.

Statuses: the reward's own (ok, wrong, no_answer, ...), `timeout` (killed at the deadline),
`error` (the reward function raised, or the worker died): all score 0 and are counted.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import pickle
import sys
import time
from collections.abc import Sequence

from nat_megatron.rewards.registry import RewardFn, Score

START_TIMEOUT_S = 120.0  # spawning + importing math-verify on a loaded 2-core machine
_worker: ScoringWorker | None = None


def _die_with_parent() -> None:
    """The kernel SIGKILLs the worker when its parent dies (Linux). The same as
    parallel/distributed.py's, which would load torch into this small process."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(1)


def _serve(conn, soft_deadline_s: float) -> None:
    """Worker loop: (fn, completion, answer) in, Score out, until the pipe closes."""
    import signal

    _die_with_parent()
    # A job's stop signal reaches every process of the job; the rank finishes its step (this
    # scoring included) before it stops, so the worker must not die of it. It ends when the
    # rank closes the pipe, or dies with it.
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    from nat_megatron.rewards import verifiers

    verifiers.DEADLINE_S = soft_deadline_s  # math-verify's own graceful deadline, below the kill
    try:
        verifiers._math_verify()  # the ~1 s import, before the first sample's clock starts
    except ImportError:
        pass  # rewards that do not need it still work; math_verify then reports the import error
    conn.send("ready")
    while True:
        try:
            fn, completion, answer = conn.recv()
        except EOFError:
            return
        try:
            score = fn(completion, answer)
            if not isinstance(score, Score):
                raise TypeError(f"reward returned {type(score).__name__}, not a Score")
        except Exception as e:  # noqa: BLE001 - a failing reward scores 0 with a reason
            score = Score(0.0, False, None, "error")
            print(
                f"reward: {getattr(fn, '__qualname__', fn)} raised {type(e).__name__}: {str(e)[:200]}",
                file=sys.stderr,
                flush=True,
            )
        conn.send(score)


class ScoringWorker:
    """One scoring process with a per-sample deadline; restarted after a kill."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.proc = None
        self.conn = None
        self.restarts = 0

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        # The worker's own graceful deadline fires first, so a slow sympy case usually ends as
        # `timeout` without a restart; the kill is for what that deadline cannot interrupt.
        self.proc = ctx.Process(
            target=_serve, args=(child, max(self.timeout * 0.8, 0.05)), daemon=True, name="nat-reward-worker"
        )
        self.proc.start()
        child.close()
        self.conn = parent
        if not parent.poll(START_TIMEOUT_S) or parent.recv() != "ready":
            self.close()
            raise RuntimeError(f"the reward worker did not start within {START_TIMEOUT_S:.0f} s")

    def _kill(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.join(timeout=10)
        if self.conn is not None:
            self.conn.close()
        self.proc, self.conn = None, None
        self.restarts += 1

    def score(self, fn: RewardFn, completion: str, answer: str) -> Score:
        """fn(completion, answer) in the worker; Score 'timeout' or 'error' when it cannot finish."""
        if self.proc is None or not self.proc.is_alive():
            self._start()
        try:
            self.conn.send((fn, completion, answer))
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise ValueError(
                f"reward {getattr(fn, '__qualname__', fn)!r} cannot be sent to the scoring worker "
                f"({e}); register a module-level function"
            ) from None
        except (BrokenPipeError, OSError):
            self._kill()
            return Score(0.0, False, None, "error")
        deadline = time.monotonic() + self.timeout
        try:
            if self.conn.poll(max(deadline - time.monotonic(), 0.0)):
                return self.conn.recv()
        except (EOFError, OSError):  # the worker died on this sample (a crash in C code)
            self._kill()
            return Score(0.0, False, None, "error")
        self._kill()
        return Score(0.0, False, None, "timeout")

    def close(self) -> None:
        """Close the pipe (the worker then exits) and wait for it; kill it if it does not."""
        if self.conn is not None:
            self.conn.close()
        if self.proc is not None:
            self.proc.join(timeout=5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(timeout=5)
        self.proc, self.conn = None, None


@atexit.register
def _close_worker() -> None:
    """Close the pipe so the worker exits (multiprocessing's own exit hook would SIGTERM it,
    which it ignores, and then wait for it)."""
    if _worker is not None:
        _worker.close()


def worker(timeout: float) -> ScoringWorker:
    """This process's scoring worker, with deadline `timeout` (started on first use)."""
    global _worker
    if timeout <= 0:
        raise ValueError(f"reward.timeout: must be > 0 seconds, got {timeout}")
    if _worker is None:
        _worker = ScoringWorker(timeout)
    elif _worker.timeout != timeout:
        _worker.close()
        _worker = ScoringWorker(timeout)
    return _worker


def score_in_worker(fn: RewardFn, completions: Sequence[str], answers: Sequence[str], *, timeout: float) -> list[Score]:
    """Score each pair in this process's worker, each under its own deadline."""
    w = worker(timeout)
    return [w.score(fn, c, a) for c, a in zip(completions, answers)]
