"""examples/compare.py: summary.json and the plot from synthetic TensorBoard runs (no training)."""

import importlib.util
import json
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare", EXAMPLES / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare"] = module  # the example scripts import it by this name
    spec.loader.exec_module(module)
    return module


def _write_run(arm_dir, rows, wall_s=12.5):
    """rows: per step {tag: value}; also an arm.json as run_arm writes it."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(arm_dir / "tb")) as w:
        for step, scalars in enumerate(rows, start=1):
            for tag, value in scalars.items():
                w.add_scalar(tag, value, step)
    (arm_dir / "arm.json").write_text(json.dumps({"overrides": ["x=1"], "returncode": 0, "wall_s": wall_s}))


def test_plot_only_summary(tmp_path, compare):
    # "kept": the trainer's tokens/kept; "frac": only nat/kept_fraction; "full": neither
    _write_run(
        tmp_path / "kept" / "seed0",
        [
            {
                "reward/mean": 0.1,
                "reward/accuracy": 0.0,
                "tokens/generated": 100,
                "tokens/kept": 40,
                "tokens/forward": 60,
            },
            {
                "reward/mean": 0.3,
                "reward/accuracy": 0.25,
                "tokens/generated": 120,
                "tokens/kept": 50,
                "tokens/forward": 70,
            },
            {
                "reward/mean": 0.5,
                "reward/accuracy": 0.5,
                "tokens/generated": 80,
                "tokens/kept": 30,
                "tokens/forward": 40,
            },
        ],
    )
    _write_run(
        tmp_path / "frac" / "seed0",
        [
            {"reward/mean": 0.2, "tokens/generated": 100, "nat/kept_fraction": 0.5, "time/step": 2.0},
            {"reward/mean": 0.4, "tokens/generated": 200, "nat/kept_fraction": 0.25, "time/step": 3.0},
        ],
    )
    _write_run(tmp_path / "full" / "seed0", [{"reward/mean": 0.0, "tokens/generated": 10}] * 4)
    arms = [compare.Arm(n) for n in ("kept", "frac", "full", "missing")]
    code = compare.main(
        arms, description="t", default_out=str(tmp_path), argv=["--plot-only", "--out", str(tmp_path), "--last-k", "2"]
    )
    assert code == 0

    summary = json.loads((tmp_path / "summary.json").read_text())
    by = {a["name"]: a for a in summary["arms"]}
    assert list(by) == ["kept", "frac", "full"]  # the missing arm is skipped

    a = by["kept"]["runs"][0]
    assert a["steps"] == 3 and a["series"]["step"] == [1, 2, 3]
    assert a["final_reward"] == pytest.approx(0.5)
    assert a["last_2_mean_reward"] == pytest.approx(0.4)
    assert a["first_2_mean_reward"] == pytest.approx(0.2)
    assert a["mean_accuracy"] == pytest.approx(0.25)
    assert a["series"]["cum_generated"] == [100, 220, 300]
    assert a["series"]["cum_kept"] == [40, 90, 120]
    assert a["total_generated_tokens"] == 300 and a["total_kept_tokens"] == 120
    assert a["total_forward_tokens"] == 170
    assert a["wall_s"] == 12.5 and a["returncode"] == 0

    b = by["frac"]["runs"][0]  # kept = generated * kept_fraction
    assert b["series"]["kept"] == pytest.approx([50, 50])
    assert b["series"]["cum_kept"] == pytest.approx([50, 100])
    assert b["total_generated_tokens"] == 300 and b["train_time_s"] == pytest.approx(5.0)

    c = by["full"]["runs"][0]  # no selection scalars: every generated token is trained
    assert c["series"]["cum_kept"] == [10, 20, 30, 40]

    png = tmp_path / "compare.png"
    assert png.is_file() and png.stat().st_size > 1000


def test_last_value_per_step_wins(tmp_path, compare):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tmp_path / "tb")) as w:  # a step logged twice (a resumed run)
        w.add_scalar("reward/mean", 0.1, 1)
        w.add_scalar("reward/mean", 0.7, 1)
    assert compare.read_scalars(tmp_path / "tb")["reward/mean"] == {1: pytest.approx(0.7)}


def test_arm_overrides_isolate_runs(tmp_path, compare):
    ov = compare.arm_overrides(
        compare.Arm("urs", ["nat.scheme=urs"]),
        tmp_path,
        steps=5,
        seed=3,
        extra=["train.steps=99", "rollout.group_size=2"],
    )
    assert ov[:5] == [
        "checkpoint.keep_last=1",
        "checkpoint.export_hf=false",
        "train.steps=99",
        "rollout.group_size=2",
        "nat.scheme=urs",
    ]
    assert ov[5:] == [
        "train.steps=5",
        "train.seed=3",
        f"checkpoint.dir={tmp_path / 'urs' / 'seed3' / 'checkpoints'}",
        "checkpoint.resume=never",
        f"telemetry.tensorboard_dir={tmp_path / 'urs' / 'seed3' / 'tb'}",
    ]


@pytest.mark.parametrize("script", ["nat_vs_full", "otb_group_size"])
def test_example_arms_are_valid_configs(script, compare):
    from nat_megatron.config import load_config

    arms = runpy.run_path(str(EXAMPLES / script / "run.py"))["ARMS"]
    assert len(arms) == 3
    for arm in arms:
        load_config(compare.DEFAULT_CONFIG, ["train.prompts_per_step=2", *arm.overrides])


def test_seeds_and_held_out_summary(tmp_path, compare):
    """Two seeds of one arm: held-out pass@1 at steps 0 and 2 (the trainer logs eval/* at those
    steps), the gain and train-phase seconds averaged over the seeds, errors combined."""
    from torch.utils.tensorboard import SummaryWriter

    for seed, (end, se, gain, gse) in enumerate([(0.30, 0.03, 0.05, 0.02), (0.40, 0.04, 0.09, 0.03)]):
        d = tmp_path / "rpc" / f"seed{seed}"
        with SummaryWriter(log_dir=str(d / "tb")) as w:
            w.add_scalar("eval/pass@1", 0.25, 0)
            w.add_scalar("eval/pass@1_se", 0.02, 0)
            for step in (1, 2):
                w.add_scalar("reward/mean", 0.1 * step, step)
                w.add_scalar("tokens/generated", 100, step)
                w.add_scalar("tokens/kept", 40 + seed, step)
                w.add_scalar("time/train", 3.0, step)
                w.add_scalar("time/step", 5.0, step)
            w.add_scalar("eval/pass@1", end, 2)
            w.add_scalar("eval/pass@1_se", se, 2)
            w.add_scalar("eval/pass@1_gain", gain, 2)
            w.add_scalar("eval/pass@1_gain_se", gse, 2)
        (d / "arm.json").write_text(json.dumps({"seed": seed, "returncode": 0, "wall_s": 10.0}))
    code = compare.main(
        [compare.Arm("rpc")], description="t", default_out=str(tmp_path), argv=["--plot-only", "--out", str(tmp_path)]
    )
    assert code == 0
    (arm,) = json.loads((tmp_path / "summary.json").read_text())["arms"]
    assert arm["seeds"] == [0, 1] and len(arm["runs"]) == 2
    assert arm["pass1_start"]["mean"] == pytest.approx(0.25)
    assert arm["pass1_end"]["mean"] == pytest.approx(0.35)
    assert arm["pass1_end"]["se"] == pytest.approx((0.03**2 + 0.04**2) ** 0.5 / 2)
    assert arm["pass1_end"]["seed_std"] == pytest.approx(0.1 / 2**0.5)
    assert arm["pass1_gain"]["mean"] == pytest.approx(0.07)
    assert arm["pass1_gain"]["se"] == pytest.approx((0.02**2 + 0.03**2) ** 0.5 / 2)
    assert arm["train_phase_s"]["mean"] == pytest.approx(6.0)
    assert arm["kept_tokens"]["mean"] == pytest.approx(81.0)
    curve = arm["held_out_curve"]
    assert curve["step"] == [0, 2] and curve["pass1"] == pytest.approx([0.25, 0.35])
    assert curve["cum_kept"] == pytest.approx([0.0, 81.0])
    assert (tmp_path / "compare.png").stat().st_size > 1000
