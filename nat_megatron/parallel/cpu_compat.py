"""Run Megatron-Core on a machine without CUDA.

Megatron-Core 0.16 assumes CUDA in a handful of places: `torch.cuda.current_device()` used as a
device argument, literal `device="cuda"`, `.cuda()`, `pin_memory=True`, `torch.cuda.synchronize()`
and the CUDA RNG tracker behind `model_parallel_cuda_manual_seed`. On a CPU-only machine this
module redirects all of them to the CPU (and reports CPU tensors' `.type()` under the CUDA
name that Megatron's optimizers check for), process-wide, so the same Megatron code paths (the real
pipeline schedule, p2p over gloo, tensor/sequence/context parallel, DDP, distributed optimizer)
run unchanged. When CUDA is present, `enable()` does nothing at all.

It is the only place in the project that patches a third-party library.
"""

from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Megatron passes torch.cuda.current_device() (an int) as a device.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device requests of every torch call into CPU ones."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron's optimizers dispatch on 'torch.cuda.FloatTensor' & co.: report the
            # CUDA name of the same dtype.
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        if kwargs.get("device") is not None and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _patch_rng() -> None:
    """Back Megatron's CUDA RNG tracker with the CPU generator.

    The tracker's contract (named states that `fork()` swaps in and out) holds unchanged; the
    CPU default generator plays the role of the device generator.
    """
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    # fork() warns when the CPU state changes inside a forked region: on CPU that is by design.
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)


def enable() -> bool:
    """Install the CPU redirection once per process; returns True when it is active."""
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.set_device = lambda *a, **k: None
    _patch_rng()
    _CudaToCpu().__enter__()  # stays active for the life of the process
    _ENABLED = True
    return True
