"""The real SmolLM2-135M-Instruct gives transformers' logits in our Megatron model (fp32).

SmolLM2-135M has 9 query heads and 3 KV heads, so TP2 is not a valid layout for it (the
layout check rejects it, tested below); TP3 is the tensor-parallel case.
"""

import pytest
import torch

from tests.launcher import launch


@pytest.fixture(scope="module")
def smollm2():
    from nat_megatron.model.smollm2 import ensure_smollm2

    return str(ensure_smollm2())


@pytest.mark.dist
@pytest.mark.parametrize("layout,nprocs", [({}, 1), ({"tp": 3}, 3)], ids=["tp1", "tp3"])
def test_smollm2_logits_match_transformers(smollm2, layout, nprocs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 7?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt").input_ids[:, :32]
    tokens = ids.unsqueeze(0)  # one micro-batch
    res = launch(
        "tests.parallel.workers:logits_for_models",
        nprocs,
        layout=layout,
        hf_dirs=[smollm2],
        tokens=tokens,
        weights=torch.ones_like(tokens, dtype=torch.float),
        lengths=[ids.shape[1]],
    )[0]
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(ids).logits
    diff = (res[0]["logits"][0] - ref).abs().max().item()
    assert diff <= 1e-4, f"SmolLM2 {layout}: max abs logit diff {diff}"


def test_smollm2_tp2_is_rejected_with_the_reason(smollm2):
    from nat_megatron.model.arch import ModelArch
    from nat_megatron.parallel.layout import Layout, validate_layout

    with pytest.raises(ValueError, match="tp=2 does not divide num_attention_heads=9"):
        validate_layout(ModelArch.from_hf_dir(smollm2), Layout(tp=2))
