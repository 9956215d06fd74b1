"""Train-phase time of NAT against full-sequence training, on the same rollouts, in the real job.

    python tools/bench_train_phase.py [--config examples/configs/smollm2-135m-cpu.yaml]
        [--schemes none,rpc,urs] [--max-tokens 0,512] [--share-prompt 1,0] [--steps 1] [--repeats 3]
        [key=value ...]

Starts the config's job (its world size and layout, the real Trainer and engines), samples
`--steps` steps of rollouts once, then trains on exactly those rollouts again and again: every
repeat runs each (scheme, micro-batching) condition in turn, so a change in machine load hits
them alike. What is timed is Trainer.learn, the whole training phase of a step (NAT selection,
advantages, the loss's other inputs, Megatron forward/backward and the optimizer step), wall
time on rank 0 between two barriers. nat.budget comes from the config (or key=value);
`--max-tokens 0` means the config's micro_batch_size sequences per micro-batch, N > 0 a budget
of N padded tokens per micro-batch (parallel.max_tokens_per_micro_batch). `--share-prompt 1,0`
also runs every condition with and without parallel.share_prompt (default: the config's).

Prints one JSON line: per condition the median seconds per step (and every repeat), the tokens
fed forward (prompt + kept response prefix, summed over the steps) and the kept fraction, and
the ratio of every condition's time to the first condition's (the first scheme at the first
micro-batching; by default full-sequence training, nat.scheme=none).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

DEFAULT_CONFIG = "examples/configs/smollm2-135m-cpu.yaml"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--schemes", default="none,rpc", help="comma list of nat.scheme values (none, urs, rpc)")
    p.add_argument(
        "--max-tokens", default="0", help="comma list: 0 = micro_batch_size per micro-batch, N = N tokens each"
    )
    p.add_argument(
        "--share-prompt", default="", help="comma list of 1/0: parallel.share_prompt values (default: the config's)"
    )
    p.add_argument("--steps", type=int, default=1, help="rollout steps to train on (each timed repeat trains all)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="also write the JSON line to this file")
    p.add_argument(
        "--profile", help="write a torch.profiler op table of every condition's last repeat per rank into this folder"
    )
    p.add_argument("--run-dir", help="checkpoints and TensorBoard of the run (default: a new temporary directory)")
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    return p.parse_args(argv)


def bench(cfg, args) -> dict | None:
    import torch
    import torch.distributed as dist

    from nat_megatron.parallel.distributed import cpu_group
    from nat_megatron.train.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        rollouts = []
        for _ in range(args.steps):
            batch, _ = trainer.rollout_step()
            rollouts.append(batch)
        shares = [bool(int(x)) for x in args.share_prompt.split(",")] if args.share_prompt else [None]
        conditions = [
            (s, int(m), sh) for sh in shares for m in args.max_tokens.split(",") for s in args.schemes.split(",")
        ]
        times = {c: [] for c in conditions}
        info = {}
        for r in range(args.warmup + args.repeats):
            for key in conditions:
                scheme, max_tokens, share = key
                on = cfg.parallel.share_prompt if share is None else share
                trainer.cfg = dataclasses.replace(
                    cfg,
                    nat=dataclasses.replace(cfg.nat, scheme=scheme, budget=1.0 if scheme == "none" else cfg.nat.budget),
                    parallel=dataclasses.replace(
                        cfg.parallel, max_tokens_per_micro_batch=max_tokens or None, share_prompt=on
                    ),
                )
                fed = kept = generated = 0
                profile = args.profile and r == args.warmup + args.repeats - 1
                dist.barrier(group=cpu_group())
                t0 = time.perf_counter()
                with torch.profiler.profile() if profile else contextlib.nullcontext() as prof:
                    for batch in rollouts:
                        selection, updates, _ = trainer.learn(batch)
                        fed += sum(u["tokens"][1] for u in updates)
                        kept += sum(u["tokens"][0] for u in updates)
                        generated += int(batch.step_lengths.sum())
                dist.barrier(group=cpu_group())
                if profile:
                    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
                    path = Path(args.profile) / f"{_name(scheme, max_tokens, on)}.rank{trainer.rank}.txt"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(table)
                if r >= args.warmup:
                    times[key].append(time.perf_counter() - t0)
                info[key] = {"response_tokens_fed": fed, "kept_fraction": round(kept / generated, 4)}
        if trainer.rank != 0:
            return None
        base = statistics.median(times[conditions[0]])
        result = {}
        for c in conditions:
            med = statistics.median(times[c])
            name = _name(*c)
            result[name] = {
                "train_s": round(med / args.steps, 3),
                "train_s_repeats": [round(t / args.steps, 3) for t in times[c]],
                **info[c],
                "ratio": round(med / base, 3),
            }
        return {
            "bench": "train_phase",
            "config": args.config,
            "nat_budget": cfg.nat.budget,
            "layout": str(cfg.parallel.layout()),
            "share_prompt": cfg.parallel.share_prompt,
            "distributed_optimizer": cfg.optim.distributed_optimizer,
            "steps": args.steps,
            "repeats": args.repeats,
            "generated_tokens": sum(int(b.step_lengths.sum()) for b in rollouts),
            "conditions": result,
        }
    finally:
        trainer.close()


def _name(scheme: str, max_tokens: int, share: bool | None) -> str:
    """none@512, rpc@mbs, rpc@512+shared (share_prompt on), rpc@512-shared (off)."""
    return f"{scheme}@{max_tokens or 'mbs'}" + ("" if share is None else "+shared" if share else "-shared")


def main(argv=None) -> int:
    from nat_megatron.config import load_config
    from nat_megatron.parallel.launch import in_distributed_job, relaunch

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.run_dir is None:  # chosen once, before the ranks start
        args.run_dir = tempfile.mkdtemp(prefix="bench_train_phase.")
        argv = [*argv, "--run-dir", args.run_dir]
    run_dir = args.run_dir
    overrides = [
        "eval.at_start=false",
        "eval.at_end=false",
        "checkpoint.export_hf=false",
        f"checkpoint.dir={run_dir}/checkpoints",
        f"telemetry.tensorboard_dir={run_dir}/tb",
        *args.overrides,
    ]
    cfg = load_config(args.config, overrides)
    if not in_distributed_job() and cfg.parallel.world_size > 1:
        return relaunch(cfg.parallel.world_size, [str(Path(__file__).resolve()), *argv])
    if not in_distributed_job():
        from nat_megatron.parallel.launch import single_process_env

        single_process_env()
    out = bench(cfg, args)
    if out is not None:
        line = json.dumps(out)
        print(line, flush=True)
        if args.out:
            Path(args.out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
