"""Rank parallel layouts (TP, PP, VPP, CP, DP, micro-batch, recompute) for a model and GPU count.

    nat-megatron tune --model qwen3-8b --gpus 8 --seq-len 8192 --response-len 7168 \\
        --nat rpc:0.5 [--colocate-rollout] [--json] [--layout tp=2,pp=1,cp=1,dp=4,mbs=1]

(`python tools/tune_layout.py ...` in a checkout.) --model is a preset (model/presets.py:
qwen3-1.7b, qwen3-8b, llama3.1-8b, qwen2.5-32b, llama3.1-70b, smollm2-135m-instruct, tiny) or
a Hugging Face config.json. Estimates come from nat_megatron/tune (memory.py, step_time.py;
every assumed constant in constants.py). --json prints one JSON document: {"assumptions",
"candidates" (best first: fitting ones by tokens/s/GPU), "rejected"}. --validate runs the top
candidates for a few steps on this machine (on CPU: gloo processes, use --model tiny) and
prints predicted against measured peak memory and step time. Bad input exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from nat_megatron.config import ROLLOUT_GPU_MEMORY_UTILIZATION
from nat_megatron.model.presets import PRESETS
from nat_megatron.model.recompute import RECOMPUTE
from nat_megatron.tune import constants as C

CPU_VALIDATE_MAX_PARAMS = 50e6


def parse_args(argv, prog: str | None = None):
    """(parser, parsed arguments)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=f"preset {sorted(PRESETS)} or a config.json path")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-mem-gb", type=float, default=80.0)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--seq-len", type=int, required=True, help="prompt + response tokens")
    p.add_argument("--response-len", type=int, required=True)
    p.add_argument("--nat", default="none", help="SCHEME:BUDGET, e.g. rpc:0.5 (none, urs, rpc, rpc+urs)")
    p.add_argument("--global-batch", type=int, default=256, help="sequences per optimizer step")
    p.add_argument("--layout", help="evaluate only tp=T,pp=P,cp=C,dp=D[,vpp=V][,mbs=M][,rc=none|selective|full]")
    p.add_argument("--colocate-rollout", action="store_true", help="vLLM resident on the same GPUs")
    p.add_argument("--rollout-mem-util", type=float, default=ROLLOUT_GPU_MEMORY_UTILIZATION)
    p.add_argument("--rollout-tp", type=int, default=None)
    p.add_argument("--logits-on", choices=("selected", "all"), default="selected")
    p.add_argument("--nat-peak", choices=("expected", "full"), default="expected")
    p.add_argument("--device", choices=tuple(C.DEVICES), default="h100")
    p.add_argument("--no-distributed-optimizer", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--top", type=int, default=20, help="table rows")
    p.add_argument("--validate", action="store_true", help="run the top candidates here")
    p.add_argument("--validate-top", type=int, default=3)
    p.add_argument("--validate-steps", type=int, default=3)
    return p, p.parse_args(argv)


def parse_layout(parser, text: str, gpus: int):
    """--layout text -> (Layout, mbs or None, recompute or None); errors name --layout."""
    from nat_megatron.parallel.layout import Layout

    rest, mbs, rc = [], None, None
    for part in filter(None, text.split(",")):
        key, _, val = part.partition("=")
        if key.strip() == "mbs":
            mbs = val
        elif key.strip() in ("rc", "recompute"):
            rc = val.strip()
        else:
            rest.append(part)
    try:
        mbs = int(mbs) if mbs is not None else None
        lay = Layout.parse(",".join(rest))
        if not any(p.startswith(("sp=", "sequence_parallel=")) for p in rest) and lay.tp > 1:
            lay = Layout(tp=lay.tp, pp=lay.pp, cp=lay.cp, dp=lay.dp, vpp=lay.vpp, sequence_parallel=True)
    except ValueError as e:
        parser.error(f"--layout {text!r}: {e}")
    if mbs is not None and mbs < 1:
        parser.error(f"--layout: mbs must be >= 1, got {mbs}")
    if rc is not None and rc not in RECOMPUTE:
        parser.error(f"--layout: recompute {rc!r} is unknown; use one of {tuple(RECOMPUTE)}")
    if lay.world_size != gpus:
        parser.error(
            f"--layout: tp*pp*cp*dp = {lay.tp}*{lay.pp}*{lay.cp}*{lay.dp} = "
            f"{lay.world_size} does not match --gpus {gpus}"
        )
    return lay, mbs, rc


def main(argv=None, prog: str | None = None) -> int:
    """Run the tuner; bad input exits with code 2 through parser.error."""
    parser, a = parse_args(argv, prog)
    from nat_megatron.model.presets import load_arch
    from nat_megatron.parallel.layout import validate_layout
    from nat_megatron.tune import report
    from nat_megatron.tune.memory import rollout_plan
    from nat_megatron.tune.search import MICRO_BATCH_SIZES, search
    from nat_megatron.tune.workload import Workload

    try:
        arch = load_arch(a.model)
    except ValueError as e:
        parser.error(f"--model: {e}")
    for name in ("gpus", "gpus_per_node", "seq_len", "global_batch"):
        if getattr(a, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if not 1 <= a.response_len <= a.seq_len:
        parser.error(f"--response-len must lie in [1, --seq-len={a.seq_len}], got {a.response_len}")
    try:
        scheme, budget = Workload.parse_nat(a.nat)
        work = Workload(
            seq_len=a.seq_len,
            response_len=a.response_len,
            global_batch=a.global_batch,
            nat=scheme,
            budget=budget,
            logits_on=a.logits_on,
            nat_peak=a.nat_peak,
        )
    except ValueError as e:
        parser.error(f"--nat {a.nat!r}: {e}")
    device = a.device
    if a.validate:
        import torch

        if not torch.cuda.is_available():
            device = "cpu"
            if arch.num_params() > CPU_VALIDATE_MAX_PARAMS or a.gpus > 8:
                parser.error(
                    "--validate on a machine without GPUs runs one CPU process per GPU: "
                    "use a small model (--model tiny) and --gpus <= 8"
                )
    dev = C.DEVICES[device]
    mem_gb = a.gpu_mem_gb if device != "cpu" else dev.mem_gb
    rollout = None
    if a.colocate_rollout:
        try:
            rollout = rollout_plan(
                arch,
                mem_gb=mem_gb,
                seq_len=a.seq_len,
                tp=a.rollout_tp,
                gpus_per_node=a.gpus_per_node,
                utilization=a.rollout_mem_util,
            )
        except ValueError as e:
            parser.error(f"--colocate-rollout: {e}")

    kwargs = dict(
        mem_gb=mem_gb,
        gpus_per_node=a.gpus_per_node,
        rollout=rollout,
        distributed_optimizer=not a.no_distributed_optimizer,
    )
    if a.layout:
        lay, mbs, rc = parse_layout(parser, a.layout, a.gpus)
        try:
            validate_layout(arch, lay, gpus_per_node=a.gpus_per_node)
        except ValueError as e:
            parser.error(f"--layout: {e}")
        for m in [mbs] if mbs else []:
            try:
                validate_layout(arch, lay, global_batch=a.global_batch, micro_batch_size=m)
            except ValueError as e:
                parser.error(f"--global-batch: {e}")
        result = search(
            arch,
            work,
            a.gpus,
            dev,
            layouts=[lay],
            mbs_options=[mbs] if mbs else MICRO_BATCH_SIZES,
            recompute_options=[rc] if rc else tuple(RECOMPUTE),
            **kwargs,
        )
    else:
        result = search(arch, work, a.gpus, dev, **kwargs)
    if not result.candidates:
        reasons = sorted({why for _, why in result.rejected})
        arg = "--gpus"
        if reasons and all("global batch" in r or "micro_batch_size" in r for r in reasons):
            arg = "--global-batch"
        parser.error(f"{arg}: no valid layout for {a.gpus} GPUs: " + " | ".join(reasons[:6]))

    info = report.assumptions(
        arch, work, dev, gpus=a.gpus, mem_gb=mem_gb, gpus_per_node=a.gpus_per_node, rollout=rollout
    )
    doc = report.to_json(result, info)
    if not a.json:
        print(report.table(result, info, top=a.top))
    if a.validate:
        from nat_megatron.tune.validate import format_rows, validate_plans

        plans = [c.plan for c in result.candidates if c.fits][: a.validate_top]
        rows = validate_plans(arch, work, plans, steps=a.validate_steps)
        doc["validation"] = [
            {
                "layout": c.layout_text,
                "recompute": r["plan"].recompute,
                "predicted_gb": r["predicted_gb"],
                "measured_gb": r["measured_gb"],
                "predicted_s": r["predicted_s"],
                "measured_s": r["measured_s"],
            }
            for c, r in zip(result.candidates, rows)
        ]
        if not a.json:
            print(
                f"\nvalidation on {dev.name} ({a.validate_steps} steps; peak over steps 2.. "
                "and ranks):\n" + format_rows(rows)
            )
    if a.json:
        json.dump(doc, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
