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
        tmp_path / "kept",
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
        tmp_path / "frac",
        [
            {"reward/mean": 0.2, "tokens/generated": 100, "nat/kept_fraction": 0.5, "time/step": 2.0},
            {"reward/mean": 0.4, "tokens/generated": 200, "nat/kept_fraction": 0.25, "time/step": 3.0},
        ],
    )
    _write_run(tmp_path / "full", [{"reward/mean": 0.0, "tokens/generated": 10}] * 4)
    arms = [compare.Arm(n) for n in ("kept", "frac", "full", "missing")]
    code = compare.main(
        arms, description="t", default_out=str(tmp_path), argv=["--plot-only", "--out", str(tmp_path), "--last-k", "2"]
    )
    assert code == 0

    summary = json.loads((tmp_path / "summary.json").read_text())
    by = {a["name"]: a for a in summary["arms"]}
    assert list(by) == ["kept", "frac", "full"]  # the missing arm is skipped

    a = by["kept"]
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

    b = by["frac"]  # kept = generated * kept_fraction
    assert b["series"]["kept"] == pytest.approx([50, 50])
    assert b["series"]["cum_kept"] == pytest.approx([50, 100])
    assert b["total_generated_tokens"] == 300 and b["train_time_s"] == pytest.approx(5.0)

    c = by["full"]  # no selection scalars: every generated token is trained
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
        f"checkpoint.dir={tmp_path / 'urs' / 'checkpoints'}",
        "checkpoint.resume=never",
        f"telemetry.tensorboard_dir={tmp_path / 'urs' / 'tb'}",
    ]


@pytest.mark.parametrize("script", ["nat_vs_full", "otb_group_size"])
def test_example_arms_are_valid_configs(script, compare):
    from nat_megatron.config import load_config

    arms = runpy.run_path(str(EXAMPLES / script / "run.py"))["ARMS"]
    assert len(arms) == 3
    for arm in arms:
        load_config(compare.DEFAULT_CONFIG, ["train.prompts_per_step=2", *arm.overrides])
