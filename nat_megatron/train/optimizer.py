"""Megatron DDP wrapping and the (distributed) optimizer."""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer


def wrap_ddp(
    chunks: list, *, use_distributed_optimizer: bool = True, grad_reduce_in_fp32: bool = True
) -> list[DistributedDataParallel]:
    """Wrap every model chunk in Megatron DDP (contiguous grad buffers, main_grad)."""
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        use_distributed_optimizer=use_distributed_optimizer,
        overlap_grad_reduce=False,
    )
    wrapped = [
        DistributedDataParallel(
            config=config,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk's buckets start reducing early.
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(chunks)
    ]
    # The schedule calls this after the last backward: DP/CP grad all-reduce, tied-embedding
    # and norm all-reduces, then division by the global normaliser (num_tokens).
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def build_optimizer(
    chunks: list,
    *,
    lr: float,
    min_lr: float = 0.0,
    weight_decay: float = 0.0,
    clip_grad: float = 1.0,
    optimizer: str = "adam",
    use_distributed_optimizer: bool = True,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    adam_eps: float = 1e-8,
    sgd_momentum: float = 0.9,
    bf16: bool = False,
):
    """Megatron optimizer over DDP-wrapped chunks (torch Adam/SGD when Apex/TE are absent)."""
    cfg = OptimizerConfig(
        # min_lr lands in every param group, where Megatron's LR scheduler reads it.
        optimizer=optimizer,
        lr=lr,
        min_lr=min_lr,
        weight_decay=weight_decay,
        clip_grad=clip_grad,
        adam_beta1=adam_beta1,
        adam_beta2=adam_beta2,
        adam_eps=adam_eps,
        sgd_momentum=sgd_momentum,
        use_distributed_optimizer=use_distributed_optimizer,
        bf16=bf16,
    )
    optim = get_megatron_optimizer(cfg, chunks)
    _fuse_cpu_adam(optim)
    return optim


def _fuse_cpu_adam(optim) -> None:
    """Without Apex or Transformer Engine Megatron steps with torch's AdamW, which on CPU runs
    its per-tensor loop; torch's fused CPU kernel computes the same update ~5x faster (135M fp32
    parameters on one core: 0.19 s against 0.97 s per step, measured). On GPU Megatron's own
    fused Adam is used and nothing changes here."""
    for inner in getattr(optim, "chained_optimizers", [optim]):
        torch_optim = getattr(inner, "optimizer", None)
        if not isinstance(torch_optim, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in torch_optim.param_groups:
            if all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) for p in group["params"]):
                group["fused"], group["foreach"] = True, False


def build_scheduler(
    optimizer,
    *,
    lr: float,
    min_lr: float = 0.0,
    warmup_steps: int = 0,
    total_steps: int,
    decay_style: str = "cosine",
    weight_decay: float = 0.0,
):
    """Megatron's LR/WD scheduler, stepped once per optimizer step (state goes in checkpoints)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if total_steps < 1 or warmup_steps < 0 or warmup_steps > total_steps:
        raise ValueError(
            f"scheduler: need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}) and total_steps >= 1"
        )
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup_steps else lr,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=total_steps,
        lr_decay_style=decay_style,
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
    )
