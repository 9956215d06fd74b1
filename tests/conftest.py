"""Shared fixtures: tiny random Hugging Face models of every supported family."""

from __future__ import annotations

import pytest
import torch

TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def tiny_config(family: str, tied: bool):
    """A small config with GQA, a vocabulary that needs padding, and family-specific options."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    kwargs = dict(TINY, tie_word_embeddings=tied, rope_theta=5000.0 if family == "llama" else 1e6)
    if family == "llama":
        return LlamaConfig(**kwargs)
    if family == "qwen2":
        return Qwen2Config(**kwargs)
    if family == "qwen3":  # head_dim != hidden/heads, as in real Qwen3 models
        return Qwen3Config(**kwargs, head_dim=24)
    raise ValueError(family)


def make_tiny_hf(path, family: str, tied: bool, seed: int = 0):
    """Save a random tiny model (fp32, safetensors) and return its directory."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, tied), dtype=torch.float32)
    with torch.no_grad():  # random norms and biases so that a mapping mistake cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """tiny_hf(family, tied) -> path of a saved random HF model (cached per session)."""
    cache = {}

    def get(family: str = "llama", tied: bool = False) -> str:
        key = (family, tied)
        if key not in cache:
            cache[key] = make_tiny_hf(tmp_path_factory.mktemp(f"{family}_{int(tied)}"), family, tied)
        return cache[key]

    return get


def random_batch(n_micro: int, b: int, s: int, vocab: int, seed: int = 0):
    """Token ids and random positive per-position weights, [n_micro, b, s]."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n_micro, b, s), generator=g)
    weights = torch.rand((n_micro, b, s), generator=g) + 0.1
    return tokens, weights
