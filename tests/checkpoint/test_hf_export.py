"""The HF export is written aside and renamed: an interrupted export leaves the previous one whole."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from nat_megatron.checkpoint.hf_io import write_hf_export


def read(out):
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for name, f in index["weight_map"].items():
        with safe_open(out / f, "pt") as st:
            tensors[name] = st.get_tensor(name)
    return tensors


def test_interrupted_export_keeps_the_previous_one(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "tokenizer.json").write_text("{}")
    out = tmp_path / "hf"
    first = {"a": torch.ones(3), "b": torch.zeros(2)}
    write_hf_export(out, first.items(), source_dir=src, write=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
    ]

    def failing():
        yield "a", torch.full((3,), 7.0)
        raise RuntimeError("rank lost")

    with pytest.raises(RuntimeError, match="rank lost"):
        write_hf_export(out, failing(), source_dir=src, write=True)
    got = read(out)
    assert got.keys() == first.keys() and all(torch.equal(got[k], first[k]) for k in first)

    second = {"a": torch.full((3,), 2.0)}
    write_hf_export(out, second.items(), source_dir=src, write=True)
    assert read(out).keys() == {"a"} and torch.equal(read(out)["a"], second["a"])
    assert not (tmp_path / "hf.partial").exists() and not (tmp_path / "hf.old").exists()
