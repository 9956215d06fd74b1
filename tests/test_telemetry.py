"""Telemetry: phase times and memory land in TensorBoard event files, rank 0 prints progress."""

import io
import json
import sys
import time
from pathlib import Path

import pytest

from nat_megatron.config import TelemetryConfig, WandbConfig
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


def wandb_history(run_file: Path) -> dict[int, dict[str, float]]:
    """step -> scalars, read back from a W&B offline run file: a 7-byte header (":W&B", magic,
    version), then a LevelDB-style log (32 KiB blocks; records of a 7-byte header - crc32,
    uint16 length, type 1 full / 2 first / 3 middle / 4 last - and their bytes) of wandb's
    protobuf `Record`s; the history records hold what run.log() wrote."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    history, pos, block, record = {}, 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        record += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or its last piece
            parsed = pb.Record()
            parsed.ParseFromString(record)
            record = b""
            if parsed.WhichOneof("record_type") == "history":
                items = parsed.history.item
                row = {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in items}
                history[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
    return history


def test_wandb_offline_run_has_every_tensorboard_scalar(tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (requirements.txt)")
    out = io.StringIO()
    cfg = TelemetryConfig(tensorboard_dir=str(tmp_path / "tb"), nvml=False, wandb=WandbConfig(enabled=True))
    with Telemetry(cfg, total_steps=2, rank=0, stream=out) as tel:
        tel.log_step(1, {"loss": 0.5, "diverged": float("nan")})
        tel.log_step(2, {"loss": 0.25, "reward/mean": 0.125})
        tel.log_scalars(2, {"eval/pass@1": 0.75}, "eval after step 2")
    runs = list((tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb"))  # the default dir
    assert len(runs) == 1, list((tmp_path / "wandb").rglob("*"))
    assert f"telemetry: W&B run (offline) in {runs[0].parent}" in out.getvalue()
    history, tensorboard = wandb_history(runs[0]), _scalars(tmp_path / "tb")
    assert sorted(history) == [1, 2] and "diverged" not in history[1]  # not finite: neither logger
    assert {tag for row in history.values() for tag in row} == set(tensorboard)
    for tag, points in tensorboard.items():
        for step, value in points:  # TensorBoard keeps float32
            assert history[step][tag] == pytest.approx(value, rel=1e-6), (tag, step)
    assert history[2]["eval/pass@1"] == 0.75 and history[2]["loss"] == 0.25


def test_wandb_only_on_rank_0_and_a_missing_package_names_the_key(tmp_path, monkeypatch):
    cfg = TelemetryConfig(tensorboard_dir=None, nvml=False, wandb=WandbConfig(enabled=True, dir=str(tmp_path)))
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with Telemetry(cfg, total_steps=1, rank=1, stream=io.StringIO()) as tel:
        tel.log_step(1, {"loss": 1.0})
    assert not any(tmp_path.iterdir())
    with pytest.raises(ImportError, match="telemetry.wandb.enabled=true needs the wandb package"):
        Telemetry(cfg, total_steps=1, rank=0, stream=io.StringIO())
