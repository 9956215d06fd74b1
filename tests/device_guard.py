"""A CPU-runnable guard for device discipline around collectives (issue 11, item 1).

On a GPU the process groups are NCCL, which only moves CUDA tensors: a tensor that was moved
to the CPU (or created there) and then all-reduced or all-gathered crashes the first GPU step.
On CPU with gloo nothing fails, so this guard marks tensors that stand for "on the model's
device" with a tensor subclass and makes every tensor collective refuse unmarked ones:

    with device_discipline(chunks):   # marks every parameter's main_grad
        gather_full(chunks, grads=True)

Operations on marked tensors keep the mark (torch's subclass propagation); `.cpu()` and
`.to("cpu")` drop it, like leaving the GPU; a fresh CPU factory call never has it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all_single",
)


class OnDevice(torch.Tensor):
    """A tensor standing for one on the accelerator."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cpu or (func is torch.Tensor.to and _to_cpu(args, kwargs)):
            plain = [a.as_subclass(torch.Tensor) if isinstance(a, cls) else a for a in args]
            with torch._C.DisableTorchFunctionSubclass():
                return func(*plain, **kwargs)
        return super().__torch_function__(func, types, args, kwargs)


def _to_cpu(args, kwargs) -> bool:
    targets = [*args[1:], kwargs.get("device")]
    return any(isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu" for a in targets if a is not None)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


@contextlib.contextmanager
def device_discipline(chunks):
    """Mark every parameter's main_grad as on-device and make tensor collectives refuse
    unmarked tensors (a RuntimeError naming the collective) while inside."""
    from nat_megatron.checkpoint.gather import unwrap

    params = [p for c in chunks for p in unwrap(c).parameters() if hasattr(p, "main_grad")]
    saved = [p.main_grad for p in params]
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def guarded(name):
        def call(*args, **kwargs):
            for t in _tensors([*args, *kwargs.values()]):
                if not isinstance(t, OnDevice):
                    raise RuntimeError(
                        f"torch.distributed.{name} got a tensor that is not on the "
                        "model's device (NCCL would crash here)"
                    )
            return originals[name](*args, **kwargs)

        return call

    try:
        for p in params:
            p.main_grad = p.main_grad.as_subclass(OnDevice)
        for name in COLLECTIVES:
            setattr(dist, name, guarded(name))
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        for p, g in zip(params, saved):
            p.main_grad = g
