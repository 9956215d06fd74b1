"""Distributed checkpoints and HF<->Megatron conversion."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import random_batch
from tests.launcher import ROOT, launch

TOOL = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]


def convert(*args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([*TOOL, *args], capture_output=True, text=True, env=env, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"convert {args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def hf_tensors(path):
    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    out = {}
    for f in files:
        with safe_open(path / f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


@pytest.mark.dist
@pytest.mark.parametrize("family,tied", [("qwen2", False), ("qwen3", True)])
def test_round_trip_is_exact_and_verify_prints_json(tiny_hf, tmp_path, family, tied):
    from transformers import AutoModelForCausalLM

    hf = tiny_hf(family, tied)
    convert("hf-to-mcore", "--hf", hf, "--out", str(tmp_path / "mc"), "--tp", "2", "--pp", "2")
    convert("mcore-to-hf", "--mcore", str(tmp_path / "mc"), "--out", str(tmp_path / "back"))
    a, b = hf_tensors(hf), hf_tensors(tmp_path / "back")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} changed in the round trip"
    AutoModelForCausalLM.from_pretrained(tmp_path / "back")  # transformers loads it
    p = convert("verify", "--hf", hf, "--mcore", str(tmp_path / "mc"), "--tp", "2", "--pp", "2")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["tp"] == 2 and result["pp"] == 2
    assert result["max_abs_logit_diff"] <= 1e-4


def test_bad_inputs_are_named_before_compute(tiny_hf, tmp_path):
    hf = tiny_hf("llama", False)
    p = convert("hf-to-mcore", "--hf", hf, "--out", str(tmp_path / "x"), "--tp", "3", "--pp", "1", check=False)
    assert p.returncode == 2 and "tp=3 does not divide num_attention_heads=4" in p.stderr
    p = convert("hf-to-mcore", "--hf", hf, "--out", str(tmp_path / "x"), "--tp", "1", "--pp", "3", check=False)
    assert p.returncode == 2 and "do not divide num_layers=4" in p.stderr
    cfg = json.loads(Path(hf, "config.json").read_text())
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    p = convert("hf-to-mcore", "--hf", str(gpt2), "--out", str(tmp_path / "y"), check=False)
    assert p.returncode == 2 and "'gpt2' is not supported" in p.stderr


@pytest.mark.dist
def test_missing_and_mismatched_tensors_are_named(tiny_hf, tmp_path):
    from safetensors.torch import save_file

    hf = tiny_hf("llama", False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(Path(hf, "config.json").read_text())
    tensors = hf_tensors(hf)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    p = convert("hf-to-mcore", "--hf", str(broken), "--out", str(tmp_path / "z"), check=False)
    assert p.returncode != 0 and "model.layers.1.mlp.up_proj.weight" in p.stderr + p.stdout

    # A checkpoint of another model size: the first tensor whose shape differs is named.
    convert("hf-to-mcore", "--hf", hf, "--out", str(tmp_path / "small"))
    bigger = tmp_path / "bigger"
    bigger.mkdir()
    cfg = json.loads(Path(hf, "config.json").read_text())
    (bigger / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=256)))
    (tmp_path / "small" / "hf" / "config.json").write_text((bigger / "config.json").read_text())
    p = convert("mcore-to-hf", "--mcore", str(tmp_path / "small"), "--out", str(tmp_path / "o"), check=False)
    assert p.returncode != 0
    assert "tensor 'decoder.layers.mlp.linear_fc1.weight'" in p.stderr or "linear_fc" in p.stderr, p.stderr[-2000:]


@pytest.mark.dist
def test_save_tp2pp2_resume_and_load_tp1(tiny_hf, tmp_path):
    hf = tiny_hf("llama", True)
    tokens, weights = random_batch(4, 2, 16, 300, seed=3)
    kw = dict(hf_dir=hf, ckpt=str(tmp_path / "ck"), tokens=tokens, weights=weights, lengths=[16, 8, 16, 8])
    layout = {"tp": 2, "pp": 2}
    first = launch("tests.checkpoint.workers:train_save_continue", 4, layout=layout, **kw)[0]
    resumed = launch("tests.checkpoint.workers:train_save_continue", 4, layout=layout, resume=True, **kw)[0]
    assert resumed["extra"] == {"step": 1, "note": "after one step"}
    for k, w in first["weights"].items():  # model, optimizer and RNG restored: same next step
        assert torch.equal(w, resumed["weights"][k]), f"{k} differs after resuming"
    assert torch.equal(first["rng"], resumed["rng"])
    assert first["lr"] == resumed["lr"] > 0  # the LR schedule resumed where it was

    tp1 = launch(
        "tests.checkpoint.workers:load_logits", 1, layout={}, ckpt=kw["ckpt"], hf_dir=hf, tokens=tokens[0, :, :16]
    )[0]
    diff = (tp1["logits"] - first["logits"]).abs().max().item()
    assert diff <= 1e-5, f"logits after loading the TP2xPP2 checkpoint at TP1 differ by {diff}"


@pytest.mark.dist
def test_corrupt_checkpoint_is_refused_and_resume_falls_back(tiny_hf, tmp_path, capfd):
    """A flipped byte is a named CheckpointError; auto resume skips it and a checkpoint that
    fails to load (another model), with warnings, and loads the previous complete one."""
    ck = tmp_path / "ck"
    out = launch("tests.checkpoint.workers:save_corrupt_resume", 2, hf_dir=tiny_hf("llama", True), ckpt=str(ck))[0]
    assert "does not match its hash in the manifest (corrupted)" in out["corrupt_load"], out
    assert f"checkpoint {ck / 'step_000002'} fails its manifest check" in out["corrupt_load"]
    assert out["explicit"].startswith("checkpoint.resume: checkpoint ") and "corrupted" in out["explicit"]
    assert out["path"] == str(ck / "step_000001") and out["extra"] == {"step": 1}
    assert out["meta"] == {"step": 3}  # run.json was read before the failing load of step 3
    manifest = json.loads((ck / "step_000001" / "manifest.json").read_text())["files"]
    assert {".metadata", "metadata.json", "common.pt", "run.json"} <= set(manifest)
    assert sum(n.endswith(".distcp") for n in manifest) == 2  # both ranks' files, each hashed once
