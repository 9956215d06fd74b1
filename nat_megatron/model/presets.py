"""Model shapes known by name (a config's model.preset, the layout tuner's --model): the
published Hugging Face config.json values.

Only the fields `ModelArch.from_hf_config` reads are kept, so a dry run or the tuner needs no
weights. The weights of smollm2-135m-instruct come with the package (model/smollm2.py). "tiny"
is not a real model: it is the CPU shape the tuner's `--validate` and the tests run, chosen so
that activations and weights, not the vocabulary, dominate its memory (as they do at GPU scale).
"""

from __future__ import annotations

import json
from pathlib import Path

from nat_megatron.model.arch import ModelArch

_LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

SMOLLM2 = "smollm2-135m-instruct"  # the preset whose weights come from ensure_smollm2()

PRESETS: dict[str, dict] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct (the default CPU job)
    SMOLLM2: dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
    ),
    # Qwen/Qwen3-1.7B
    "qwen3-1.7b": dict(
        model_type="qwen3",
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
    ),
    # Qwen/Qwen3-8B
    "qwen3-8b": dict(
        model_type="qwen3",
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
    ),
    # meta-llama/Llama-3.1-8B
    "llama3.1-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        rope_scaling=_LLAMA31_ROPE,
    ),
    # Qwen/Qwen2.5-32B
    "qwen2.5-32b": dict(
        model_type="qwen2",
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        vocab_size=152064,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
    ),
    # meta-llama/Llama-3.1-70B
    "llama3.1-70b": dict(
        model_type="llama",
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        rope_scaling=_LLAMA31_ROPE,
    ),
    # CPU validation shape (not a real model; see the module docstring).
    "tiny": dict(
        model_type="llama",
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=512,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
    ),
}


def load_arch(spec: str) -> ModelArch:
    """A preset name, a config.json path, or a directory holding one -> ModelArch.

    Raises ValueError naming the problem (unknown preset, missing or unreadable file).
    """
    key = spec.lower()
    if key in PRESETS:
        return ModelArch.from_hf_config(PRESETS[key])
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"unknown preset {spec!r} and no such config.json; use one of "
            f"{sorted(PRESETS)} or a path to a Hugging Face config.json"
        )
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path} as JSON: {e}") from None
    try:
        return ModelArch.from_hf_config(cfg)
    except KeyError as e:
        raise ValueError(f"{path} lacks the config.json field {e.args[0]!r}") from None
