"""Checkpoint integrity without compute: manifest, `latest` pointer, pruning order, config and
dataset checks on resume, and the checkpoint.dir lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from nat_megatron.checkpoint.dist_ckpt import latest_checkpoint, mark_latest
from nat_megatron.checkpoint.integrity import (
    checkpoint_files,
    hash_share,
    pointer_problem,
    verify_share,
    write_manifest,
)
from nat_megatron.checkpoint.lock import LOCK, DirLock
from nat_megatron.checkpoint.resume import check_run, config_changes
from nat_megatron.config import load_config
from tests.test_config import CPU


def fake_checkpoint(root, step: int, *, payload: bytes = b"x" * 5000):
    """A directory shaped like a finished torch_dist save (metadata.json last) plus a manifest."""
    d = root / f"step_{step:06d}"
    d.mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(payload + bytes([step % 256]))
    (d / ".metadata").write_bytes(b"meta" * 10)
    (d / "metadata.json").write_text("{}")
    write_manifest(d, hash_share(d, checkpoint_files(d)))
    return d


def test_manifest_names_corrupted_truncated_and_missing_files(tmp_path):
    d = fake_checkpoint(tmp_path, 1)
    assert sorted(json.loads((d / "manifest.json").read_text())["files"]) == [
        ".metadata",
        "__0_0.distcp",
        "metadata.json",
    ]
    assert verify_share(d) == []
    # shares of two "ranks" cover every file once
    assert sorted(verify_share(d, rank=0, world=2) + verify_share(d, rank=1, world=2)) == []
    data = bytearray((d / "__0_0.distcp").read_bytes())
    data[100] ^= 0x01  # one flipped bit, same size
    (d / "__0_0.distcp").write_bytes(bytes(data))
    assert verify_share(d) == [f"{d / '__0_0.distcp'} does not match its hash in the manifest (corrupted)"]
    (d / ".metadata").write_bytes(b"meta")
    assert any(".metadata has 4 bytes, the manifest says 40" in p for p in verify_share(d))
    (d / ".metadata").unlink()
    assert any(".metadata is missing" in p for p in verify_share(d))
    (d / "manifest.json").unlink()
    assert "has no manifest.json" in verify_share(d)[0]


@pytest.mark.parametrize("pointer", ["", "step_000009", "step_000003"])
def test_bad_latest_pointer_is_named_and_the_newest_complete_checkpoint_wins(tmp_path, pointer):
    fake_checkpoint(tmp_path, 1)
    fake_checkpoint(tmp_path, 2)
    (tmp_path / "step_000003").mkdir()  # an unfinished save: no metadata.json
    (tmp_path / "latest").write_text(pointer)
    problem = pointer_problem(tmp_path)
    assert problem and str(tmp_path / "latest") in problem
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000002"


def test_prune_orders_by_step_and_keeps_the_resumed_and_the_new_checkpoint(tmp_path):
    dirs = {s: fake_checkpoint(tmp_path, s) for s in (9, 10, 100, 200)}
    # mtimes in the opposite order of steps: an mtime sort would keep the wrong ones
    for i, s in enumerate(sorted(dirs, reverse=True)):
        os.utime(dirs[s], (1_000_000 + i, 1_000_000 + i))
    mark_latest(tmp_path, "step_000200", keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000100", "step_000200"]
    assert (tmp_path / "latest").read_text() == "step_000200"

    # keep_last=1 after a run resumed from step 100 saved step 1: the highest step stays, and
    # so do the one resumed from and the one just saved
    fresh = fake_checkpoint(tmp_path, 1)
    mark_latest(tmp_path, fresh.name, keep_last=1, protect=(tmp_path / "step_000100",))
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000001", "step_000100", "step_000200"]
    mark_latest(tmp_path, fresh.name, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000001", "step_000200"]


def test_resume_with_a_changed_meaning_names_the_keys(tmp_path):
    saved = load_config(CPU).to_dict()
    meta = {"config": json.loads(json.dumps(saved)), "data_fingerprint": "abc"}
    same = load_config(CPU, ["train.steps=500", "checkpoint.every=7", "telemetry.log_every=3"]).to_dict()
    check_run(tmp_path, meta, config=same, fingerprint="abc")  # run length, cadence: not meaning

    changed = load_config(CPU, ["nat.budget=0.25", "rollout.group_size=6"]).to_dict()
    assert config_changes(saved, changed) == ["nat.budget", "rollout.group_size"]
    with pytest.raises(
        ValueError,
        match=r"^checkpoint.allow_config_change: .*nat.budget: 0.5 -> 0.25, "
        r"rollout.group_size: 4 -> 6",
    ):
        check_run(tmp_path, meta, config=changed, fingerprint="abc")
    allowed = load_config(CPU, ["nat.budget=0.25", "checkpoint.allow_config_change=true"]).to_dict()
    check_run(tmp_path, meta, config=allowed, fingerprint="abc")

    with pytest.raises(ValueError, match=r"^data.allow_changed: the dataset differs .*abc then, def now"):
        check_run(tmp_path, meta, config=same, fingerprint="def")
    data_ok = load_config(CPU, ["data.allow_changed=true", "data.limit=5"]).to_dict()
    check_run(tmp_path, meta, config=data_ok, fingerprint="def")
    with pytest.raises(ValueError, match="has no run.json"):
        check_run(tmp_path, None, config=same, fingerprint="abc")


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_keeps_a_second_job_off_and_takes_over_a_dead_holder(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    first = DirLock(tmp_path).acquire()
    with pytest.raises(
        ValueError,
        match=rf"^checkpoint.dir: {tmp_path} is in use by pid {os.getpid()} "
        rf"on host {socket.gethostname()}",
    ):
        DirLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK).exists()

    (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "slurm_job": None}))
    taken = DirLock(tmp_path).acquire()
    assert taken.taken_over and json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    taken.release()

    (tmp_path / LOCK).write_text(json.dumps({"host": "other-node", "pid": dead_pid(), "slurm_job": "17"}))
    with pytest.raises(ValueError, match="in use by pid .* on host other-node, SLURM job 17"):
        DirLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "17")  # the same job, requeued onto another node
    DirLock(tmp_path).acquire().release()


@pytest.mark.dist
def test_a_second_job_on_a_locked_dir_stops_on_every_rank(tmp_path):
    from tests.launcher import launch

    # the holder: this test process, alive, on this host
    (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": None}))
    errors = launch("tests.checkpoint.workers:take_lock", 2, timeout=120, directory=str(tmp_path))
    assert errors[0] == errors[1] and errors[0].startswith(f"checkpoint.dir: {tmp_path} is in use by pid {os.getpid()}")


def test_lock_is_released_when_the_job_ends_in_an_error(tmp_path):
    code = (
        "from nat_megatron.checkpoint.lock import DirLock; import sys; "
        f"DirLock({str(tmp_path)!r}).acquire(); raise SystemExit('resume failed')"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "resume failed" in p.stderr
    assert not (tmp_path / LOCK).exists()
