"""HF <-> Megatron conversion and verification, built on hf_mapping (one mapping for all).

- hf_to_mcore: every rank of the target layout reads only the HF tensors it needs, one at a
  time (safetensors memory-maps them), shards them and writes a torch_dist checkpoint; memory
  per rank is one model shard.
- mcore_to_hf: one process loads the (layout-independent) checkpoint into an unsharded model
  and streams it out tensor by tensor into size-limited safetensors shards: one model copy.
- verify: runs both models on one random token batch and reports the largest logit gap.
The HF config and tokenizer files travel inside the Megatron checkpoint (in `hf/`).
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


def full_logits(chunks: list, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, V] of one token batch on global rank 0 (None elsewhere).

    Collective over the whole world; for checks, not training (it gathers the vocabulary).
    """
    from megatron.core import parallel_state

    from nat_megatron.train.forward_backward import MicroBatch, forward_backward

    for c in chunks:
        c.eval()
    mb = MicroBatch(tokens=tokens, targets=tokens, count=0)
    zero = lambda stats, _mb: (stats["logprobs"].sum() * 0, 0)  # noqa: E731
    outs = forward_backward(chunks, [mb], zero, vocab_size=vocab_size, forward_only=True, keep_logits=True)
    full = torch.zeros(*tokens.shape, vocab_size)
    if outs and parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0:
        idx = mb.for_cp_rank().position_ids()[0]
        full[:, idx] = outs[0]["logits"].float().cpu()[:, : len(idx)]
    dist.all_reduce(full)  # exactly one rank per position contributes
    return full if dist.get_rank() == 0 else None


def verify(
    hf_dir: str, mcore_dir: str, layout: Layout, *, batch: int = 2, seq_len: int = 64, seed: int = 0
) -> dict | None:
    """Collective: max |logit difference| between the HF model and the Megatron checkpoint."""
    meta = Path(mcore_dir) / HF_SUBDIR
    arch = ModelArch.from_hf_dir(meta if meta.is_dir() else hf_dir)
    if ModelArch.from_hf_dir(hf_dir) != arch:
        raise ValueError(f"--hf {hf_dir} and --mcore {mcore_dir} describe different models")
    seq_len = -(-seq_len // layout.seq_multiple) * layout.seq_multiple
    tokens = torch.randint(0, arch.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    init_distributed(layout)
    chunks = build_model(arch, layout, dtype=torch.float32)
    load_checkpoint(mcore_dir, chunks)
    got = full_logits(chunks, tokens, arch.vocab_size)
    result = None
    if dist.get_rank() == 0:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(tokens).logits.float()
        result = {"max_abs_logit_diff": (got - ref).abs().max().item(), "tp": layout.tp, "pp": layout.pp}
    shutdown()
    return result
