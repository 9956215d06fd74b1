"""Model architecture, read from a Hugging Face config.json.

`ModelArch` is the one description of a dense decoder that the model builder, the checkpoint
converter and the layout tuner share. Supported families: Llama (incl. Llama-3.1 RoPE scaling),
Qwen2 (QKV bias) and Qwen3 (per-head q/k RMSNorm).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3")

# Megatron pads the vocabulary so every TP shard has the same size; padding to a multiple of
# 128 (divisible by every TP size up to 128) keeps the padded size layout-independent, so a
# distributed checkpoint saved at one TP loads at another.
VOCAB_PAD_MULTIPLE = 128


@dataclass(frozen=True)
class ModelArch:
    """Shape and options of a dense Llama-style decoder."""

    family: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 4096
    rope_scaling_factor: float | None = None  # Llama-3.1 style ("rope_type": "llama3")

    def __post_init__(self):
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"model family (config.json 'model_type') {self.family!r} is not supported; "
                f"use one of {SUPPORTED_FAMILIES}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "ffn_hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"model {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def padded_vocab_size(self) -> int:
        m = VOCAB_PAD_MULTIPLE
        return (self.vocab_size + m - 1) // m * m

    def num_params(self) -> int:
        """Parameter count of the unsharded model (without vocab padding)."""
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        attn = h * d * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * d * h
        if self.qkv_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * d
        per_layer = attn + 3 * h * f + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + emb + h

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelArch:
        """Build from a parsed HF config.json; unsupported options raise a ValueError."""
        family = cfg.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"config.json model_type {family!r} is not supported; "
                f"supported: {SUPPORTED_FAMILIES} (architectures {cfg.get('architectures')})"
            )
        if cfg.get("mlp_bias"):
            raise ValueError("config.json mlp_bias=true is not supported (no Llama/Qwen uses it)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act {cfg['hidden_act']!r}: only 'silu' is supported")
        heads = cfg["num_attention_heads"]
        rope_scaling = cfg.get("rope_scaling") or None
        factor = None
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind == "default":
                pass
            elif kind == "llama3":
                expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
                for key, val in expected.items():
                    if float(rope_scaling.get(key, val)) != val:
                        raise ValueError(
                            f"config.json rope_scaling.{key}={rope_scaling[key]}: Megatron-Core's "
                            f"llama3 RoPE scaling supports only {key}={val}"
                        )
                factor = float(rope_scaling["factor"])
            else:
                raise ValueError(
                    f"config.json rope_scaling type {kind!r} is not supported; supported: none, 'default', 'llama3'"
                )
        if family == "qwen2":
            qkv_bias = True
        else:
            qkv_bias = bool(cfg.get("attention_bias", False))
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None:  # transformers >= 5 nests it under rope_parameters
            rope_theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            ffn_hidden_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rope_theta=float(rope_theta),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=family == "qwen3",
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rope_scaling_factor=factor,
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelArch:
        cfg_file = Path(path) / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"no config.json in {path}: pass a Hugging Face model directory")
        return cls.from_hf_config(json.loads(cfg_file.read_text()))
