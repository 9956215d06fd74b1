"""Per-GPU peak memory of one training step: what our code keeps, term by term.

Static (per TP rank of a pipeline stage): weights in the training dtype, fp32 main grads
(train/optimizer.py reduces grads in fp32), and Adam's fp32 master copy + m + v, sharded over
DP x CP by Megatron's distributed optimizer.

Activations are the tensors the backward needs, counted from what our layer spec saves
(model/build.py; `layer_terms` names each one) for the tokens one micro-batch holds on this
rank (NAT-truncated lengths, workload.py; split over CP, and over TP by sequence parallel for
the residual stream). Pipeline stages keep several micro-batches in flight: min(m, pp - r) on
stage r under 1F1B; 2(pp - r - 1) + (vpp - 1)pp + 1 model chunks under the interleaved
schedule (Megatron's warm-up count), i.e. Korthikanti et al.'s factor 1 + (pp - 1)/(pp vpp).
On top come transients: the loss's logits and its fp32 temporaries for one micro-batch on the
last stage, or one recomputed layer (or MLP) in the backward, whichever is larger.

Plus the colocated rollout engine (vLLM) when asked for: asleep during training (a residual
only); `rollout_peak` is the other phase, the engine generating next to the trainer's resident
state. And a fixed CUDA/NCCL workspace with allocator slack (constants.py). Everything is in bytes
until `MemoryEstimate.gb`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nat_megatron.config import ROLLOUT_GPU_MEMORY_UTILIZATION
from nat_megatron.model.arch import ModelArch
from nat_megatron.parallel.layout import Layout, micro_batches_per_rank
from nat_megatron.tune import constants as C
from nat_megatron.tune.workload import BatchShape, Workload


@dataclass(frozen=True)
class Plan:
    """A layout plus the per-step choices the tuner also searches."""

    layout: Layout
    mbs: int = 1  # sequences per micro-batch
    recompute: str = "none"  # key of model/recompute.py RECOMPUTE
    distributed_optimizer: bool = True

    def num_microbatches(self, work: Workload) -> int:
        """Micro-batches per step on the most loaded DP rank (parallel/layout.py)."""
        return micro_batches_per_rank(self.layout, work.global_batch, self.mbs)


@dataclass
class MemoryEstimate:
    """Peak bytes of the most loaded stage, by term (the keys of the tuner's JSON mem_gb)."""

    stage: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    rollout: float
    workspace: float
    detail: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        """Sum of all terms, bytes."""
        return (
            self.weights + self.grads + self.optimizer + self.activations + self.logits + self.rollout + self.workspace
        )

    @property
    def resident(self) -> float:
        """What the trainer keeps on the GPU between steps: weights, grads, optimizer, workspace."""
        return self.weights + self.grads + self.optimizer + self.workspace

    def gb(self, digits: int = 4) -> dict[str, float]:
        """The terms and the total in GB (GiB)."""
        keys = ("weights", "grads", "optimizer", "activations", "logits", "rollout", "workspace")
        out = {k: round(getattr(self, k) / C.GiB, digits) for k in keys}
        out["total"] = round(self.total / C.GiB, digits)
        return out


def layer_params(arch: ModelArch, tp: int) -> float:
    """Parameters of one transformer layer on one TP rank (norms are replicated)."""
    h, f, d, a, g = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads
    n = (h * d * (a + 2 * g) + a * d * h + 3 * h * f) / tp + 2 * h
    if arch.qkv_bias:
        n += d * (a + 2 * g) / tp
    if arch.qk_norm:
        n += 2 * d
    return n


def stage_params(arch: ModelArch, layout: Layout, stage: int) -> float:
    """Parameters one TP rank of pipeline stage `stage` holds."""
    pp, emb = layout.pp, arch.padded_vocab_size * arch.hidden_size / layout.tp
    n = arch.num_layers // pp * layer_params(arch, layout.tp)
    if stage == 0:
        n += emb
    if stage == pp - 1:
        n += arch.hidden_size  # final norm
        # Untied: the output layer. Tied with pp > 1: Megatron keeps a copy of the embedding
        # on the last stage and all-reduces its grad with the first.
        if not arch.tie_embeddings or pp > 1:
            n += emb
    return n


def static_bytes(arch: ModelArch, plan: Plan, dev: C.Device, stage: int) -> dict[str, float]:
    """Weights, fp32 main grads and Adam states of one stage's TP rank."""
    n = stage_params(arch, plan.layout, stage)
    shard = plan.layout.dp * plan.layout.cp if plan.distributed_optimizer else 1
    return {
        "weights": n * dev.param_bytes,
        "grads": n * C.GRAD_BYTES,
        "optimizer": n * (dev.master_bytes + C.ADAM_STATE_BYTES) / shard,
    }


def layer_terms(arch: ModelArch, layout: Layout, dev: C.Device) -> dict[str, float]:
    """Bytes per token one transformer layer saves for its backward, without recompute.

    The layer's input is not included (it is the previous layer's output, or the chunk input).
    """
    A, h, f = dev.act_bytes, arch.hidden_size, arch.ffn_hidden_size
    a, g, d, tp = arch.num_heads, arch.num_kv_heads, arch.head_dim, layout.tp
    res = tp if layout.sequence_parallel else 1  # residual stream split over TP by SP only
    upcast = 0 if A == 4 else 4  # our RMSNorm's fp32 copy of a low-precision input
    t = {
        # attention + residual (pre-MLP norm input) and the layer output (next layer input)
        "residual": 2 * A * h / res,
        "norm_outputs": 2 * A * h / res,  # inputs of the QKV and FC1 linears
        # The fused QKV GEMM output stays alive: V is a view of it that core attention saves.
        "qkv": A * (a + 2 * g) * d / tp,
        "q_k_after_rope": A * (a + g) * d / tp,  # unfused RoPE (build.py) makes new q, k
        "attention_out": (A * a * d + 4 * a) / tp,  # output (linear_proj input) + fp32 LSE
        "mlp": C.MLP_SAVED_WIDTHS * A * f / tp,
    }
    if dev.backend == "te":  # TE norms save their input and fp32 1/rms only
        t["norm_internals"] = 2 * 4 / res + (4 * (a + g) / tp if arch.qk_norm else 0)
    else:  # model/layers.py RMSNorm also keeps x * rsqrt (and the fp32 copy of x)
        t["norm_internals"] = 2 * ((A + upcast) * h + 4) / res
        if arch.qk_norm:
            t["norm_internals"] += ((A + upcast) * d + 4) * (a + g) / tp
    return t


def rope_bytes_per_layer(arch: ModelArch, layout: Layout, dev: C.Device, seq: float) -> float:
    """Unfused RoPE saves cos and sin for q and for k: four [s, 1, 1, d] tensors per layer."""
    return 4 * seq / layout.cp * arch.head_dim * dev.act_bytes


def saved_per_layer(
    arch: ModelArch, layout: Layout, dev: C.Device, recompute: str, tokens: float, seq: float
) -> tuple[float, float]:
    """(bytes a layer keeps until its backward, bytes its recompute briefly adds back)."""
    terms = layer_terms(arch, layout, dev)
    full = sum(terms.values()) * tokens + rope_bytes_per_layer(arch, layout, dev, seq)
    res = layout.tp if layout.sequence_parallel else 1
    if recompute == "full":  # each layer keeps its input only
        return dev.act_bytes * arch.hidden_size / res * tokens, full
    if recompute == "selective":  # the MLP keeps its input (already a norm output)
        mlp = terms["mlp"] * tokens
        return full - mlp, mlp
    return full, 0.0


def batch_shape(work: Workload, plan: Plan) -> BatchShape:
    """One DP rank's micro-batches under this plan (workload.py)."""
    return work.batch_shape(
        sequences=-(-work.global_batch // plan.layout.dp),  # most loaded rank
        micro_batches=plan.num_microbatches(work),
        seq_multiple=plan.layout.seq_multiple,
        pad_to_step=plan.layout.vpp is not None,
    )


def in_flight(layout: Layout, stage: int, m: int) -> int:
    """Model-chunk forward passes whose activations stage `stage` holds at its peak."""
    pp, vpp = layout.pp, layout.vpp
    if pp == 1:
        return 1
    if vpp is None:
        return min(m, pp - stage)
    return min(m * vpp, 2 * (pp - stage - 1) + (vpp - 1) * pp + 1)


def logits_bytes_per_element(dev: C.Device, padded_shard: bool) -> float:
    """Peak bytes per logit element in the loss (constants.py: LOSS_*)."""
    A = dev.act_bytes
    b = A + (0 if A == 4 else 4) + 4 * C.LOSS_FP32_TEMPS
    return b + (4 * C.LOSS_PAD_MASK_TEMPS if padded_shard else 0)


def activation_bytes(arch: ModelArch, plan: Plan, dev: C.Device, work: Workload, stage: int) -> dict[str, float]:
    """Named activation terms of one stage's TP rank at its peak (bytes)."""
    lay, A, h = plan.layout, dev.act_bytes, arch.hidden_size
    m = plan.num_microbatches(work)
    res = lay.tp if lay.sequence_parallel else 1
    shape = batch_shape(work, plan)
    seq = shape.peak_seq
    tokens = shape.peak_tokens / lay.cp  # this CP rank's tokens of the largest micro-batch
    chunks = lay.vpp or 1
    layers_per_chunk = arch.num_layers // (lay.pp * chunks)
    kept, transient = saved_per_layer(arch, lay, dev, plan.recompute, tokens, seq)
    n = in_flight(lay, stage, m)
    last = stage == lay.pp - 1
    per_chunk = layers_per_chunk * kept + A * h / res * tokens  # layers + chunk input
    out = {"layers": n * per_chunk}
    if stage == 0:
        out["token_ids"] = n * C.TOKEN_ID_BYTES * tokens
    # layer_terms counts every layer's output. A chunk's last output is sent on and waits for
    # its backward, unless Megatron frees it after the send (GPU); the model's last chunk
    # hands it to the final norm, which saves it.
    if dev.deallocate_pipeline_outputs:
        out["freed_chunk_outputs"] = -(n - (1 if last else 0)) * A * h / res * tokens
    logits = 0.0
    if last:
        norm = 4 if dev.backend == "te" else (A + (0 if A == 4 else 4)) * h + 4
        positions = shape.peak_positions / lay.cp
        if work.logits_on == "all":  # GPTModel: final norm + output layer on every position
            out["final_norm"] = (norm + A * h) / res * tokens  # + output-layer input
        else:
            # model/output.py: the kept rows are gathered before the final norm (which saves
            # them) and the output layer; the last layer's output is then saved by nobody.
            out["final_norm"] = (A * h + norm + A * h) / res * positions - A * h / res * tokens
        vocab_shard = arch.padded_vocab_size // lay.tp
        padded = arch.padded_vocab_size != arch.vocab_size
        logits = positions * vocab_shard * logits_bytes_per_element(dev, padded)
    out["recompute_transient"] = max(0.0, transient - logits)
    out["logits"] = logits
    return out


def rollout_plan(
    arch: ModelArch,
    *,
    mem_gb: float,
    seq_len: int,
    gpus_per_node: int = 8,
    utilization: float = ROLLOUT_GPU_MEMORY_UTILIZATION,
    tp: int | None = None,
    kv_cache_gb: float | None = None,
) -> dict:
    """The colocated vLLM engine on each GPU: its TP size, weights, KV cache and the memory it
    holds while generating ("bytes") and while asleep during training ("asleep_bytes").

    While generating vLLM takes `utilization` x GPU memory (gpu_memory_utilization) for bf16
    weights sharded over its TP group, its profiled activations, and KV cache in the rest (or
    exactly `kv_cache_gb` when given). tp=None picks the smallest TP (dividing the heads,
    within a node) whose weights fit in ROLLOUT_MAX_WEIGHT_SHARE of that budget.
    """
    if not 0.0 < utilization < 1.0:
        raise ValueError(f"rollout gpu_memory_utilization must lie in (0, 1), got {utilization}")
    budget = utilization * mem_gb * C.GiB
    weights = arch.num_params() * 2
    options = [tp] if tp else [t for t in (1, 2, 4, 8, 16) if t <= gpus_per_node]
    for t in options:
        if arch.num_heads % t:
            continue
        if tp or weights / t <= C.ROLLOUT_MAX_WEIGHT_SHARE * budget:
            break
    else:
        raise ValueError(
            f"no rollout TP size up to {gpus_per_node} holds the {weights / C.GiB:.1f} "
            f"GB of bf16 weights in {utilization} x {mem_gb} GB; raise the "
            "rollout gpu_memory_utilization or set the rollout TP"
        )
    kv_heads = max(1, arch.num_kv_heads // t)  # vLLM replicates KV heads when tp > kv heads
    kv_per_token = 2 * arch.num_layers * kv_heads * arch.head_dim * 2
    if kv_cache_gb is None:
        kv = budget - weights / t - C.ROLLOUT_ACTIVATION_GB * C.GiB
    else:
        kv = kv_cache_gb * C.GiB
        budget = weights / t + C.ROLLOUT_ACTIVATION_GB * C.GiB + kv
    return {
        "tp": t,
        "gpu_memory_utilization": utilization,
        "bytes": budget,
        "asleep_bytes": C.ROLLOUT_ASLEEP_GB * C.GiB,
        "weights_gb": round(weights / t / C.GiB, 2),
        "kv_cache_gb": round(kv / C.GiB, 2),
        "activation_gb": C.ROLLOUT_ACTIVATION_GB,
        "kv_cache_sequences": max(0.0, kv) / (kv_per_token * seq_len),
    }


def estimate_memory(
    arch: ModelArch,
    plan: Plan,
    work: Workload,
    dev: C.Device,
    *,
    mem_gb: float | None = None,
    rollout: dict | None = None,
) -> MemoryEstimate:
    """Peak per-GPU memory of the most loaded pipeline stage."""
    mem_gb = dev.mem_gb if mem_gb is None else mem_gb
    best = None
    for stage in sorted({0, plan.layout.pp - 1}):
        s = static_bytes(arch, plan, dev, stage)
        act = activation_bytes(arch, plan, dev, work, stage)
        logits = act.pop("logits")
        tensors = sum(s.values()) + sum(act.values()) + logits
        est = MemoryEstimate(
            stage=stage,
            weights=s["weights"],
            grads=s["grads"],
            optimizer=s["optimizer"],
            activations=sum(act.values()),
            logits=logits,
            rollout=rollout["asleep_bytes"] if rollout else 0.0,
            workspace=dev.workspace_gb * C.GiB + dev.fragmentation * tensors,
            detail={k: v / C.GiB for k, v in act.items()},
        )
        if best is None or est.total > best.total:
            best = est
    return best
