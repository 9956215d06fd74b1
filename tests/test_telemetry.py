"""Telemetry: phase times and memory land in TensorBoard event files, rank 0 prints progress."""

import io
import time

import pytest

from nat_megatron.config import TelemetryConfig
from nat_megatron.telemetry import GpuMonitor, Telemetry, format_duration


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_phases_and_progress(tmp_path):
    out = io.StringIO()
    cfg = TelemetryConfig(tensorboard_dir=str(tmp_path / "tb"), log_every=1, nvml=True)
    with Telemetry(cfg, total_steps=3, rank=0, stream=out) as tel:
        for step in (1, 2, 3):
            with tel.phase("rollout"):
                time.sleep(0.01)
            with tel.phase("train"):
                pass
            with tel.phase("train"):  # a phase may run twice; its times add up
                pass
            got = tel.log_step(step, {"loss": 1.0 / step, "reward/mean": 0.5})
            assert got["time/rollout"] >= 0.01 and got["memory/rss_gb"] > 0
    scalars = _scalars(tmp_path / "tb")
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3]
    assert scalars["loss"][1][1] == pytest.approx(0.5)
    for tag in ("time/rollout", "time/train", "time/step", "memory/rss_gb", "reward/mean"):
        assert tag in scalars, tag
    assert not any(t.startswith("gpu/") for t in scalars)  # no GPU here: NVML skipped
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("step 1/3 (33%)")
    assert "loss 1" in lines[0] and "rollout 0.0s" in lines[0] and "ETA" in lines[-1]


def test_log_every_and_other_ranks(tmp_path):
    out = io.StringIO()
    cfg = TelemetryConfig(tensorboard_dir=str(tmp_path / "tb"), log_every=2, nvml=False)
    with Telemetry(cfg, total_steps=5, rank=0, stream=out) as tel:
        for step in range(1, 6):
            tel.log_step(step, {"loss": float(step)})
    assert [s for s, _ in _scalars(tmp_path / "tb")["loss"]] == [2, 4, 5]  # and the last step
    silent = io.StringIO()
    with Telemetry(TelemetryConfig(tensorboard_dir=str(tmp_path / "tb1")), total_steps=2, rank=1, stream=silent) as tel:
        tel.log_step(1, {"loss": 1.0})
        tel.info("hello")
    assert silent.getvalue() == "" and not (tmp_path / "tb1").exists()


def test_helpers():
    assert GpuMonitor().read() == {}  # CPU machine
    assert format_duration(4.25) == "4.2s" and format_duration(95) == "1m35s"
    assert format_duration(7384) == "2h03m"
