"""OTB proxy checks run on every rank by tests.launcher (tests/nat/test_otb_proxy.py).

The logit-gradient proxy from vocab-parallel logits. Every rank takes its vocabulary slice of
the same full (padded) logits for the TP value, and also computes the TP1 value on the full
logits in the same process (Megatron's TP size/rank overrides), which saves a second launch.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from nat_megatron.model.logprobs import vocab_parallel_token_stats
from nat_megatron.nat.otb import logit_gradient_proxy
from nat_megatron.parallel.distributed import init_distributed, shutdown
from nat_megatron.parallel.layout import Layout


def _proxy(logits, targets, vocab_size) -> dict[str, torch.Tensor]:
    stats = vocab_parallel_token_stats(logits, targets, vocab_size, sum_p2=True)
    return {"proxy": logit_gradient_proxy(stats["logprobs"], stats["sum_p2"]), "logprobs": stats["logprobs"]}


def _proxy_tp1(logits, targets, vocab_size) -> dict[str, torch.Tensor]:
    """The TP1 path (rank 0 of 1, no all-reduce) on the full logits, inside a TP>1 process."""
    parallel_state.set_tensor_model_parallel_world_size(1)
    parallel_state.set_tensor_model_parallel_rank(0)
    try:
        return _proxy(logits, targets, vocab_size)
    finally:  # None: the getters read the real TP group again
        parallel_state.set_tensor_model_parallel_world_size(None)
        parallel_state.set_tensor_model_parallel_rank(None)


def proxy_on_tp_ranks(*, cases: list[dict], tp: int) -> dict:
    """For each case {"logits": [..., V_padded], "targets": [...], "vocab_size": V}: the proxy
    1 - 2 p_y + sum_v p^2 (and log p_y) from this TP rank's vocabulary slice (V_padded
    divisible by tp), under "tp"; the same on the full logits at TP1, under "tp1"."""
    init_distributed(Layout(tp=tp), seed=1234)
    rank = parallel_state.get_tensor_model_parallel_rank()
    out = {"tp_size": parallel_state.get_tensor_model_parallel_world_size(), "tp": [], "tp1": []}
    for case in cases:
        logits, targets, vocab = case["logits"], case["targets"], case["vocab_size"]
        width = logits.shape[-1] // tp
        out["tp"].append(_proxy(logits[..., rank * width : (rank + 1) * width], targets, vocab))
        out["tp1"].append(_proxy_tp1(logits, targets, vocab))
    # The overrides were undone: this process is back to its real TP size.
    out["tp_size_after"] = parallel_state.get_tensor_model_parallel_world_size()
    shutdown()
    return out
