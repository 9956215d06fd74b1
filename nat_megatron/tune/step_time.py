"""Time of one training step: FLOPs at an assumed MFU plus exposed communication.

Compute, per micro-batch and pipeline stage: 2 FLOPs per weight per token forward (the
6 N T rule for forward + backward), causal attention 2 a d s^2 per layer forward, the output
layer on the positions whose logits are needed, all split over TP x CP; recompute adds the
recomputed forward (all layers for "full", the MLPs for "selective").
Lengths are the NAT-truncated ones, as train/batching.py groups and pads them (workload.py):
padded tokens per micro-batch, and the sum over rows of padded length^2 for attention.

Communication, not overlapped (train/optimizer.py turns overlap_grad_reduce off and build.py
enables no TP overlap), each collective moving (n-1)/n of its buffer at the NVLink bandwidth
inside a node or the InfiniBand one across nodes (Megatron's rank order tp-cp-dp-pp):
- TP with sequence parallelism: per layer 4 all-gathers/reduce-scatters forward and 6
  backward of the [s, b, h] activation; embedding and output layer add 2 and 3;
- CP (ring attention): K and V pass cp-1 hops forward, K, V and their grads backward;
- PP: one activation forward and one gradient backward per micro-batch and model chunk;
- DP x CP: reduce-scatter of fp32 grads and all-gather of params (distributed optimizer), or an
  fp32 all-reduce, once per step.
The pipeline bubble is (pp - 1)/vpp micro-batch times: step = (m + (pp-1)/vpp) t_mb + DP + Adam.
"""

from __future__ import annotations

from dataclasses import dataclass

from nat_megatron.model.arch import ModelArch
from nat_megatron.tune import constants as C
from nat_megatron.tune.memory import Plan, batch_shape, stage_params
from nat_megatron.tune.workload import Workload


@dataclass
class TimeEstimate:
    """Seconds per step, split by cause; tokens counted before NAT selection."""

    step_s: float
    compute_s: float
    bubble_s: float
    tp_comm_s: float
    cp_comm_s: float
    pp_comm_s: float
    dp_comm_s: float
    optimizer_s: float
    tokens_per_s_per_gpu: float

    def as_dict(self) -> dict[str, float]:
        """The fields, rounded, for JSON."""
        return {k: round(v, 6) if k != "tokens_per_s_per_gpu" else round(v, 1) for k, v in self.__dict__.items()}


def _collective_s(nbytes: float, n: int, bw: float, latency: float) -> float:
    """One all-gather or reduce-scatter over n ranks of an nbytes buffer (ring)."""
    if n <= 1:
        return 0.0
    return latency + (n - 1) / n * nbytes / bw


def microbatch_flops(arch: ModelArch, plan: Plan, work: Workload, *, last_stage: bool) -> dict:
    """Forward+backward(+recompute) FLOPs of an average micro-batch on one rank of a stage."""
    lay = plan.layout
    h, f, a, g, d = arch.hidden_size, arch.ffn_hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim
    shape = batch_shape(work, plan)
    layers = arch.num_layers // lay.pp
    split = lay.tp * lay.cp
    linear = 2 * (h * d * (a + 2 * g) + a * d * h + 3 * h * f) * shape.mean_tokens
    attention = 2 * a * d * shape.mean_attention
    fwd = layers * (linear + attention) / split
    out = 2 * h * arch.padded_vocab_size * shape.mean_positions / split if last_stage else 0.0
    recompute = {"none": 0.0, "full": fwd, "selective": layers * 2 * 3 * h * f * shape.mean_tokens / split}[
        plan.recompute
    ]
    return {"fwd_bwd": 3 * (fwd + out), "recompute": recompute}


def estimate_time(
    arch: ModelArch, plan: Plan, work: Workload, dev: C.Device, *, gpus_per_node: int = 8
) -> TimeEstimate:
    """Step time of `plan` on `dev` GPUs (see the module docstring)."""
    lay = plan.layout
    m = plan.num_microbatches(work)
    chunks = lay.vpp or 1
    rate = dev.peak_flops * dev.mfu
    res = lay.tp if lay.sequence_parallel else 1

    def bw(group_span: int) -> float:
        """NVLink inside a node, InfiniBand once a group spans nodes."""
        return dev.intra_node_bw if group_span <= gpus_per_node else dev.inter_node_bw

    tokens = batch_shape(work, plan).mean_tokens / lay.cp  # per CP rank
    act = tokens * arch.hidden_size * dev.act_bytes  # one full-sequence [s, b, h] buffer
    layers = arch.num_layers // lay.pp
    per_layer = 10 + {"none": 0, "selective": 2, "full": 4}[plan.recompute]
    if not lay.sequence_parallel:
        per_layer = 8 + {"none": 0, "selective": 2, "full": 4}[plan.recompute]  # all-reduces
    tp_mb = (layers * per_layer + 3) * _collective_s(act, lay.tp, bw(lay.tp), dev.latency_s)
    kv = tokens * 2 * arch.num_kv_heads * arch.head_dim / lay.tp * dev.act_bytes
    cp_mb = 0.0
    if lay.cp > 1:
        hop = dev.latency_s + kv / bw(lay.tp * lay.cp)
        cp_mb = layers * 3 * (lay.cp - 1) * hop
    pp_mb = 0.0
    if lay.pp > 1:
        pp_mb = 2 * chunks * (dev.latency_s + act / res / bw(lay.tp * lay.cp * lay.dp + 1))

    stage_mb = []
    for last in (False, True) if lay.pp > 1 else (True,):
        fl = microbatch_flops(arch, plan, work, last_stage=last)
        stage_mb.append((fl["fwd_bwd"] + fl["recompute"]) / rate)
    compute_mb = max(stage_mb)
    t_mb = compute_mb + tp_mb + cp_mb + pp_mb
    bubble = (lay.pp - 1) / chunks * t_mb

    p_stage = max(stage_params(arch, lay, 0), stage_params(arch, lay, lay.pp - 1))
    n_dp = lay.dp * lay.cp
    dp_bw = bw(lay.tp * lay.cp * lay.dp)
    if plan.distributed_optimizer:
        dp = _collective_s(p_stage * C.GRAD_BYTES, n_dp, dp_bw, dev.latency_s) + _collective_s(
            p_stage * dev.param_bytes, n_dp, dp_bw, dev.latency_s
        )
        shard = n_dp
    else:
        dp = 2 * _collective_s(p_stage * C.GRAD_BYTES, n_dp, dp_bw, dev.latency_s)
        shard = 1
    opt = p_stage / shard * C.ADAM_BYTES_MOVED_PER_PARAM / (dev.hbm_bw * C.HBM_EFFICIENCY)

    step = m * t_mb + bubble + dp + opt
    return TimeEstimate(
        step_s=step,
        compute_s=m * compute_mb,
        bubble_s=bubble,
        tp_comm_s=m * tp_mb,
        cp_comm_s=m * cp_mb,
        pp_comm_s=m * pp_mb,
        dp_comm_s=dp,
        optimizer_s=opt,
        tokens_per_s_per_gpu=work.step_tokens / step / lay.world_size,
    )
