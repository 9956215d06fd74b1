"""The one mapping between Hugging Face tensor names and Megatron-Core parameters.

Megatron names below are *global* (layer index over the whole model, unsharded tensors):
    embedding.word_embeddings.weight                    <- model.embed_tokens.weight (vocab padded)
    decoder.layers.{i}.input_layernorm.weight           <- model.layers.{i}.input_layernorm.weight
    decoder.layers.{i}.self_attention.linear_qkv.weight <- q_proj, k_proj, v_proj (per-group interleave)
    decoder.layers.{i}.self_attention.linear_qkv.bias   <- q/k/v biases (Qwen2)
    decoder.layers.{i}.self_attention.{q,k}_layernorm.weight <- self_attn.{q,k}_norm.weight (Qwen3)
    decoder.layers.{i}.self_attention.linear_proj.weight <- o_proj
    decoder.layers.{i}.pre_mlp_layernorm.weight         <- post_attention_layernorm
    decoder.layers.{i}.mlp.linear_fc1.weight            <- [gate_proj; up_proj]
    decoder.layers.{i}.mlp.linear_fc2.weight            <- down_proj
    decoder.final_layernorm.weight                      <- model.norm.weight
    output_layer.weight                                 <- lm_head.weight (untied models only)

Megatron's fused QKV stores, for each query group g, the group's query heads then its key
head then its value head; TP shards split that along dim 0 (whole groups per rank). FC1 holds
[gate; up], and each TP rank holds [gate_r; up_r], not a contiguous slice of the full tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from nat_megatron.model.arch import ModelArch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_SIMPLE_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def megatron_names(arch: ModelArch) -> list[str]:
    """Every global Megatron parameter name of this architecture, in model order."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(arch.num_layers):
        p = f"decoder.layers.{i}."
        names += [p + "input_layernorm.weight", p + "self_attention.linear_qkv.weight"]
        if arch.qkv_bias:
            names.append(p + "self_attention.linear_qkv.bias")
        if arch.qk_norm:
            names += [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"]
        names += [
            p + "self_attention.linear_proj.weight",
            p + "pre_mlp_layernorm.weight",
            p + "mlp.linear_fc1.weight",
            p + "mlp.linear_fc2.weight",
        ]
    names.append("decoder.final_layernorm.weight")
    if not arch.tie_embeddings:
        names.append("output_layer.weight")
    return names


def hf_names_for(arch: ModelArch, name: str) -> list[str]:
    """The HF tensors that make up one global Megatron parameter."""
    if name == "embedding.word_embeddings.weight":
        return ["model.embed_tokens.weight"]
    if name == "decoder.final_layernorm.weight":
        return ["model.norm.weight"]
    if name == "output_layer.weight":
        return ["model.embed_tokens.weight" if arch.tie_embeddings else "lm_head.weight"]
    m = _LAYER.match(name)
    if not m:
        raise KeyError(f"not a Megatron parameter of a {arch.family} model: {name}")
    i, rest = m.groups()
    p = f"model.layers.{i}."
    if rest in _SIMPLE_LAYER:
        return [p + _SIMPLE_LAYER[rest]]
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        return [p + f"self_attn.{x}_proj.{kind}" for x in "qkv"]
    if rest == "mlp.linear_fc1.weight":
        return [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
    raise KeyError(f"not a Megatron parameter of a {arch.family} model: {name}")


def _qkv_groups(arch: ModelArch) -> tuple[int, int, int]:
    return arch.num_kv_heads, arch.num_heads // arch.num_kv_heads, arch.head_dim


def to_megatron(arch: ModelArch, name: str, hf: list[torch.Tensor]) -> torch.Tensor:
    """Combine the HF tensors (in hf_names_for order) into the full Megatron tensor."""
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        (w,) = hf
        pad = arch.padded_vocab_size - w.shape[0]
        return torch.cat([w, w.new_zeros(pad, w.shape[1])]) if pad else w
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        groups, per_group, d = _qkv_groups(arch)
        q, k, v = hf
        tail = q.shape[1:]
        q = q.reshape(groups, per_group * d, *tail)
        k = k.reshape(groups, d, *tail)
        v = v.reshape(groups, d, *tail)
        return torch.cat([q, k, v], dim=1).reshape(-1, *tail)
    if name.endswith("linear_fc1.weight"):
        return torch.cat(hf, dim=0)
    (w,) = hf
    return w


def from_megatron(arch: ModelArch, name: str, full: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a full Megatron tensor back into its HF tensors (inverse of to_megatron)."""
    hf_names = hf_names_for(arch, name)
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return {hf_names[0]: full[: arch.vocab_size]}
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        groups, per_group, d = _qkv_groups(arch)
        tail = full.shape[1:]
        g = full.reshape(groups, (per_group + 2) * d, *tail)
        q, k, v = g.split([per_group * d, d, d], dim=1)
        parts = [q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)]
        return dict(zip(hf_names, parts))
    if name.endswith("linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return dict(zip(hf_names, [gate, up]))
    return {hf_names[0]: full}


def tp_shard(name: str, full: torch.Tensor, param: torch.nn.Parameter, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's slice of a full Megatron tensor, laid out like `param`."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim = param.partition_dim
    if name.endswith("linear_fc1.weight"):  # [gate; up] -> [gate_r; up_r]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]])
    return full.chunk(tp_size, dim=dim)[tp_rank]


def partition_dim(param: torch.nn.Parameter) -> int | None:
    """The dimension a Megatron parameter is split along over TP, or None if replicated."""
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def tp_unshard(name: str, shards: list[torch.Tensor], dim: int | None) -> torch.Tensor:
    """Inverse of tp_shard: the full tensor from every TP rank's shard, in rank order.

    `dim` is `partition_dim(param)`: None for a parameter replicated over TP.
    """
    if dim is None or len(shards) == 1:
        return shards[0]
    if name.endswith("linear_fc1.weight"):
        gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
        return torch.cat([*gates, *ups])
    return torch.cat(shards, dim=dim)


def global_name(chunk: torch.nn.Module, local_name: str) -> str:
    """Megatron parameter name with this pipeline chunk's layer index made global."""
    m = _LAYER.match(local_name)
    if not m:
        return local_name
    idx, rest = m.groups()
    layer = chunk.decoder.layers[int(idx)]
    return f"decoder.layers.{layer.layer_number - 1}.{rest}"


def load_hf_weights(chunks: list[torch.nn.Module], arch: ModelArch, read: Callable[[str], torch.Tensor]) -> None:
    """Fill this rank's model chunks from HF tensors; `read(hf_name)` returns one tensor.

    Reads only the tensors this rank needs, one at a time, so memory stays at one shard.
    """
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        for local, param in chunk.named_parameters():
            name = global_name(chunk, local)
            full = to_megatron(arch, name, [read(n) for n in hf_names_for(arch, name)])
            shard = tp_shard(name, full, param, tp_rank, tp_size)
            if shard.shape != param.shape:
                raise ValueError(
                    f"tensor {name} (from {hf_names_for(arch, name)}): shape {tuple(shard.shape)} "
                    f"after TP sharding does not match the model's {tuple(param.shape)}; "
                    "the checkpoint does not belong to this config.json"
                )
            with torch.no_grad():
                param.copy_(shard)
