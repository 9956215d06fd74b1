"""`python -m nat_megatron.train --dry-run`: every preset passes, bad layouts exit 2 naming the key."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nat_megatron.cli import main

ROOT = Path(__file__).parents[1]
PRESETS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
CPU = ROOT / "examples" / "configs" / "smollm2-135m-cpu.yaml"
# Subprocess runs: the preset dry runs, plus one invalid layout (SmolLM2 has 3 KV heads).
RUNS = {p.stem: [str(p)] for p in PRESETS}
RUNS["bad-tp"] = [str(CPU), "parallel.tp=2", "parallel.pp=1"]


GSM8K_ROWS = [{"question": f"Tom has {n} apples. How many?", "answer": f"He has {n}.\n#### {n}"} for n in range(5)]


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """Start every dry run at once (each pays Python + torch start-up), then collect them.
    They run where the presets' data.path (data/gsm8k_train.jsonl) exists, as on a cluster."""
    import json

    cwd = tmp_path_factory.mktemp("job")
    (cwd / "data").mkdir()
    (cwd / "data" / "gsm8k_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "nat_megatron.train", "--config", args[0], "--dry-run", *args[1:]],
            cwd=cwd,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, args in RUNS.items()
    }
    return {name: (p.wait(timeout=300), *p.communicate()) for name, p in procs.items()}


@pytest.mark.parametrize("name", [p.stem for p in PRESETS])
def test_preset_dry_run(dry_runs, name):
    rc, out, err = dry_runs[name]
    assert rc == 0, err
    assert "dry run OK" in out and "# layout: tp=" in out and "nat:" in out


