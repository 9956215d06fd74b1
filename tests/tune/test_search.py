"""The layout search, check_layout, the CLI's JSON and its errors, and the recommendations."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nat_megatron.model.presets import PRESETS, load_arch
from nat_megatron.model.recompute import RECOMPUTE
from nat_megatron.parallel.layout import Layout, micro_batches_per_rank, validate_layout
from nat_megatron.tune import constants as C
from nat_megatron.tune.memory import Plan, estimate_memory, rollout_plan
from nat_megatron.tune.search import check_layout, search
from nat_megatron.tune.workload import Workload

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, str(ROOT / "tools" / "tune_layout.py")]
KEYS = {"tp", "pp", "vpp", "cp", "dp", "mbs", "recompute", "fits", "mem_gb", "step_time_s", "tokens_per_s_per_gpu"}
MEM_KEYS = {"weights", "grads", "optimizer", "activations", "logits", "rollout", "total"}


def run_cli(*args):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def cli_main():
    """tools/tune_layout.py's main, imported in-process (a subprocess costs seconds each)."""
    spec = importlib.util.spec_from_file_location("tune_layout", CLI[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize(
    "name,billions",
    [("qwen3-1.7b", 1.72), ("qwen3-8b", 8.19), ("llama3.1-8b", 8.03), ("qwen2.5-32b", 32.76), ("llama3.1-70b", 70.55)],
)
def test_presets_have_the_published_sizes(name, billions):
    assert load_arch(name).num_params() / 1e9 == pytest.approx(billions, abs=0.01)


def test_load_arch_reads_a_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["qwen3-8b"]))
    assert load_arch(str(tmp_path / "config.json")) == load_arch("qwen3-8b")
    assert load_arch(str(tmp_path)) == load_arch("qwen3-8b")
    with pytest.raises(ValueError, match="unknown preset"):
        load_arch("gpt-5")


def test_workload_follows_the_rpc_semantics():
    w = Workload(seq_len=1024, response_len=768, nat="rpc", budget=0.5)
    assert sum(w.cut_pmf) == pytest.approx(1.0)
    assert w.mean_cut == pytest.approx(0.5 * 768)  # sum_t pi_t = b * T (selection.py)
    assert w.mean_len == pytest.approx(256 + 384)
    none = Workload(seq_len=1024, response_len=768)
    shape = none.batch_shape(sequences=8, micro_batches=4)
    assert (shape.peak_tokens, shape.peak_positions) == (2 * 1024, 2 * 768)
    urs = Workload(seq_len=1024, response_len=768, nat="urs", budget=0.25)
    assert urs.batch_shape(sequences=8, micro_batches=4).peak_positions == 2 * 192
    # RPC: shorter micro-batches, but one sequence per micro-batch still peaks near full length.
    rpc4 = w.batch_shape(sequences=64, micro_batches=16)
    assert rpc4.peak_tokens < 0.8 * 4 * 1024
    assert w.batch_shape(sequences=64, micro_batches=64).peak_tokens > 0.95 * 1024


def test_search_ranks_fitting_layouts_first_by_throughput():
    arch = load_arch("llama3.1-8b")
    res = search(arch, Workload(seq_len=8192, response_len=7168, global_batch=64), 8)
    fits = [c.fits for c in res.candidates]
    assert any(fits) and not all(fits)
    assert fits == sorted(fits, reverse=True)  # fitting ones first
    speed = [c.time.tokens_per_s_per_gpu for c in res.candidates if c.fits]
    assert speed == sorted(speed, reverse=True)
    for c in res.candidates:  # every candidate is a valid layout
        validate_layout(
            arch,
            c.plan.layout,
            world_size=8,
            seq_len=8192,
            gpus_per_node=8,
            global_batch=64,
            micro_batch_size=c.plan.mbs,
        )


def test_search_rejects_invalid_layouts_with_reasons():
    res = search(load_arch("qwen2.5-32b"), Workload(seq_len=8192, response_len=4096), 16)
    reasons = dict(res.rejected)
    assert "tp=16 must divide the 8 GPUs per node" in reasons["tp=16,pp=1,cp=1,dp=1"]
    assert not any(c.plan.layout.tp > 8 for c in res.candidates)


