"""Build a Megatron-Core GPTModel (one chunk per virtual pipeline stage) from a ModelArch.

Backends, chosen once per process by `attention_backend()`:
- "te": Transformer Engine linears and attention, when CUDA and TE are both present.
- "sdpa": Megatron's local linears with our SDPAttention and RMSNorm (model/layers.py); used on
  GPUs without TE and on CPU, where it runs over gloo.
Both backends use the same module names (separate norms before the QKV and FC1 linears), so
a distributed checkpoint written by one loads into the other.
The model class is `SelectiveGPTModel` (model/output.py): GPTModel, plus an optional
`output_index` that runs the final norm and output layer on selected positions only.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from nat_megatron.model.arch import ModelArch
from nat_megatron.model.layers import RMSNorm, SDPAttention
from nat_megatron.model.output import SelectiveGPTModel
from nat_megatron.parallel.layout import FP8_ALIGN, Layout, validate_layout


@functools.cache
def attention_backend() -> str:
    """'te' when Transformer Engine can run here, else 'sdpa'."""
    if not torch.cuda.is_available():
        return "sdpa"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE absent or built for another CUDA: fall back, never fail
        return "sdpa"
    return "te"


def layer_spec(arch: ModelArch, backend: str) -> ModuleSpec:
    """The transformer-layer spec: pre-norm attention and SwiGLU MLP."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TENorm,
            TERowParallelLinear,
        )

        col, row, attn, norm = TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention, TENorm
    else:
        col, row, attn, norm = ColumnParallelLinear, RowParallelLinear, SDPAttention, RMSNorm
    qk_norm = norm if arch.qk_norm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=col,
                    core_attention=attn,
                    linear_proj=row,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=col, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
            # Checkpoint keys as in Megatron's TE spec (norms fused into the next linear), so
            # our checkpoints interoperate with Megatron-LM's own.
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def transformer_config(
    arch: ModelArch, layout: Layout, *, dtype: torch.dtype = torch.float32, fp8: str | None = None, **overrides
) -> TransformerConfig:
    """Megatron TransformerConfig for this architecture and layout (no fused CUDA kernels on CPU).

    fp8: a Megatron-Core fp8_recipe (delayed, tensorwise, blockwise, mxfp8; parallel.layout's
    FP8_ALIGN) or None. The format is "hybrid": E4M3 for weights and activations, E5M2 for the
    gradients. Megatron hands one format to every recipe; gradients need range more than
    precision (E5M2 has 5 exponent bits), which matters most for the per-tensor recipes
    (delayed, tensorwise), and every TE recipe accepts hybrid (TE refuses only pure E5M2). The
    block recipes would also train with "e4m3", their own default; hybrid keeps one setting.
    """
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        # RL micro-batches have their own lengths (padded to one per step under interleaving,
        # see train/forward_backward.py); the loss is summed, not averaged (nat.md §1).
        variable_seq_lengths=layout.vpp is None,
        moe_token_dispatcher_type="alltoall",  # unused (dense), but Megatron checks it
        calculate_per_token_loss=True,
        deallocate_pipeline_outputs=on_gpu,
        batch_p2p_sync=on_gpu,
        # With interleaving a stage sends to both neighbours in one step; with pp=2 both are the
        # same rank and batched isend/irecv match by posting order, crossing activations and
        # gradients. The unbatched path orders sends and receives by rank parity.
        batch_p2p_comm=layout.vpp is None,
    )
    if fp8 is not None:
        kwargs.update(fp8="hybrid", fp8_recipe=fp8)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_model(
    arch: ModelArch,
    layout: Layout,
    *,
    dtype: torch.dtype = torch.float32,
    seq_len: int | None = None,
    fp8: str | None = None,
    backend: str | None = None,
    **config_overrides,
) -> list[SelectiveGPTModel]:
    """The model chunks this rank holds (one per virtual pipeline stage).

    parallel_state must already be initialised for `layout` (see parallel.distributed).
    fp8: the config's model.fp8 recipe (transformer_config); needs Transformer Engine on a GPU.
    backend: "te" or "sdpa" (None: attention_backend()); tools/gpu_check.py compares both.
    """
    backend = backend or attention_backend()
    if backend not in ("te", "sdpa") or (backend == "te" and attention_backend() != "te"):
        raise ValueError(f"backend={backend!r}: use 'sdpa', or 'te' where Transformer Engine and a GPU are present")
    if fp8 is not None and backend == "sdpa" and attention_backend() == "te":
        raise ValueError(
            f"model.fp8={fp8!r} runs on the Transformer Engine backend; build with backend='te' (the default here)"
        )
    if fp8 is not None and backend != "te":
        raise ValueError(
            f"model.fp8={fp8!r} needs Transformer Engine on a CUDA GPU, and this process has "
            f"{'no GPU' if not torch.cuda.is_available() else 'no usable transformer_engine'}; "
            "install it with `make venv-gpu` on a GPU machine, or set model.fp8=null"
        )
    if fp8 is not None and fp8 not in FP8_ALIGN:
        raise ValueError(f"model.fp8: use one of {tuple(FP8_ALIGN)} or null, got {fp8!r}")
    validate_layout(arch, layout, world_size=torch.distributed.get_world_size(), seq_len=seq_len)
    config = transformer_config(arch, layout, dtype=dtype, fp8=fp8, **config_overrides)
    spec = layer_spec(arch, backend)
    final_norm = spec.submodules.input_layernorm
    chunks = []
    for vp_stage in range(layout.vpp or 1):
        vp = vp_stage if layout.vpp else None
        block = ModuleSpec(
            module=TransformerBlock,
            submodules=TransformerBlockSubmodules(
                layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp),
                layer_norm=final_norm,
            ),
        )
        model = SelectiveGPTModel(
            config=config,
            transformer_layer_spec=block,
            vocab_size=arch.padded_vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=arch.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope_theta),
            rope_scaling=arch.rope_scaling_factor is not None,
            rope_scaling_factor=arch.rope_scaling_factor or 8.0,
            parallel_output=True,
            vp_stage=vp,
        )
        if dtype != torch.float32 and torch.cuda.is_available():
            model = model.to(dtype)
        chunks.append(model.cuda() if torch.cuda.is_available() else model)
    return chunks
