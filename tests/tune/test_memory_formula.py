"""The tuner's memory model against Megatron-LM's published formula.

Reference: megatron/training/theoretical_memory_usage.py (NVIDIA/Megatron-LM),
compute_weight_and_optimizer_memory and compute_activation_memory (the latter is Table 2 of
Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models",
arXiv 2205.05198: sequence parallel + selective recompute), re-implemented below for dense
models (no MoE, MTP or MLA) from the published code.

Cases (bf16 training on H100, sequence length 8192, micro-batch 1, no NAT, no CP):
  llama3.1-8b   TP1 PP1 DP8 | TP4 PP1 DP2 | TP8 PP1 DP1        (8 micro-batches per rank)
  llama3.1-70b  TP8 PP4 DP2, 1F1B, 8 micro-batches | same with 2 micro-batches (< pp)
  llama3.1-70b  TP8 PP4 VPP5 DP2, interleaved, 8 micro-batches
  qwen2.5-32b   TP4 PP2 DP4 (QKV bias)
each with and without the distributed optimizer for the weight + optimizer part.

Weights + optimizer compare directly: the same parameter count on the most loaded shard
(first stage: its layers plus the embedding, plus the output layer when untied and pp = 1)
at 18 bytes/param, or 6 + 12/dp with the distributed optimizer; within 1% (the tuner keeps
norms replicated over TP and counts QKV biases and QK norms, the formula divides all by TP).

Activations compare like-for-like, within 5%. Same assumptions on both sides: first pipeline
stage, recompute "none" in the tuner, which for flash/fused attention stores what the
formula's "selective" does (no [s, s] scores). The formula's per-layer 18 + 4 f/h bytes x sbh
describe Megatron's GPT layer (GELU MLP, MHA, dropout); the tuner counts OUR layer spec, and
the test maps the formula onto it term by term (per token, before division by TP):
- dropout is 0 in our config, so no 1-byte masks: -2h per layer, and the embedding's
  sbh x pp term goes;
- GQA: Q, K, V are not 3 x 2h: the fused QKV output stays alive through the V view
  2(a + 2g)d, plus the roped q and k 2(a + g)d; the attention output is 2ad plus an fp32
  softmax LSE of 4a;
- unfused SwiGLU (bias_activation_fusion=False): fc1's 2f-wide output, `x + offset`, silu's
  output and the product, 2 x 5f bytes, where the formula's GELU MLP has 2 x 2f;
- small terms the formula omits: the norms' fp32 1/rms (2 x 4 bytes) and RoPE's cos/sin
  (4 x s x d x 2 bytes per layer and micro-batch, replicated over TP);
- the loss: the formula counts the fp32 logits once (4 bytes per element); the tuner counts
  bf16 logits plus three fp32 temporaries of the loss, so its logits term is scaled by
  4 / logits_bytes_per_element for the comparison.
Everything else (layers x in-flight micro-batches, the interleaving factor, fewer
micro-batches than stages, token ids, the final norm and output-layer input, division by TP
under sequence parallelism) is compared as is. The raw, unmapped ratios are printed too.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from nat_megatron.model.presets import load_arch
from nat_megatron.parallel.layout import Layout
from nat_megatron.tune import constants as C
from nat_megatron.tune.memory import Plan, activation_bytes, logits_bytes_per_element, static_bytes
from nat_megatron.tune.workload import Workload

SEQ = 8192


# ----- Megatron-LM's formula (dense path), transcribed ---------------------------------------


def megatron_weight_and_optimizer_memory(args) -> float:
    query_projection_size = args.kv_channels * args.num_attention_heads
    query_projection_to_hidden_size_ratio = query_projection_size / args.hidden_size
    gated_linear_multiplier = 3 / 2 if args.swiglu else 1
    norm_size = 1 if args.normalization == "RMSNorm" else 2
    self_attn_term = (
        2
        * args.hidden_size
        * args.hidden_size
        * ((1 + (args.num_query_groups / args.num_attention_heads)) * query_projection_to_hidden_size_ratio)
    )
    per_layer = 2 * args.hidden_size * (args.ffn_hidden_size * gated_linear_multiplier + norm_size) + self_attn_term
    embedding_size = args.hidden_size * args.padded_vocab_size
    final_layernorm = norm_size * args.hidden_size
    block = per_layer * args.num_layers + final_layernorm
    most_loaded = (block / args.pipeline_model_parallel_size + embedding_size) / args.tensor_model_parallel_size
    if args.untie_embeddings_and_output_weights and args.pipeline_model_parallel_size == 1:
        most_loaded += embedding_size / args.tensor_model_parallel_size
    bytes_per_param = 18 if not args.use_distributed_optimizer else 6 + (12 / args.data_parallel_size)
    return most_loaded * bytes_per_param


def megatron_activation_memory(args, num_microbatches) -> float:
    s, b, h = args.seq_length, args.micro_batch_size, args.hidden_size
    pp, vpp = args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size
    mem = s * b * h * (18 + 4 * (args.ffn_hidden_size / h))
    mem *= args.num_layers
    mem += 8 * s * b * pp  # input to embedding
    mem += s * b * h * pp  # embedding dropout mask
    if vpp is not None:
        mem *= 1 + (pp - 1) / (pp * vpp)
    if vpp is None and pp > 1 and num_microbatches is not None:
        mem *= min(1, num_microbatches / pp)
    if pp == 1:
        mem += s * b * h * 4 * (1 + args.padded_vocab_size / h)
    return mem / args.tensor_model_parallel_size


# ----- the like-for-like mapping (module docstring) ------------------------------------------


def our_layer_minus_formula(arch) -> float:
    """Bytes per token, per layer, that our layer stores beyond the formula's 18h + 4f."""
    h, f, a, g, d = arch.hidden_size, arch.ffn_hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim
    dropout = -2 * h
    qkv = 2 * (a + 2 * g) * d + 2 * (a + g) * d - 6 * h
    attn_out = 2 * a * d + 4 * a - 2 * h
    mlp = 2 * 5 * f - 2 * 2 * f
    small = 2 * 4 + (4 * (a + g) if arch.qk_norm else 0)
    return dropout + qkv + attn_out + mlp + small