def test_recompute_and_nat_lower_the_estimate():
    arch = load_arch("qwen3-8b")
    lay = Layout(tp=2, dp=4, sequence_parallel=True)
    work = Workload(seq_len=8192, response_len=7168, global_batch=64)
    totals = {rc: estimate_memory(arch, Plan(lay, 2, rc), work, C.H100).total for rc in RECOMPUTE}
    assert totals["full"] < totals["selective"] < totals["none"]
    # RPC 0.5 with 4 sequences per micro-batch: batching.py's balanced groups are ~30% smaller
    # (not 44%: the largest group still holds the long cuts); with 1 per micro-batch, ~no saving.
    rpc = Workload(seq_len=8192, response_len=7168, global_batch=64, nat="rpc", budget=0.5)
    act = {
        (w.nat, mbs): estimate_memory(arch, Plan(lay, mbs), w, C.H100).activations
        for w in (work, rpc)
        for mbs in (1, 4)
    }
    assert act["rpc", 4] < 0.8 * act["none", 4]
    assert act["rpc", 1] > 0.95 * act["none", 1]


def test_colocated_rollout_takes_its_share():
    arch = load_arch("qwen3-8b")
    r = rollout_plan(arch, mem_gb=80, seq_len=8192)
    # 16.4 GB of bf16 weights exceed half of 0.35 x 80 GB at TP1: the smallest TP is 2.
    assert r["tp"] == 2 and r["kv_cache_sequences"] > 1
    assert rollout_plan(arch, mem_gb=80, seq_len=8192, tp=1)["kv_cache_gb"] < r["kv_cache_gb"]
    cand = check_layout(arch, Layout(tp=2, dp=4, sequence_parallel=True), seq_len=8192, global_batch=64, rollout=r)
    # Asleep during training: a residual; generating: its whole budget next to the trainer's state.
    assert cand.memory.rollout == pytest.approx(C.ROLLOUT_ASLEEP_GB * C.GiB)
    m = cand.memory
    assert cand.rollout_peak == pytest.approx(m.weights + m.grads + m.optimizer + m.workspace + 0.35 * 80 * C.GiB)
    # A fixed KV cache sets the budget: weights + activations + KV.
    fixed = rollout_plan(arch, mem_gb=80, seq_len=8192, tp=2, kv_cache_gb=10.0)
    assert fixed["kv_cache_gb"] == 10.0
    assert fixed["bytes"] == pytest.approx((fixed["weights_gb"] + C.ROLLOUT_ACTIVATION_GB + 10.0) * C.GiB, rel=1e-3)
    # An engine budget that leaves no room for the trainer's resident state does not fit.
    greedy = rollout_plan(arch, mem_gb=80, seq_len=8192, tp=2, utilization=0.9)
    cand = check_layout(arch, Layout(tp=2, dp=4, sequence_parallel=True), seq_len=8192, global_batch=64, rollout=greedy)
    assert not cand.fits and "while generating" in cand.why_not


def test_check_layout_is_the_dry_run_entry_point():
    arch = load_arch("llama3.1-70b")
    with pytest.raises(ValueError, match="does not divide the number of query groups"):
        check_layout(arch, Layout(tp=16, dp=4, sequence_parallel=True), seq_len=8192, gpus_per_node=16)
    # Runs: lengths pad to a multiple of 2 * cp * tp, and an uneven global batch (5 sequences
    # on dp=2) gives DP ranks uneven shares; vpp's whole groups of pp are padded.
    odd = Layout(tp=8, cp=2, pp=4, vpp=2, dp=2, sequence_parallel=True)
    assert check_layout(arch, odd, seq_len=8200, global_batch=5).plan.layout == odd
    # 3 sequences on the busier DP rank, 1 per micro-batch, rounded up to a group of pp = 4.
    assert micro_batches_per_rank(odd, 5, 1) == 4
    assert micro_batches_per_rank(Layout(pp=4, dp=2), 5, 1) == 3  # 1F1B: no rounding
    assert micro_batches_per_rank(Layout(pp=2, vpp=2, dp=4), 2, 1) == 2  # a rank with none
    with pytest.raises(ValueError, match="does not fit"):
        check_layout(arch, Layout(tp=1, dp=8), seq_len=8192, require_fit=True)
    ok = check_layout(
        arch,
        Layout(tp=8, pp=8, dp=1, sequence_parallel=True),
        seq_len=8192,
        global_batch=64,
        require_fit=True,
        world_size=64,
    )
    assert ok.fits and ok.memory.total < 80 * C.GiB


