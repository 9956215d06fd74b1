#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and Megatron-Core (torch_dist), and verify them.

    python tools/convert_checkpoint.py hf-to-mcore --hf DIR --out DIR --tp N --pp N [--vpp N]
    python tools/convert_checkpoint.py mcore-to-hf --mcore DIR --out DIR
    python tools/convert_checkpoint.py verify --hf DIR --mcore DIR --tp N --pp N

Commands that need tp*pp processes start them with torchrun (gloo on CPU, NCCL on GPU).
`verify` prints one JSON line last: {"max_abs_logit_diff": ..., "tp": N, "pp": N}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        result = convert.verify(args.hf, args.mcore, Layout(tp=args.tp, pp=args.pp), seq_len=args.seq_len)
        if result is not None:
            print(json.dumps(result), flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        check_inputs(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from nat_megatron.parallel.launch import in_distributed_job, relaunch, single_process_env

    if not in_distributed_job():
        if world_size(args) > 1:
            return relaunch(world_size(args), [__file__, *argv])
        single_process_env()
    try:
        run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
