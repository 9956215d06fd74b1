"""The launch scripts without a cluster: shellcheck, the job files' configs and node counts,
and launch/local.sh starting real local ranks."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from nat_megatron.parallel.launch import ROOT

from .apt import require

SCRIPTS = [ROOT / "launch/local.sh", *sorted((ROOT / "launch/slurm").glob("*.sbatch"))]
JOBS = ["qwen3-8b", "llama3.1-8b", "qwen2.5-32b", "llama3.1-70b"]


def test_shellcheck_clean():
    require(["shellcheck"], ["shellcheck"])
    r = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", JOBS)
def test_job_file_matches_its_config(name):
    """Each ready-made job asks for the nodes its config's world size needs and calls train.sbatch."""
    job = (ROOT / f"launch/slurm/{name}.sbatch").read_text()
    config = f"examples/configs/{name}.yaml"
    assert config in job and "launch/slurm/train.sbatch" in job
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", job, re.M).group(1))
    gpus = int(re.search(r"^#SBATCH --gpus-per-node=(\d+)$", job, re.M).group(1))
    path = ROOT / config
    if not path.exists():
        pytest.skip(f"{config} not written yet")
    parallel = yaml.safe_load(path.read_text())["parallel"]
    assert nodes * gpus == parallel["world_size"]
    assert gpus == parallel.get("gpus_per_node", gpus)


WORKER = """import os, pathlib, sys
import torch.distributed as dist
dist.init_process_group("gloo")
t = __import__("torch").tensor([dist.get_rank() + 1])
dist.all_reduce(t)
pathlib.Path(sys.argv[1], f"rank{dist.get_rank()}").write_text(f"{os.environ['WORLD_SIZE']} {int(t)}")
dist.destroy_process_group()
"""


def test_local_sh_starts_ranks(tmp_path):
    """launch/local.sh runs a script as NPROC_PER_NODE gloo ranks and keeps the logs per run."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, NPROC_PER_NODE="2", NAT_PYTHON=sys.executable, RUN_DIR=str(tmp_path / "run"))
    r = subprocess.run(
        [str(ROOT / "launch/local.sh"), str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert [(tmp_path / f"rank{i}").read_text() for i in range(2)] == ["2 3", "2 3"]
    assert (tmp_path / "run/exit_code").read_text().strip() == "0"
    assert (tmp_path / "run/launch.log").exists() and (tmp_path / "run/command.txt").exists()
