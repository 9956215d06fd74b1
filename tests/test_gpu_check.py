"""tools/gpu_check.py on a machine without a GPU: --list names every check, and the runner
isolates checks (each reports its own error in the one JSON line)."""

import json
import subprocess
import sys

from nat_megatron.parallel.launch import ROOT

TOOL = [sys.executable, str(ROOT / "tools" / "gpu_check.py")]
NAMES = ["parity_bf16", "fp8", "bench_nat", "vllm_engine", "trainer_two_steps"]


def test_list_names_every_check():
    out = subprocess.run([*TOOL, "--list"], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines] == NAMES
    assert all("(limit" in line and len(line.split()) > 4 for line in lines)


def test_checks_are_isolated_and_report_in_one_json_line():
    done = subprocess.run([*TOOL, "--only", "fp8", "--only", "trainer_two_steps"], capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    res = json.loads(lines[0])
    assert res["tool"] == "gpu_check" and list(res["checks"]) == ["fp8", "trainer_two_steps"]
    if res["device"] is None:  # this machine: both fail alone, with their reason, and rc 1
        assert done.returncode == 1
        for c in res["checks"].values():
            assert c["ok"] is False and "needs a CUDA GPU" in c["error"] and c["seconds"] >= 0


def test_unknown_check_is_a_usage_error():
    done = subprocess.run([*TOOL, "--only", "nope"], capture_output=True, text=True)
    assert done.returncode == 2 and "--only: unknown check(s) ['nope']" in done.stderr
