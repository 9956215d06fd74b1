"""Smoke job: a few NAT-RPC training steps of SmolLM2-135M-Instruct on 2 CPU ranks (PP2).

Until the RL loop lands, this is the README's main job. It runs the real stack end to end:
the SmolLM2 GGUF turned into an HF directory, loaded into Megatron-Core split over two
pipeline stages (gloo), the embedded arithmetic problems in the tokenizer's chat template,
Random Prefix Cutting at budget 0.5 (each answer truncated before the model runs, kept tokens
reweighted by 1/pi), Megatron's 1F1B schedule, Adam, and a distributed checkpoint at the end.

What it simplifies: no rollouts yet. The responses are the correct answers ("The answer is
\\boxed{N}."), and the loss is the Horvitz-Thompson estimate of their token-mean negative
log-likelihood (the GRPO surrogate with advantage 1 and on-policy ratios has this gradient).
It prints that estimate and the exact full-token value, which must go down.

    python -m nat_megatron.smoke [--steps 6] [--batch 8] [--budget 0.5] [--out runs/smoke]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def parse_args(argv):
    p = argparse.ArgumentParser(description="NAT-RPC smoke training of SmolLM2-135M (CPU, PP2)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8, help="problems per step")
    p.add_argument("--budget", type=float, default=0.5, help="RPC expected kept fraction")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/smoke", help="where the checkpoint goes")
    return p.parse_args(argv)


def ht_nll(stats, mb):
    """sum over kept answer tokens of -log p / pi (global token count divides it later)."""
    f = mb.fields
    w = torch.where(f["kept"], 1.0 / f["prob"].clamp_min(1e-12), torch.zeros_like(f["prob"]))
    return -(stats["logprobs"] * w.to(stats["logprobs"].dtype)).sum(), mb.count


def main(argv=None) -> int:
    from nat_megatron.parallel.launch import in_distributed_job, relaunch

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not in_distributed_job():
        return relaunch(2, ["-m", "nat_megatron.smoke", *argv])

    import torch.distributed as dist
    from transformers import AutoTokenizer

    import nat_megatron  # noqa: F401
    from nat_megatron.checkpoint.dist_ckpt import save_checkpoint
    from nat_megatron.checkpoint.hf_io import HFReader
    from nat_megatron.checkpoint.hf_mapping import load_hf_weights
    from nat_megatron.data.arithmetic import arithmetic_examples
    from nat_megatron.data.chat import template_examples
    from nat_megatron.model.arch import ModelArch
    from nat_megatron.model.build import build_model
    from nat_megatron.model.smollm2 import ensure_smollm2
    from nat_megatron.nat.selection import sample, selection_generators
    from nat_megatron.parallel.distributed import init_distributed, shutdown
    from nat_megatron.parallel.layout import Layout
    from nat_megatron.train.batching import Sample, build_micro_batches
    from nat_megatron.train.forward_backward import forward_backward
    from nat_megatron.train.optimizer import build_optimizer, wrap_ddp

    layout = Layout(pp=2)
    init_distributed(layout, seed=args.seed)
    rank0 = dist.get_rank() == 0
    if rank0:
        ensure_smollm2()  # one rank converts; the other waits at the barrier
    dist.barrier()
    hf_dir = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    arch = ModelArch.from_hf_dir(hf_dir)
    chunks = build_model(arch, layout)
    load_hf_weights(chunks, arch, HFReader(hf_dir))
    model = wrap_ddp(chunks)
    opt = build_optimizer(model, lr=args.lr, weight_decay=0.0, clip_grad=1.0)
    examples, _ = template_examples(arithmetic_examples(size=args.steps * args.batch, seed=args.seed), tok)

    for step in range(args.steps):
        t0 = time.time()
        batch = examples[step * args.batch : (step + 1) * args.batch]
        samples = []
        for ex in batch:
            answer = tok(f"The answer is \\boxed{{{ex.answer}}}.{tok.eos_token}", add_special_tokens=False).input_ids
            samples.append(
                Sample(
                    prompt=torch.tensor(ex.prompt_ids),
                    response=torch.tensor(answer),
                    old_logprobs=torch.zeros(len(answer)),
                    advantage=1.0,
                )
            )
        lengths = torch.tensor([len(s.response) for s in samples])
        ids = list(range(step * args.batch, (step + 1) * args.batch))
        selection = sample("rpc", args.budget, lengths, selection_generators(args.seed, step, ids))
        full = sample("none", 1.0, lengths, selection_generators(args.seed, step, ids))
        mbs = build_micro_batches(samples, selection, aggregation="token-mean", num_micro_batches=4)
        for c in model:
            c.zero_grad_buffer()
        opt.zero_grad()
        outs = forward_backward(model, mbs, ht_nll, vocab_size=arch.vocab_size)
        opt.step()
        # The exact full-token NLL after the step, for the log (forward only).
        ref = forward_backward(
            model,
            build_micro_batches(samples, full, aggregation="token-mean", num_micro_batches=4),
            ht_nll,
            vocab_size=arch.vocab_size,
            forward_only=True,
        )
        for c in model:
            c.train()
        sums = torch.tensor(
            [
                sum(float(o["loss_sum"]) for o in outs),
                sum(float(o["count"]) for o in outs),
                sum(float(o["loss_sum"]) for o in ref),
            ],
            dtype=torch.float64,
        )
        dist.all_reduce(sums)  # the last stage holds the values; others add zeros
        if rank0:
            print(
                f"step {step + 1}/{args.steps}  kept {selection.kept_fraction:.2f} of answer tokens  "
                f"HT NLL estimate {sums[0] / sums[1]:.4f}  full NLL after step {sums[2] / sums[1]:.4f}  "
                f"max weight {selection.weight_max:.1f}  {time.time() - t0:.1f}s",
                flush=True,
            )
    path = save_checkpoint(f"{args.out}/step_{args.steps}", model, optimizer=opt, extra={"step": args.steps})
    if rank0:
        print(f"saved distributed checkpoint {path}")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