def rope_per_layer(arch) -> float:
    """RoPE's cos and sin for q and k, [s, 1, 1, d] bf16 each: per micro-batch, not per TP rank."""
    return 4 * SEQ * arch.head_dim * 2


CASES = {
    # name: (preset, tp, pp, vpp, dp, micro-batches per DP rank)
    "llama8b_tp1": ("llama3.1-8b", 1, 1, None, 8, 8),
    "llama8b_tp4": ("llama3.1-8b", 4, 1, None, 2, 8),
    "llama8b_tp8": ("llama3.1-8b", 8, 1, None, 1, 8),
    "llama70b_tp8_pp4": ("llama3.1-70b", 8, 4, None, 2, 8),
    "llama70b_tp8_pp4_m2": ("llama3.1-70b", 8, 4, None, 2, 2),
    "llama70b_tp8_pp4_vpp5": ("llama3.1-70b", 8, 4, 5, 2, 8),
    "qwen32b_tp4_pp2": ("qwen2.5-32b", 4, 2, None, 4, 8),
}


def _setup(name, distributed_optimizer=True):
    preset, tp, pp, vpp, dp, m = CASES[name]
    arch = load_arch(preset)
    lay = Layout(tp=tp, pp=pp, vpp=vpp, dp=dp, sequence_parallel=tp > 1)
    plan = Plan(lay, 1, "none", distributed_optimizer)
    work = Workload(seq_len=SEQ, response_len=SEQ, global_batch=dp * m, logits_on="all")
    args = SimpleNamespace(
        kv_channels=arch.head_dim,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_layers=arch.num_layers,
        swiglu=True,
        normalization="RMSNorm",
        padded_vocab_size=arch.padded_vocab_size,
        untie_embeddings_and_output_weights=not arch.tie_embeddings,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        data_parallel_size=dp,
        use_distributed_optimizer=distributed_optimizer,
        seq_length=SEQ,
        micro_batch_size=1,
    )
    return arch, plan, work, args, m


@pytest.mark.parametrize("distributed_optimizer", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_weight_and_optimizer_memory_matches_megatron(name, distributed_optimizer):
    arch, plan, work, args, _ = _setup(name, distributed_optimizer)
    ours = sum(static_bytes(arch, plan, C.H100, 0).values())
    ref = megatron_weight_and_optimizer_memory(args)
    print(
        f"{name} distopt={distributed_optimizer}: tuner {ours / C.GiB:.2f} GB, "
        f"Megatron {ref / C.GiB:.2f} GB, ratio {ours / ref:.4f}"
    )
    assert math.isclose(ours, ref, rel_tol=0.01)


@pytest.mark.parametrize("name", list(CASES))
def test_activation_memory_matches_megatron_like_for_like(name):
    arch, plan, work, args, m = _setup(name)
    terms = activation_bytes(arch, plan, C.H100, work, stage=0)
    logits = terms.pop("logits")
    ours_raw = sum(terms.values()) + logits
    ours = sum(terms.values()) + logits * 4 / logits_bytes_per_element(C.H100, padded_shard=False)
    ref_raw = megatron_activation_memory(args, m)

    # The formula, mapped onto our layer: per-layer deltas and no embedding dropout mask,
    # multiplied by the same in-flight factor the formula applies to its layer term.
    lay = plan.layout
    factor = 1.0
    if lay.vpp is not None:
        factor = 1 + (lay.pp - 1) / (lay.pp * lay.vpp)
    elif lay.pp > 1:
        factor = min(1, m / lay.pp)
    delta = SEQ * (arch.num_layers * our_layer_minus_formula(arch) - arch.hidden_size * lay.pp)
    ref = ref_raw + (delta / lay.tp + arch.num_layers * rope_per_layer(arch)) * factor
    print(
        f"{name}: tuner {ours / C.GiB:.2f} GB vs mapped formula {ref / C.GiB:.2f} GB "
        f"(ratio {ours / ref:.4f}); raw: tuner {ours_raw / C.GiB:.2f} GB vs formula "
        f"{ref_raw / C.GiB:.2f} GB (ratio {ours_raw / ref_raw:.3f})"
    )
    assert math.isclose(ours, ref, rel_tol=0.05)
