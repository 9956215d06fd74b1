"""
Run a few "arms" of the trainer one after another and compare them.

An arm is a name plus a list of `key.sub=value` overrides on top of one base config. Every arm
runs once per seed (`--seeds 0,1`), each run its own `python -m nat_megatron.train` subprocess
(which starts its own gloo ranks), with the same train.steps, a fresh output folder and
checkpoint.resume=never:

    <out>/<arm>/seed<k>/checkpoints/   the run's checkpoint.dir (keep_last=1: ~2.4 GB for SmolLM2)
    <out>/<arm>/seed<k>/tb/            the run's telemetry.tensorboard_dir
    <out>/<arm>/seed<k>/arm.json       overrides, command line, exit code, wall time
    <out>/<arm>/seed<k>/train.log      the trainer's stdout + stderr
    <out>/summary.json                 per arm: per-run totals and series, means over seeds
    <out>/compare.png                  held-out accuracy vs step and vs trained tokens, reward vs step

Held-out accuracy is the trainer's own evaluation (eval.* in the config: eval/pass@1 and its
standard error, and eval/pass@1_gain, paired by problem against the run's evaluation before the
first step). An arm's figure over seeds is the mean of its runs' figures, with standard error
sqrt(sum se_i^2) / n from the runs' own standard errors (the runs share the held-out problems,
so this is the error of the evaluation, not of the seed; `seed_std` gives the spread between
seeds). "Train-phase seconds" sum the trainer's time/train scalar (NAT selection, loss inputs,
forward/backward, optimizer) over the steps.

"Trained tokens" are the tokens that entered the policy gradient (NAT's kept tokens): the
trainer's `tokens/kept` scalar when the run has it, else tokens/generated * nat/kept_fraction,
else tokens/generated (no selection). `--plot-only` re-reads existing arm folders and rewrites
the summary and the plot without training. Used by examples/nat_vs_full and
examples/otb_group_size:

    arms = [Arm("full", ["nat.scheme=none", "nat.budget=1"]), Arm("rpc", ["nat.scheme=rpc"])]
    sys.exit(main(arms, description="...", default_out="runs/x"))
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root: the trainer runs from here
DEFAULT_CONFIG = ROOT / "examples" / "configs" / "smollm2-135m-cpu.yaml"


@dataclass
class Arm:
    name: str
    overrides: list[str] = field(default_factory=list)


# -----------------------------------------------------------------------------
# running the arms


def run_dir(out: Path, arm: Arm | str, seed: int) -> Path:
    return out / (arm if isinstance(arm, str) else arm.name) / f"seed{seed}"


def arm_overrides(arm: Arm, out: Path, steps: int, seed: int, extra: list[str] = ()) -> list[str]:
    """One run's full override list: keep one checkpoint (a SmolLM2 checkpoint with optimizer
    state is ~2.4 GB), shared extras, the arm's own, then the fixed run settings (later
    overrides win, so a run always writes into its own folder)."""
    d = run_dir(out, arm, seed)
    return [
        "checkpoint.keep_last=1",
        "checkpoint.export_hf=false",
        *extra,
        *arm.overrides,
        f"train.steps={steps}",
        f"train.seed={seed}",
        f"checkpoint.dir={d / 'checkpoints'}",
        "checkpoint.resume=never",
        f"telemetry.tensorboard_dir={d / 'tb'}",
    ]


def run_arm(arm: Arm, config: Path, out: Path, steps: int, seed: int, extra: list[str] = ()) -> dict:
    """Train one arm at one seed in a subprocess (its old folder is removed first); returns
    its arm.json."""
    d = run_dir(out, arm, seed)
    if d.exists():
        shutil.rmtree(d)  # stale event files or checkpoints would mix with the new run
    d.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "nat_megatron.train",
        "--config",
        str(config),
        *arm_overrides(arm, out, steps, seed, extra),
    ]
    print(f"[compare] arm {arm.name} seed {seed}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    with open(d / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # tee: the progress lines stay visible
            log.write(line)
            log.flush()
            if line.startswith(("step ", "eval ")) or "error" in line.lower():
                print(f"[{arm.name} s{seed}] {line}", end="", flush=True)
        code = proc.wait()
    meta = {
        "name": arm.name,
        "overrides": arm.overrides,
        "extra": list(extra),
        "command": cmd,
        "returncode": code,
        "wall_s": time.time() - t0,
        "steps": steps,
        "seed": seed,
    }
    (d / "arm.json").write_text(json.dumps(meta, indent=2))
    print(f"[compare] arm {arm.name} seed {seed}: exit {code} after {meta['wall_s']:.0f}s", flush=True)
    return meta


# -----------------------------------------------------------------------------
# reading TensorBoard and summarising


def read_scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from a TensorBoard folder; the last value written for a step wins."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={SCALARS: 0})  # 0 = keep every event
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        series = {}
        for e in sorted(acc.Scalars(tag), key=lambda e: e.wall_time):
            series[e.step] = e.value
        out[tag] = series
    return out


def per_step(scalars: dict[str, dict[int, float]]) -> dict[str, list]:
    """Per-step series (steps that logged reward/mean): reward, accuracy, generated, kept and
    forward tokens, step time, and the cumulative token counts."""
    get = lambda tag, s, default=None: scalars.get(tag, {}).get(s, default)
    steps = sorted(scalars.get("reward/mean", {}))
    rows = {k: [] for k in ("step", "reward", "accuracy", "generated", "kept", "forward", "step_time_s", "train_s")}
    for s in steps:
        gen = get("tokens/generated", s, 0.0)
        kept = get("tokens/kept", s)
        if kept is None:  # runs from before the trainer logged tokens/kept
            frac = get("nat/kept_fraction", s)
            kept = gen * frac if frac is not None else gen
        rows["step"].append(s)
        rows["reward"].append(get("reward/mean", s))
        rows["accuracy"].append(get("reward/accuracy", s))
        rows["generated"].append(gen)
        rows["kept"].append(kept)
        rows["forward"].append(get("tokens/forward", s))
        rows["step_time_s"].append(get("time/step", s))
        rows["train_s"].append(get("time/train", s))
    rows["cum_generated"] = _cumsum(rows["generated"])
    rows["cum_kept"] = _cumsum(rows["kept"])
    return rows


def held_out(scalars: dict[str, dict[int, float]], cum_kept: dict[int, float]) -> dict[str, list]:
    """The held-out evaluations (eval/pass@1 and its SE; the paired gain since step 0 where
    logged) with the trained tokens up to each one."""
    steps = sorted(scalars.get("eval/pass@1", {}))
    get = lambda tag, s: scalars.get(tag, {}).get(s)
    return {
        "step": steps,
        "pass1": [get("eval/pass@1", s) for s in steps],
        "pass1_se": [get("eval/pass@1_se", s) for s in steps],
        "gain": [get("eval/pass@1_gain", s) for s in steps],
        "gain_se": [get("eval/pass@1_gain_se", s) for s in steps],
        "cum_kept": [cum_kept.get(s, 0.0) for s in steps],
    }


def _cumsum(xs):
    out, total = [], 0.0
    for x in xs:
        total += x or 0.0
        out.append(total)
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarise_run(d: Path, k: int = 3) -> dict:
    """One run's summary: totals, first-k / last-k mean reward, held-out evaluations, wall and
    train-phase time, per-step series."""
    meta_path = d / "arm.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    scalars = read_scalars(d / "tb") if (d / "tb").is_dir() else {}
    series = per_step(scalars)
    times = [t for t in series["step_time_s"] if t is not None]
    n = len(series["step"])
    ev = held_out(scalars, dict(zip(series["step"], series["cum_kept"])))
    return {
        "seed": meta.get("seed"),
        "overrides": meta.get("overrides"),
        "returncode": meta.get("returncode"),
        "steps": n,
        "final_reward": series["reward"][-1] if n else None,
        f"last_{k}_mean_reward": _mean(series["reward"][-k:]),
        f"first_{k}_mean_reward": _mean(series["reward"][:k]),
        "mean_accuracy": _mean(series["accuracy"]),
        "total_generated_tokens": series["cum_generated"][-1] if n else 0.0,
        "total_kept_tokens": series["cum_kept"][-1] if n else 0.0,
        "total_forward_tokens": sum(x for x in series["forward"] if x is not None) if n else 0.0,
        "wall_s": meta.get("wall_s"),  # the whole subprocess: startup, weight load, evaluations, checkpoints
        "train_time_s": sum(times),  # sum of time/step
        "train_phase_s": sum(t for t in series["train_s"] if t is not None),  # sum of time/train
        "held_out": ev,
        "series": series,
    }


def _over_seeds(values: list, ses: list | None = None) -> dict:
    """Mean over runs; "se" from the runs' own standard errors (sqrt(sum se^2) / n) when given,
    and the spread between runs."""
    pairs = [(v, None if ses is None else s) for v, s in zip(values, ses or values) if v is not None]
    if not pairs:
        return {"mean": None, "se": None, "seed_std": None, "runs": 0}
    n = len(pairs)
    mean = sum(v for v, _ in pairs) / n
    std = (sum((v - mean) ** 2 for v, _ in pairs) / (n - 1)) ** 0.5 if n > 1 else None
    se = None
    if ses is not None and all(s is not None for _, s in pairs):
        se = sum(s**2 for _, s in pairs) ** 0.5 / n
    return {"mean": mean, "se": se, "seed_std": std, "runs": n}


def summarise_arm(arm_dir: Path, k: int = 3) -> dict:
    """An arm's runs (one per seed folder) and their means: held-out pass@1 before and after,
    its paired gain, trained tokens and train-phase seconds."""
    runs = [summarise_run(d, k) for d in sorted(arm_dir.glob("seed*")) if d.is_dir()]
    last = [r["held_out"] for r in runs if r["held_out"]["step"]]
    first = [(h["pass1"][0], h["pass1_se"][0]) for h in last if h["step"][0] == 0]
    # the held-out curve: mean over the runs at every evaluation step they all have
    common = sorted(set.intersection(*(set(h["step"]) for h in last))) if last else []
    curve = {"step": common, "pass1": [], "pass1_se": [], "cum_kept": []}
    for s in common:
        at = [h["step"].index(s) for h in last]
        m = _over_seeds([h["pass1"][i] for h, i in zip(last, at)], [h["pass1_se"][i] for h, i in zip(last, at)])
        curve["pass1"].append(m["mean"])
        curve["pass1_se"].append(m["se"])
        curve["cum_kept"].append(_mean([h["cum_kept"][i] for h, i in zip(last, at)]))
    return {
        "name": arm_dir.name,
        "runs": runs,
        "seeds": [r["seed"] for r in runs],
        "pass1_start": _over_seeds([f[0] for f in first], [f[1] for f in first]),
        "pass1_end": _over_seeds([h["pass1"][-1] for h in last], [h["pass1_se"][-1] for h in last]),
        "pass1_gain": _over_seeds([h["gain"][-1] for h in last], [h["gain_se"][-1] for h in last]),
        "kept_tokens": _over_seeds([r["total_kept_tokens"] for r in runs]),
        "forward_tokens": _over_seeds([r["total_forward_tokens"] for r in runs]),
        "generated_tokens": _over_seeds([r["total_generated_tokens"] for r in runs]),
        "train_phase_s": _over_seeds([r["train_phase_s"] for r in runs]),
        "step_time_s": _over_seeds([r["train_time_s"] / r["steps"] if r["steps"] else None for r in runs]),
        f"last_{k}_mean_reward": _over_seeds([r[f"last_{k}_mean_reward"] for r in runs]),
        "held_out_curve": curve,
    }


def summarise(out: Path, names: list[str], k: int = 3) -> dict:
    """summary.json for the arms under `out` that exist; returns it."""
    arms = [summarise_arm(out / n, k) for n in names if (out / n).is_dir()]
    summary = {"out": str(out), "last_k": k, "arms": arms}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def plot(summary: dict, path: Path) -> Path:
    """Held-out pass@1 vs step and vs cumulative trained (kept) tokens (mean over seeds, +- SE),
    and the training reward vs step (mean over seeds), one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    for arm in summary["arms"]:
        c = arm["held_out_curve"]
        if c["step"]:
            se = [e or 0.0 for e in c["pass1_se"]]
            ax1.errorbar(c["step"], c["pass1"], yerr=se, marker="o", ms=3, capsize=3, label=arm["name"])
            ax2.errorbar(c["cum_kept"], c["pass1"], yerr=se, marker="o", ms=3, capsize=3, label=arm["name"])
        runs = [r["series"] for r in arm["runs"] if r["series"]["step"]]
        if runs:
            n = min(len(s["step"]) for s in runs)
            reward = [_mean([s["reward"][i] for s in runs]) for i in range(n)]
            ax3.plot(runs[0]["step"][:n], reward, marker="o", ms=2, label=arm["name"])
    ax1.set(xlabel="step", ylabel="held-out pass@1", title="held-out accuracy vs step")
    ax2.set(xlabel="cumulative trained tokens (kept by NAT)", ylabel="held-out pass@1", title="vs tokens trained")
    ax3.set(xlabel="step", ylabel="reward/mean", title="training reward (mean over seeds)")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(summary: dict) -> None:
    def f(d, fmt="7.4f"):
        if d["mean"] is None:
            return "-"
        return format(d["mean"], fmt) + (f" +- {d['se']:.4f}" if d.get("se") is not None else "")

    print(
        f"{'arm':<10} {'runs':>4} {'pass@1 start':>18} {'pass@1 end':>18} {'gain':>18} {'kept tok':>9} {'train s':>8}"
    )
    for a in summary["arms"]:
        print(
            f"{a['name']:<10} {len(a['runs']):>4} {f(a['pass1_start']):>18} {f(a['pass1_end']):>18} "
            f"{f(a['pass1_gain'], '+7.4f'):>18} {f(a['kept_tokens'], '9.0f'):>9} {f(a['train_phase_s'], '8.1f'):>8}"
        )