@pytest.mark.parametrize("model,gpus", [("qwen3-8b", 8), ("qwen2.5-32b", 32), ("llama3.1-70b", 64)])
def test_recommended_layouts_fit_in_80gb_at_8k(model, gpus):
    res = search(load_arch(model), Workload(seq_len=8192, response_len=7168, global_batch=256), gpus)
    best = res.candidates[0]
    assert best.fits, best.why_not
    assert best.memory.total <= 80 * (1 - C.FIT_HEADROOM) * C.GiB
    assert best.plan.layout.world_size == gpus


def test_cli_json_document():
    out = run_cli(
        "--model",
        "qwen3-8b",
        "--gpus",
        "8",
        "--seq-len",
        "8192",
        "--response-len",
        "7168",
        "--nat",
        "urs:0.5",
        "--colocate-rollout",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)  # exactly one JSON document on stdout
    cands = doc["candidates"]
    assert cands and all(KEYS <= set(c) and MEM_KEYS <= set(c["mem_gb"]) for c in cands)
    assert all(c["mem_gb"]["rollout"] > 0 for c in cands)
    fit = [c["fits"] for c in cands]
    assert fit == sorted(fit, reverse=True)
    speed = [c["tokens_per_s_per_gpu"] for c in cands if c["fits"]]
    assert speed == sorted(speed, reverse=True)
    assert doc["assumptions"]["rollout"]["tp"] >= 1


def test_cli_single_layout(capsys):
    cli_main()(
        [
            "--model",
            "llama3.1-8b",
            "--gpus",
            "8",
            "--seq-len",
            "4096",
            "--response-len",
            "3072",
            "--layout",
            "tp=2,pp=2,cp=1,dp=2,vpp=2,mbs=1,rc=selective",
            "--json",
        ]
    )
    (c,) = json.loads(capsys.readouterr().out)["candidates"]
    assert (c["tp"], c["pp"], c["vpp"], c["dp"], c["mbs"], c["recompute"]) == (2, 2, 2, 2, 1, "selective")
    assert c["sequence_parallel"] is True


def test_cli_bad_model_in_a_subprocess():
    out = run_cli("--model", "gpt-9", "--gpus", "8", "--seq-len", "8192", "--response-len", "4096")
    assert out.returncode == 2
    assert "error: --model: unknown preset 'gpt-9'" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "args,arg",
    [
        (["--gpus", "8", "--seq-len", "8192", "--layout", "tp=2,pp=1,cp=1,dp=2"], "--layout"),
        (["--gpus", "8", "--seq-len", "8192", "--layout", "tp=16,pp=1,cp=1,dp=1"], "--layout"),
        (["--gpus", "8", "--seq-len", "8192", "--nat", "bingo:0.5"], "--nat"),
        (["--gpus", "8", "--seq-len", "8192", "--nat", "rpc:2"], "--nat"),
    ],
)
def test_cli_bad_input_exits_2_naming_the_argument(args, arg, capsys):
    """(A length that 2*cp*tp does not divide, or a global batch that dp*mbs does not divide,
    is not bad input: both run, padded; see test_check_layout_is_the_dry_run_entry_point.
    So 7 GPUs run as dp=7 with uneven shares.)"""
    with pytest.raises(SystemExit) as exit_:
        cli_main()(["--model", "qwen3-8b", "--response-len", "4096", *args])
    assert exit_.value.code == 2
    assert f"error: {arg}" in capsys.readouterr().err
