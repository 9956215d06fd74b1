"""Peak memory of the tensors a process holds: CUDA allocator stats on GPU, a live-tensor tracker on CPU.

torch has no allocator statistics for CPU tensors, so `LiveTensorBytes` counts them itself: a
TorchDispatchMode sees the output of every ATen op (forward, backward, optimizer, collectives),
records each new storage once, and drops it when its StorageImpl is gone. Expiry is checked
through a weak reference (`StorageWeakRef`), which follows the storage itself rather than
any one tensor, so storages kept alive only by autograd's saved tensors are still counted.
Sweeping every storage after every op would be slow; the sum is swept only when it would
set a new peak, so the peak is exact while the running figure may lag between peaks.

Not counted: scratch buffers a kernel allocates and frees inside one op, and tensors created
before the mode was entered (enter it before building the model).
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of live tensor storages created under the mode, and their peak."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self._total = 0  # upper bound: includes storages that died since the last sweep
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        grew = False
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta":
                grew |= self._track(t.untyped_storage())
        if grew and self._total > self.peak:
            self._sweep()
            self.peak = max(self.peak, self._total)
        return out

    def _track(self, storage) -> bool:
        key, nbytes = storage._cdata, storage.nbytes()
        entry = self._live.get(key)
        if entry is not None:
            if entry[1] == nbytes:
                return False
            self._total -= entry[1]  # resized in place
        self._live[key] = (entry[0] if entry else StorageWeakRef(storage), nbytes)
        self._total += nbytes
        return True

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            self._total -= self._live.pop(k)[1]

    @property
    def current(self) -> int:
        """Bytes of tracked storages alive now."""
        self._sweep()
        return self._total

    def reset_peak(self) -> None:
        """Start a new peak from the bytes alive now."""
        self.peak = self.current


class PeakMemory:
    """Context manager: peak tensor bytes of this process (CUDA allocator, or LiveTensorBytes)."""

    def __init__(self):
        self._mode = None if torch.cuda.is_available() else LiveTensorBytes()

    def __enter__(self) -> PeakMemory:
        if self._mode is not None:
            self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self._mode is not None:
            self._mode.__exit__(*exc)

    def reset_peak(self) -> None:
        """Measure the peak from now on."""
        if self._mode is None:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._mode.reset_peak()

    @property
    def peak(self) -> int:
        """Peak bytes since the last reset_peak."""
        if self._mode is None:
            return torch.cuda.max_memory_allocated()
        return self._mode.peak

    @property
    def current(self) -> int:
        """Bytes alive now."""
        if self._mode is None:
            return torch.cuda.memory_allocated()
        return self._mode.current