def test_invalid_layout_exits_2_naming_the_key(dry_runs):
    rc, out, err = dry_runs["bad-tp"]
    assert rc == 2
    assert "parallel.tp: tp=2 does not divide" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["parallel.world_size=3", "parallel.pp=2"], "parallel.dp: 'auto' needs tp*pp*cp = 2 to divide"),
        (["parallel.pp=4"], "parallel"),  # 4 stages with world size 2
        (["parallel.pp=1", "parallel.dp=1"], "parallel.dp: layout tp*pp*cp*dp"),
        (["rollout.max_new_tokens=9000"], "rollout.max_new_tokens"),
        (["parallel.pp=2", "parallel.vpp=4"], "parallel.vpp: pp=2 x vpp=4 = 8 pipeline chunks do not divide"),
        (["nat.budget=2"], "nat.budget: must be in (0, 1]"),
    ],
)
def test_invalid_in_process(overrides, key, capsys):
    assert main(["--config", str(CPU), "--dry-run", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("invalid config: ") and key in err


@pytest.fixture
def in_job_dir(tmp_path, monkeypatch):
    """Run where the GPU presets' data.path (data/gsm8k_train.jsonl) exists, as on a cluster:
    the dry run checks that its first rows parse."""
    import json

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "gsm8k_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    monkeypatch.chdir(tmp_path)


def test_dry_run_accepts_what_runs(capsys, in_job_dir):
    """Only what cannot run is rejected: lengths are padded to the layout's multiple, and one
    sequence per step under vpp runs (the interleaved schedule's groups of pp are padded)."""
    cfg = ROOT / "examples" / "configs" / "qwen3-8b.yaml"
    assert main(["--config", str(cfg), "--dry-run", "parallel.cp=2", "rollout.max_new_tokens=3071"]) == 0
    assert "lengths pad to a multiple of" in capsys.readouterr().out
    assert (
        main(
            [
                "--config",
                str(CPU),
                "--dry-run",
                "parallel.pp=2",
                "parallel.vpp=3",
                "parallel.max_tokens_per_micro_batch=null",
                "parallel.micro_batch_size=1",
                "train.prompts_per_step=1",
                "rollout.group_size=3",
            ]
        )
        == 0
    )
    assert "up to 4 micro-batches of 1 per DP rank" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["qwen3-8b", "llama3.1-8b", "qwen2.5-32b", "llama3.1-70b"])
def test_gpu_presets_print_the_engine_layout_and_fit(name, capsys, in_job_dir):
    assert main(["--config", str(ROOT / "examples" / "configs" / f"{name}.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# rollout: " in out and " vLLM engine" in out and "rollout memory per GPU while generating" in out
    assert "# fits: True" in out, out[-2000:]


def test_rollout_tp_must_fit_the_model_and_the_world(capsys, in_job_dir):
    assert main(["--config", str(CPU), "--dry-run", "rollout.tp=2"]) == 2  # SmolLM2: 9 heads
    assert "rollout.tp: 2 must divide num_attention_heads=9" in capsys.readouterr().err
    assert main(["--config", str(CPU), "--dry-run", "rollout.tp=4"]) == 2  # world 2
    assert "rollout.tp: must divide parallel.world_size=2" in capsys.readouterr().err
    qwen = ROOT / "examples" / "configs" / "qwen3-8b.yaml"
    assert main(["--config", str(qwen), "--dry-run", "rollout.gpu_memory_utilization=0.9"]) == 0
    assert "# fits: False (while generating" in capsys.readouterr().out


def test_dry_run_reads_hf_dir_config_json(tmp_path, capsys):
    import json

    from tests.conftest import TINY

    (tmp_path / "config.json").write_text(json.dumps(dict(TINY, model_type="qwen2")))
    args = [
        "--config",
        str(CPU),
        "--dry-run",
        "model.preset=null",
        f"model.hf_dir={tmp_path}",
        "data.max_prompt_tokens=128",
        "rollout.max_new_tokens=64",
    ]
    assert main([*args, "parallel.pp=1"]) == 0  # dp=2; 4 layers, 4 heads / 2 KV heads
    assert "# model: qwen2" in capsys.readouterr().out
    assert main([*args, "parallel.pp=1", "parallel.dp=1", "parallel.tp=2"]) == 0
    assert (
        main(
            [
                *args,
                "parallel.pp=1",
                "parallel.dp=1",
                "parallel.tp=2",  # 191: padded
                "parallel.sequence_parallel=true",
                "rollout.max_new_tokens=63",
            ]
        )
        == 0
    )
    assert "lengths pad to a multiple of 2" in capsys.readouterr().out
    assert main([*args, "model.hf_dir=/nonexistent"]) == 2
    assert "model.hf_dir: no config.json" in capsys.readouterr().err


def test_run_inside_a_job(monkeypatch, capsys):
    import types

    calls = []
    fake = types.ModuleType("nat_megatron.train.trainer")
    fake.run = calls.append
    monkeypatch.setitem(sys.modules, "nat_megatron.train.trainer", fake)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--config", str(CPU), "nat.budget=0.25"]) == 0
    assert len(calls) == 1 and calls[0].nat.budget == 0.25
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["--config", str(CPU)]) == 2 and len(calls) == 1
    assert "parallel.world_size: the config expects 2 processes" in capsys.readouterr().err


def test_dry_run_checks_data_path_and_checkpoint_resume(tmp_path, capsys):
    import json

    from nat_megatron.checkpoint.integrity import checkpoint_files, hash_share, write_manifest
    from nat_megatron.config import load_config

    def run(*overrides):
        code = main(["--config", str(CPU), "--dry-run", *overrides])
        out, err = capsys.readouterr()
        return code, out + err

    code, out = run(f"data.path={tmp_path}/missing.jsonl")
    assert code == 2 and f"invalid config: data.path: {tmp_path}/missing.jsonl does not exist" in out
    junk = tmp_path / "junk.jsonl"
    junk.write_bytes(b"\xff\xfe not json\n[[[\n")
    code, out = run(f"data.path={junk}")
    assert code == 2 and "invalid config: data.path: cannot detect the field layout" in out
    good = tmp_path / "gsm.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    code, out = run(f"data.path={good}", "reward.name=exact_int")
    assert code == 0 and f"# data: {good}: layout gsm8k, the first 5 rows parse" in out
    assert "# resume: no complete checkpoint in" in out

    code, out = run(f"checkpoint.resume={tmp_path}/nope")
    assert code == 2 and f"invalid config: checkpoint.resume: {tmp_path}/nope does not exist" in out
    ck = tmp_path / "ck" / "step_000003"
    ck.mkdir(parents=True)
    code, out = run(f"checkpoint.resume={ck}")
    assert code == 2 and "is not a complete checkpoint (no metadata.json)" in out
    (ck / "metadata.json").write_text("{}")
    code, out = run(f"checkpoint.resume={ck}")
    assert code == 2 and "has no manifest.json" in out
    saved = load_config(CPU, ["nat.budget=0.25"]).to_dict()
    (ck / "run.json").write_text(json.dumps({"config": saved, "data_fingerprint": "x"}, default=str))
    write_manifest(ck, hash_share(ck, checkpoint_files(ck)))
    code, out = run(f"checkpoint.resume={ck}")
    assert code == 2 and "checkpoint.allow_config_change: resuming" in out and "nat.budget: 0.25 -> 0.5" in out
    code, out = run(f"checkpoint.resume={ck}", "nat.budget=0.25")
    assert code == 0 and f"# resume: from {ck}" in out
    (tmp_path / "ck" / "latest").write_text("")
    (tmp_path / "ck" / ".lock").write_text(json.dumps({"host": "node7", "pid": 4242, "slurm_job": "99"}))
    code, out = run(f"checkpoint.dir={tmp_path / 'ck'}", "nat.budget=0.25")
    assert code == 0 and f"# resume: from {ck}" in out and "latest is empty" in out
    assert "# note: checkpoint.dir is locked by {'host': 'node7', 'pid': 4242, 'slurm_job': '99'}" in out
