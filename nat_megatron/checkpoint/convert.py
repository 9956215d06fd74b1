"""HF <-> Megatron conversion, built on hf_mapping (one mapping for all).

- hf_to_mcore: every rank of the target layout reads only the HF tensors it needs, one at a
  time (safetensors memory-maps them), shards them and writes a torch_dist checkpoint; memory
  per rank is one model shard.
- mcore_to_hf: one process loads the (layout-independent) checkpoint into an unsharded model
  and streams it out tensor by tensor into size-limited safetensors shards: one model copy.
The HF config and tokenizer files travel inside the Megatron checkpoint (in `hf/`). The check
of a conversion (both models' logits on one batch) runs the trainer's forward, so it lives
above the trainer: nat_megatron/convert_cli.py `verify`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from nat_megatron.checkpoint.dist_ckpt import load_checkpoint, save_checkpoint
from nat_megatron.checkpoint.gather import unwrap
from nat_megatron.checkpoint.hf_io import HFReader, HFWriter, copy_tokenizer_files
from nat_megatron.checkpoint.hf_mapping import from_megatron, global_name, load_hf_weights, megatron_names
from nat_megatron.model.arch import ModelArch
from nat_megatron.model.build import build_model
from nat_megatron.parallel.distributed import init_distributed, shutdown
from nat_megatron.parallel.layout import Layout

HF_SUBDIR = "hf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_dtype(hf_dir: str | Path) -> torch.dtype:
    """The dtype the HF checkpoint was saved in (config.json torch_dtype/dtype), default fp32."""
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    return _DTYPES.get(cfg.get("torch_dtype") or cfg.get("dtype") or "float32", torch.float32)


def hf_to_mcore(hf_dir: str, out: str, layout: Layout) -> None:
    """Collective over tp*pp ranks: HF safetensors -> Megatron torch_dist checkpoint."""
    arch = ModelArch.from_hf_dir(hf_dir)
    reader = HFReader(hf_dir)
    init_distributed(layout)
    chunks = build_model(arch, layout, dtype=hf_dtype(hf_dir))
    load_hf_weights(chunks, arch, reader)
    save_checkpoint(out, chunks)
    if dist.get_rank() == 0:
        meta = Path(out) / HF_SUBDIR
        meta.mkdir(exist_ok=True)
        shutil.copy2(Path(hf_dir) / "config.json", meta / "config.json")
        copy_tokenizer_files(hf_dir, meta)
    shutdown()


def mcore_to_hf(mcore_dir: str, out: str) -> None:
    """Single process: Megatron checkpoint (any saved layout) -> HF directory."""
    meta = Path(mcore_dir) / HF_SUBDIR
    arch = ModelArch.from_hf_dir(meta)
    init_distributed(Layout())
    chunks = build_model(arch, Layout(), dtype=hf_dtype(meta))
    load_checkpoint(mcore_dir, chunks)
    model = unwrap(chunks[0])
    params = {global_name(model, n): p for n, p in model.named_parameters()}
    writer = HFWriter(out)
    for name in megatron_names(arch):
        for hf_name, tensor in from_megatron(arch, name, params[name].detach()).items():
            writer.add(hf_name, tensor)
    writer.close()
    shutil.copy2(meta / "config.json", Path(out) / "config.json")
    copy_tokenizer_files(meta, out)
    shutdown()