# -----------------------------------------------------------------------------
# command line shared by the example scripts


def main(
    arms: list[Arm],
    *,
    description: str,
    default_out: str,
    default_steps: int = 10,
    default_seeds: str = "0",
    base_overrides: list[str] = (),
    argv: list[str] | None = None,
) -> int:
    """Parse --steps/--out/--config/--seeds/--last-k/--arms/--plot-only and extra overrides,
    run every arm at every seed (unless --plot-only), then write summary.json and compare.png.
    Returns an exit code: 0, or 1 when a run failed (the others still run)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=default_steps, help="train.steps of every arm")
    p.add_argument("--out", default=default_out, help="output folder (one subfolder per arm)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="base config")
    p.add_argument(
        "--seeds", default=default_seeds, help="comma list of train.seed values: every arm runs once per seed"
    )
    p.add_argument("--last-k", type=int, default=3, help="steps averaged for first/last-k reward")
    p.add_argument("--arms", default=None, help="comma-separated subset of arms to run")
    p.add_argument("--plot-only", action="store_true", help="re-read existing runs; no training")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="extra overrides for every arm")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not out.is_absolute():
        out = Path.cwd() / out
    selected = arms if args.arms is None else [a for a in arms if a.name in args.arms.split(",")]
    failed = []
    if args.plot_only and not out.is_dir():
        print(f"[compare] --plot-only: {out} does not exist; run without --plot-only first", file=sys.stderr)
        return 2
    if not args.plot_only:
        out.mkdir(parents=True, exist_ok=True)
        extra = [*base_overrides, *args.overrides]
        seeds = [int(x) for x in args.seeds.split(",")]
        for seed in seeds:  # seed-major: a partial run still has every arm at the first seed
            for arm in selected:
                if run_arm(arm, Path(args.config).resolve(), out, args.steps, seed, extra)["returncode"]:
                    failed.append(f"{arm.name}/seed{seed}")
    summary = summarise(out, [a.name for a in arms], args.last_k)
    png = plot(summary, out / "compare.png")
    print_table(summary)
    print(f"[compare] wrote {out / 'summary.json'} and {png}")
    if failed:
        print(f"[compare] failed runs (see <out>/<arm>/seed<k>/train.log): {failed}", file=sys.stderr)
    return 1 if failed else 0
