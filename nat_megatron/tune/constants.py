"""Every number the layout tuner assumes, in one place.

A `Device` bundles what one accelerator (or one CPU process, for --validate) can do and how
our code uses it: the dtypes the trainer keeps, the attention/norm backend build.py picks
there, and whether Megatron frees pipeline outputs early. Change a figure here, never inline.

Sources for the H100 figures: NVIDIA H100 SXM5 datasheet (989 TFLOP/s dense BF16, 3.35 TB/s
HBM3, NVLink 4 at 450 GB/s per direction); nccl-tests all-gather / reduce-scatter bus bandwidth
on 8-GPU NVSwitch nodes (~360 GB/s) and on 8 x 400 Gb/s NDR InfiniBand per node (~40 GB/s
per GPU out of 50 GB/s line rate). MFU 0.40 is what Megatron-Core reports for dense 8B-70B
BF16 training on H100 without FP8; RL micro-batches are no larger, so no more is assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3  # every "GB" the tuner prints is GiB (2**30 bytes), like torch's memory stats

# Bytes per element of what the trainer stores (train/optimizer.py: grad_reduce_in_fp32=True,
# Megatron's distributed Adam keeps an fp32 master copy of bf16 params plus fp32 m and v).
GRAD_BYTES = 4
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MASTER_BYTES_LOW_PRECISION = 4  # fp32 master weights, only when params are bf16/fp16
TOKEN_ID_BYTES = 8  # int64 input ids the embedding saves for its backward

# The loss (model/logprobs.py) upcasts the vocab-parallel logits to fp32 and holds, at its
# peak, the logits themselves, their fp32 copy (none when they are fp32 already), and the
# fp32 `shifted` and `exp`; its backward holds about as much (exp and two fp32 gradients).
# The TP shard that holds vocabulary padding masks it with one more fp32 copy.
LOSS_FP32_TEMPS = 2  # shifted, exp
LOSS_PAD_MASK_TEMPS = 1

# The glu() of Megatron's MLP with bias_activation_fusion=False (build.py) saves fc1's output
# (2f), `x_linear + glu_linear_offset` (f), silu's output (f) and the product (f, fc2's input).
MLP_SAVED_WIDTHS = 5

# Colocated rollout engine (vLLM, rollout/engine.py): while it generates it takes
# gpu_memory_utilization x GPU memory for its weights, KV cache and its own activations, next to
# the trainer's resident weights, grads and optimizer state; while the trainer trains it sleeps
# (level 1: weights in host memory, KV cache freed) and keeps only a residual on the GPU
# (its tensor-parallel communicators and allocator pools; an estimate, not yet measured on GPU).
# Its default gpu_memory_utilization is the config's (config.py ROLLOUT_GPU_MEMORY_UTILIZATION).
ROLLOUT_ASLEEP_GB = 1.0
ROLLOUT_ACTIVATION_GB = 1.0  # vLLM's profiled forward peak, reserved out of its budget
ROLLOUT_MAX_WEIGHT_SHARE = 0.5  # auto rollout TP: smallest TP whose weights fit in half the budget

# A plan "fits" when its estimate leaves this fraction of the GPU free: the estimate counts
# the large tensors, not every small buffer, and the allocator's slack varies run to run.
FIT_HEADROOM = 0.05

# Under RPC the tuner plans a representative step with train/batching.py: this many
# micro-batches (mbs sequences each) drawn evenly from the step's cut quantiles.
REP_MICRO_BATCHES = 8

# Optimizer step: Adam reads/writes master, m, v, grad and the bf16 param; memory bound.
ADAM_BYTES_MOVED_PER_PARAM = 4 * 3 * 2 + 4 + 2
HBM_EFFICIENCY = 0.6


@dataclass(frozen=True)
class Device:
    """One training process's accelerator and how our code uses it."""

    name: str
    mem_gb: float  # default capacity (the CLI's --gpu-mem-gb overrides it)
    peak_flops: float  # dense matmul FLOP/s in the training dtype
    mfu: float  # assumed fraction of peak_flops reached by GEMMs + attention
    hbm_bw: float  # bytes/s
    intra_node_bw: float  # collective bus bandwidth inside a node (NVLink), bytes/s per GPU
    inter_node_bw: float  # collective bus bandwidth across nodes (InfiniBand), bytes/s per GPU
    latency_s: float  # per collective / p2p message
    param_bytes: int  # training dtype of weights
    act_bytes: int  # training dtype of activations
    backend: str  # "te" (Transformer Engine) or "sdpa" (model/layers.py), as build.py chooses
    deallocate_pipeline_outputs: bool  # build.py: on GPU only
    workspace_gb: float  # CUDA context + NCCL communicators + cuBLAS/TE workspaces
    fragmentation: float  # caching-allocator slack, fraction of the tensor bytes

    @property
    def master_bytes(self) -> int:
        """Bytes per param of the fp32 master copy (none when params are fp32)."""
        return 0 if self.param_bytes == 4 else MASTER_BYTES_LOW_PRECISION


H100 = Device(
    name="h100",
    mem_gb=80.0,
    peak_flops=989e12,
    mfu=0.40,
    hbm_bw=3.35e12,
    intra_node_bw=360e9,
    inter_node_bw=40e9,
    latency_s=20e-6,
    param_bytes=2,
    act_bytes=2,
    backend="te",
    deallocate_pipeline_outputs=True,
    # ~0.6 GiB CUDA context, ~1.0 GiB for NCCL communicators of the TP/PP/DP/CP groups,
    # ~0.4 GiB cuBLAS + TE workspaces.
    workspace_gb=2.0,
    fragmentation=0.05,
)

# One gloo process on this CPU, as --validate runs it: fp32 everything, model/layers.py's SDPA
# and RMSNorm, no early freeing of pipeline outputs, and only live tensor bytes measured (no
# workspace, no allocator). The speed figures are rough (one core, loopback TCP); memory is
# what the CPU check is for.
CPU = Device(
    name="cpu",
    mem_gb=16.0,
    peak_flops=50e9,
    mfu=0.5,
    hbm_bw=10e9,
    intra_node_bw=1e9,
    inter_node_bw=1e9,
    latency_s=100e-6,
    param_bytes=4,
    act_bytes=4,
    backend="sdpa",
    deallocate_pipeline_outputs=False,
    workspace_gb=0.0,
    fragmentation=0.0,
)

DEVICES = {"h100": H100, "cpu": CPU}
