"""
Run a few "arms" of the trainer one after another and compare them.

An arm is a name plus a list of `key.sub=value` overrides on top of one base config. Every arm
runs as its own `python -m nat_megatron.train` subprocess (which starts its own gloo ranks),
with the same train.seed and train.steps, a fresh output folder and checkpoint.resume=never:

    <out>/<arm>/checkpoints/   the arm's checkpoint.dir (keep_last=1: ~2.4 GB for SmolLM2)
    <out>/<arm>/tb/            the arm's telemetry.tensorboard_dir
    <out>/<arm>/arm.json       overrides, command line, exit code, wall time
    <out>/<arm>/train.log      the trainer's stdout + stderr
    <out>/summary.json         per arm: totals, first/last-k reward, per-step series
    <out>/compare.png          reward vs step, and reward vs cumulative trained tokens

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


def arm_overrides(arm: Arm, out: Path, steps: int, seed: int, extra: list[str] = ()) -> list[str]:
    """The arm's full override list: keep one checkpoint (a SmolLM2 checkpoint with optimizer
    state is ~2.4 GB), shared extras, the arm's own, then the fixed run settings (later
    overrides win, so an arm always writes into its own folder)."""
    d = out / arm.name
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
    """Train one arm in a subprocess (its old folder is removed first); returns its arm.json."""
    d = out / arm.name
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
    print(f"[compare] arm {arm.name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    with open(d / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # tee: the progress lines stay visible
            log.write(line)
            log.flush()
            if line.startswith("step ") or "error" in line.lower():
                print(f"[{arm.name}] {line}", end="", flush=True)
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
    print(f"[compare] arm {arm.name}: exit {code} after {meta['wall_s']:.0f}s", flush=True)
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
    rows = {k: [] for k in ("step", "reward", "accuracy", "generated", "kept", "forward", "step_time_s")}
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
    rows["cum_generated"] = _cumsum(rows["generated"])
    rows["cum_kept"] = _cumsum(rows["kept"])
    return rows


def _cumsum(xs):
    out, total = [], 0.0
    for x in xs:
        total += x or 0.0
        out.append(total)
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarise_arm(arm_dir: Path, k: int = 3) -> dict:
    """One arm's summary: totals, first-k / last-k mean reward, wall time, per-step series."""
    meta_path = arm_dir / "arm.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    tb = arm_dir / "tb"
    series = per_step(read_scalars(tb)) if tb.is_dir() else per_step({})
    times = [t for t in series["step_time_s"] if t is not None]
    n = len(series["step"])
    return {
        "name": arm_dir.name,
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
        "wall_s": meta.get("wall_s"),  # the whole subprocess: startup, weight load, checkpoints
        "train_time_s": sum(times),  # sum of time/step
        "series": series,
    }


def summarise(out: Path, names: list[str], k: int = 3) -> dict:
    """summary.json for the arms under `out` that exist; returns it."""
    arms = [summarise_arm(out / n, k) for n in names if (out / n).is_dir()]
    summary = {"out": str(out), "last_k": k, "arms": arms}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def plot(summary: dict, path: Path) -> Path:
    """Reward vs step and reward vs cumulative trained (kept) tokens, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for arm in summary["arms"]:
        s = arm["series"]
        if not s["step"]:
            continue
        ax1.plot(s["step"], s["reward"], marker="o", ms=3, label=arm["name"])
        ax2.plot(s["cum_kept"], s["reward"], marker="o", ms=3, label=arm["name"])
    ax1.set(xlabel="step", ylabel="reward/mean", title="reward vs step")
    ax2.set(xlabel="cumulative trained tokens (kept by NAT)", ylabel="reward/mean", title="reward vs tokens used")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(summary: dict) -> None:
    k = summary["last_k"]
    print(f"{'arm':<12} {'steps':>5} {'first-k R':>9} {'last-k R':>9} {'gen tok':>9} {'kept tok':>9} {'wall s':>7}")
    for a in summary["arms"]:
        f = lambda v, fmt: format(v, fmt) if v is not None else "-"
        print(
            f"{a['name']:<12} {a['steps']:>5} {f(a[f'first_{k}_mean_reward'], '9.3f')} "
            f"{f(a[f'last_{k}_mean_reward'], '9.3f')} {a['total_generated_tokens']:>9.0f} "
            f"{a['total_kept_tokens']:>9.0f} {f(a['wall_s'], '7.0f')}"
        )


# -----------------------------------------------------------------------------
# command line shared by the example scripts


def main(
    arms: list[Arm],
    *,
    description: str,
    default_out: str,
    default_steps: int = 10,
    base_overrides: list[str] = (),
    argv: list[str] | None = None,
) -> int:
    """Parse --steps/--out/--config/--seed/--last-k/--plot-only and extra overrides, run the
    arms (unless --plot-only), then write summary.json and compare.png. Returns an exit code:
    0, or 1 when an arm failed (the others still run)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=default_steps, help="train.steps of every arm")
    p.add_argument("--out", default=default_out, help="output folder (one subfolder per arm)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="base config")
    p.add_argument("--seed", type=int, default=0, help="train.seed of every arm")
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
        for arm in selected:
            if run_arm(arm, Path(args.config).resolve(), out, args.steps, args.seed, extra)["returncode"]:
                failed.append(arm.name)
    summary = summarise(out, [a.name for a in arms], args.last_k)
    png = plot(summary, out / "compare.png")
    print_table(summary)
    print(f"[compare] wrote {out / 'summary.json'} and {png}")
    if failed:
        print(f"[compare] failed arms (see <out>/<arm>/train.log): {failed}", file=sys.stderr)
    return 1 if failed else 0
