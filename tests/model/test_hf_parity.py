"""Logits of our Megatron model equal Hugging Face transformers' (fp32), at TP1 and TP2xPP2."""

import pytest
import torch

from tests.conftest import random_batch
from tests.launcher import launch

FAMILIES = [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True), ("qwen3", False), ("qwen3", True)]


def hf_logits(hf_dir, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(t).logits for t in tokens]


@pytest.mark.dist
@pytest.mark.parametrize("layout,nprocs", [({}, 1), ({"tp": 2, "pp": 2}, 4)], ids=["tp1", "tp2pp2"])
def test_logits_match_transformers(tiny_hf, layout, nprocs):
    dirs = [tiny_hf(f, t) for f, t in FAMILIES]
    tokens, weights = random_batch(2, 2, 24, 300)
    lengths = [24, 16]
    res = launch(
        "tests.parallel.workers:logits_for_models",
        nprocs,
        layout=layout,
        hf_dirs=dirs,
        tokens=tokens,
        weights=weights,
        lengths=lengths,
    )[0]
    for (family, tied), d, got in zip(FAMILIES, dirs, res):
        ref = hf_logits(d, [tokens[i, :, :s] for i, s in enumerate(lengths)])
        for g, r in zip(got["logits"], ref):
            diff = (g - r).abs().max().item()
            assert diff <= 1e-4, f"{family} tied={tied} {layout}: max abs logit diff {diff}"
