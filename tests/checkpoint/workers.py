"""Rank functions for checkpoint tests (run by tests.launcher)."""

from __future__ import annotations

import os

import torch

from nat_megatron.checkpoint.dist_ckpt import load_checkpoint, save_checkpoint
from nat_megatron.checkpoint.gather import gather_full
from nat_megatron.checkpoint.hf_io import HFReader
from nat_megatron.checkpoint.hf_mapping import load_hf_weights
from nat_megatron.model.arch import ModelArch
from nat_megatron.model.build import build_model
from nat_megatron.parallel.distributed import init_distributed, shutdown
from nat_megatron.parallel.layout import Layout
from nat_megatron.train.forward_backward import forward_backward
from nat_megatron.train.logits import full_logits
from nat_megatron.train.optimizer import build_optimizer, build_scheduler, wrap_ddp
from tests.parallel.workers import make_micro_batches, weighted_nll


def _train_step(ddp, opt, sched, mbs, vocab):
    for c in ddp:
        c.zero_grad_buffer()
    opt.zero_grad()
    forward_backward(ddp, mbs, weighted_nll, vocab_size=vocab)
    opt.step()
    sched.step(increment=1)


def train_save_continue(*, layout, hf_dir, ckpt, tokens, weights, lengths, resume=False):
    """Without resume: step, save (model+optimizer+RNG), step. With resume: load, step.

    Returns on rank 0 the weights after the last step, the RNG draw after it, and the logits
    of tokens[0] right after the checkpointed step (no resume only).
    """
    lay = Layout(**layout)
    init_distributed(lay, seed=7)
    arch = ModelArch.from_hf_dir(hf_dir)
    chunks = build_model(arch, lay)
    load_hf_weights(chunks, arch, HFReader(hf_dir))
    ddp = wrap_ddp(chunks)
    opt = build_optimizer(ddp, lr=1e-2, optimizer="adam")
    sched = build_scheduler(opt, lr=1e-2, warmup_steps=1, total_steps=4)
    mbs = make_micro_batches(tokens, weights, lengths)
    out = {}
    if resume:
        out["extra"] = load_checkpoint(ckpt, ddp, optimizer=opt)
        sched.load_state_dict(out["extra"].pop("scheduler"))
    else:
        _train_step(ddp, opt, sched, mbs, arch.vocab_size)
        save_checkpoint(
            ckpt, ddp, optimizer=opt, extra={"step": 1, "note": "after one step", "scheduler": sched.state_dict()}
        )
        out["logits"] = full_logits(ddp, tokens[0, :, : lengths[0]], arch.vocab_size)
        for c in ddp:
            c.train()
    _train_step(ddp, opt, sched, mbs, arch.vocab_size)
    out["lr"] = opt.param_groups[0]["lr"]
    out["weights"] = gather_full(ddp)
    out["rng"] = torch.rand(3)
    shutdown()
    return out if os.environ["RANK"] == "0" else None


def load_logits(*, layout, ckpt, hf_dir, tokens):
    """Load only the model weights of `ckpt` at `layout`; logits of tokens and the weights."""
    lay = Layout(**layout)
    init_distributed(lay)
    arch = ModelArch.from_hf_dir(hf_dir)
    chunks = build_model(arch, lay)
    load_checkpoint(ckpt, chunks)
    out = {"logits": full_logits(chunks, tokens, arch.vocab_size), "weights": gather_full(chunks)}
    shutdown()
    return out if os.environ["RANK"] == "0" else None


def save_corrupt_resume(*, hf_dir, ckpt):
    """Save step_000001 and step_000002 (each rank hashing its share), flip one byte of the
    newest, and add a step_000003 of another model (verifies, fails to load). Returns what
    loading and resuming did, on rank 0."""
    import dataclasses
    import pathlib

    from nat_megatron.checkpoint.dist_ckpt import CheckpointError, mark_latest
    from nat_megatron.checkpoint.resume import resume_checkpoint

    lay = Layout(dp=2)
    init_distributed(lay, seed=7)
    arch = ModelArch.from_hf_dir(hf_dir)
    chunks = build_model(arch, lay)
    load_hf_weights(chunks, arch, HFReader(hf_dir))
    root = pathlib.Path(ckpt)
    for step in (1, 2):
        save_checkpoint(root / f"step_{step:06d}", chunks, extra={"step": step}, meta={"step": step})
        if torch.distributed.get_rank() == 0:
            mark_latest(root, f"step_{step:06d}", keep_last=5)
    other = build_model(dataclasses.replace(arch, ffn_hidden_size=arch.ffn_hidden_size * 2), lay)
    save_checkpoint(root / "step_000003", other, extra={"step": 3}, meta={"step": 3})
    torch.distributed.barrier()
    out = {}
    if torch.distributed.get_rank() == 0:
        blob = next((root / "step_000002").glob("*.distcp"))
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
    torch.distributed.barrier()
    try:
        load_checkpoint(root / "step_000002", chunks)
    except CheckpointError as e:
        out["corrupt_load"] = str(e)
    try:
        resume_checkpoint(root, root / "step_000002", chunks)
    except ValueError as e:
        out["explicit"] = str(e)
    path, extra = resume_checkpoint(root, None, chunks, check=lambda p, meta: out.setdefault("meta", meta))
    out.update(path=str(path), extra=extra)
    shutdown()
    return out if os.environ["RANK"] == "0" else None


def take_lock(*, directory):
    """hold_checkpoint_dir on every rank; returns the error each rank raised (or None)."""
    from nat_megatron.checkpoint.lock import hold_checkpoint_dir

    torch.distributed.init_process_group("gloo")
    try:
        hold_checkpoint_dir(directory)
        error = None
    except ValueError as e:
        error = str(e)
    torch.distributed.destroy_process_group()
    return error
