"""Convert checkpoints between Hugging Face and Megatron-Core (torch_dist), and verify them.

    nat-megatron convert hf-to-mcore --hf DIR --out DIR --tp N --pp N [--vpp N]
    nat-megatron convert mcore-to-hf --mcore DIR --out DIR
    nat-megatron convert verify --hf DIR --mcore DIR --tp N --pp N

(`python tools/convert_checkpoint.py ...` in a checkout.) Commands that need tp*pp processes
start them with torchrun (gloo on CPU, NCCL on GPU). `verify` prints one JSON line last:
{"max_abs_logit_diff": ..., "tp": N, "pp": N}. Bad input exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def parse_args(argv, prog: str | None = None):
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors -> Megatron distributed checkpoint")
    a.add_argument("--hf", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--vpp", type=int, default=None)
    b = sub.add_parser("mcore-to-hf", help="Megatron distributed checkpoint -> HF directory")
    b.add_argument("--mcore", required=True)
    b.add_argument("--out", required=True)
    c = sub.add_parser("verify", help="compare HF and Megatron logits on a random batch")
    c.add_argument("--hf", required=True)
    c.add_argument("--mcore", required=True)
    c.add_argument("--tp", type=int, default=1)
    c.add_argument("--pp", type=int, default=1)
    c.add_argument("--seq-len", type=int, default=64)
    return p.parse_args(argv)


def check_inputs(args) -> None:
    """Fail on bad paths and layouts before any process starts or weight is read."""
    from nat_megatron.model.arch import ModelArch
    from nat_megatron.parallel.layout import Layout, validate_layout

    if getattr(args, "hf", None):
        if not Path(args.hf, "config.json").is_file():
            raise ValueError(f"--hf {args.hf}: no config.json there; pass a Hugging Face model directory")
        arch = ModelArch.from_hf_dir(args.hf)
    if getattr(args, "mcore", None):
        meta = Path(args.mcore, "hf", "config.json")
        if not Path(args.mcore, "metadata.json").is_file() or not meta.is_file():
            raise ValueError(
                f"--mcore {args.mcore}: not a checkpoint written by hf-to-mcore "
                "(needs metadata.json and hf/config.json)"
            )
        arch = ModelArch.from_hf_dir(meta.parent)
    if args.cmd != "mcore-to-hf":
        layout = Layout(tp=args.tp, pp=args.pp, vpp=getattr(args, "vpp", None))
        validate_layout(arch, layout)


def world_size(args) -> int:
    return 1 if args.cmd == "mcore-to-hf" else args.tp * args.pp


def verify(hf_dir: str, mcore_dir: str, layout, *, batch: int = 2, seq_len: int = 64, seed: int = 0) -> dict | None:
    """Collective: max |logit difference| between the HF model and the Megatron checkpoint
    (the trainer's forward at `layout`), on global rank 0; None elsewhere."""
    import torch
    import torch.distributed as dist

    from nat_megatron.checkpoint.convert import HF_SUBDIR
    from nat_megatron.checkpoint.dist_ckpt import load_checkpoint
    from nat_megatron.model.arch import ModelArch
    from nat_megatron.model.build import build_model
    from nat_megatron.parallel.distributed import init_distributed, shutdown
    from nat_megatron.train.logits import full_logits

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


def run(args) -> None:
    import nat_megatron  # noqa: F401
    from nat_megatron.checkpoint import convert
    from nat_megatron.parallel.layout import Layout

    if args.cmd == "hf-to-mcore":
        convert.hf_to_mcore(args.hf, args.out, Layout(tp=args.tp, pp=args.pp, vpp=args.vpp))
        if os.environ.get("RANK", "0") == "0":
            print(f"wrote Megatron checkpoint {args.out} (tp={args.tp}, pp={args.pp})")
    elif args.cmd == "mcore-to-hf":
        convert.mcore_to_hf(args.mcore, args.out)
        print(f"wrote Hugging Face model {args.out}")
    else:
        result = verify(args.hf, args.mcore, Layout(tp=args.tp, pp=args.pp), seq_len=args.seq_len)
        if result is not None:
            print(json.dumps(result), flush=True)


def main(argv=None, prog: str | None = None) -> int:
    """Entry point; returns the process exit code (2: bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, prog)
    try:
        check_inputs(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from nat_megatron.parallel.launch import in_distributed_job, relaunch, single_process_env

    if not in_distributed_job():
        if world_size(args) > 1:
            return relaunch(world_size(args), ["-m", "nat_megatron.convert_cli", *argv])
        single_process_env()
    try:
        run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
