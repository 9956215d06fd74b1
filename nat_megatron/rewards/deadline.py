"""A wall-clock deadline for one call, via SIGALRM: main thread only, sub-second resolution.

math-verify's own timeouts use `signal.alarm` (whole seconds, per expression rather than per
sample) and a handler that its callers partly swallow. We disable them and wrap the whole
check of one sample instead, raising a BaseException so that the `except Exception` blocks
inside math-verify and sympy cannot absorb it. Signals only reach the main thread, so
`signals_usable()` tells callers when they must fall back to a bounded-time path instead.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class DeadlineExceeded(BaseException):
    """Raised inside the guarded call when its time is up (BaseException: not swallowable)."""


def signals_usable() -> bool:
    """True when a SIGALRM deadline can be armed here (Unix, main thread of the main interpreter)."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def _raise_deadline(signum, frame):
    raise DeadlineExceeded()


def run_with_deadline(fn: Callable[[], T], seconds: float) -> tuple[T | None, bool]:
    """Run `fn()`; return (result, False), or (None, True) if it ran past `seconds`.

    Must be called where `signals_usable()` is true. An outer ITIMER_REAL (someone else's
    alarm) is re-armed afterwards with the time it had left.
    """
    if not signals_usable():
        raise RuntimeError("run_with_deadline needs the main thread; check signals_usable() first")
    if seconds <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {seconds}")
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    started = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, _raise_deadline)
    timed_out, result = False, None
    try:
        try:
            # One-shot: after it fires nothing else can interrupt the clean-up below.
            signal.setitimer(signal.ITIMER_REAL, min(seconds, outer_left) if outer_left else seconds)
            result = fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except DeadlineExceeded:
        timed_out = True
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if outer_left:
            # Never re-arm with 0 (that would cancel it): let an expired outer alarm fire now.
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - started), 1e-3))
    return result, timed_out
