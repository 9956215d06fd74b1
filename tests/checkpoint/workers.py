"""Rank functions for checkpoint tests (run by tests.launcher)."""

from __future__ import annotations

import os

import torch

from nat_megatron.checkpoint.convert import full_logits
from nat_megatron.checkpoint.dist_ckpt import load_checkpoint, save_checkpoint
from nat_megatron.checkpoint.gather import gather_full
from nat_megatron.checkpoint.hf_io import HFReader
from nat_megatron.checkpoint.hf_mapping import load_hf_weights
from nat_megatron.model.arch import ModelArch
from nat_megatron.model.build import build_model
from nat_megatron.parallel.distributed import init_distributed, shutdown
from nat_megatron.parallel.layout import Layout
from nat_megatron.train.forward_backward import forward_backward
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
        save_checkpoint(ckpt, ddp, optimizer=opt,
                        extra={"step": 1, "note": "after one step", "scheduler": sched.state_dict()})
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
