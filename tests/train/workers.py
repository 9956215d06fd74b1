"""Functions run by tests.launcher for the RL-loop tests (each rank a fresh process)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from nat_megatron.parallel.launch import ROOT

CONFIG = ROOT / "examples/configs/smollm2-135m-cpu.yaml"


def tiny_overrides(hf_dir: str, tmp: str, **kw) -> list[str]:
    """Overrides that turn the default job into a short run of the tiny model (tests/train/conftest.py)."""
    from tests.train.rewards import NAME

    base = {
        "model.preset": "null",
        "model.hf_dir": hf_dir,
        "model.dtype": "fp32",
        "rollout.dtype": "fp32",
        "train.prompts_per_step": 2,
        "rollout.group_size": 2,
        "rollout.max_new_tokens": 16,
        "rollout.kv_cache_gb": 0.25,
        "data.max_prompt_tokens": 128,
        "reward.name": NAME,
        "optim.lr": 1e-3,
        "checkpoint.dir": f"{tmp}/ck",
        "checkpoint.export_hf": "false",
        "telemetry.tensorboard_dir": f"{tmp}/tb",
    }
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def megatron_logprobs(chunks, arch, seqs: list[list[int]], temperature: float = 1.0) -> list[torch.Tensor]:
    """log p(seq[t+1] | seq[:t+1]) for t < len-1 of each sequence, on every rank (any tp/pp)."""
    from megatron.core import parallel_state as ps

    from nat_megatron.train.forward_backward import MicroBatch, forward_backward

    mbs = []
    for s in seqs:
        tok = torch.tensor([s])
        mbs.append(MicroBatch(tokens=tok, targets=torch.cat([tok[:, 1:], tok[:, :1]], dim=1), count=1))
    outs = forward_backward(
        chunks,
        mbs,
        lambda st, mb: (st["logprobs"].sum(), mb.count),
        vocab_size=arch.vocab_size,
        forward_only=True,
        temperature=temperature,
    )
    # One rank contributes each value: the last stage's first TP rank of DP replica 0.
    owner = (
        ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    )
    result = []
    for i, s in enumerate(seqs):
        buf = outs[i]["stats"]["logprobs"][0].double().clone() if owner else torch.zeros(len(s), dtype=torch.float64)
        dist.all_reduce(buf)
        result.append(buf[: len(s) - 1])
    return result


def engine_logprobs(engine, seqs: list[list[int]]) -> list[torch.Tensor]:
    """The vLLM engine's prompt log-probs of each sequence's tokens 1..n-1 (teacher forcing).
    Every rank of the engine must call it with the same sequences."""
    from vllm import SamplingParams

    from nat_megatron import patches

    engine.llm.reset_prefix_cache()
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    with patches.vllm_inside_trainer():
        outs = engine.llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False)
    return [
        torch.tensor([step[t].logprob for t, step in zip(s[1:], o.prompt_logprobs[1:])], dtype=torch.float64)
        for s, o in zip(seqs, outs)
    ]


def fixed_sequences(tokenizer) -> list[list[int]]:
    """Chat-templated prompts followed by fixed 'responses': the same tokens on every run."""
    seqs = []
    for q, a in (
        ("What is 2 + 3?", "2 + 3 = 5, so the answer is \\boxed{5}."),
        ("Compute 7 * 6.", "Seven times six is 42. \\boxed{42}"),
        ("Name a prime number.", "A prime number: 13."),
    ):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
            prompt = prompt["input_ids"]
        seqs.append(list(prompt) + tokenizer.encode(a, add_special_tokens=False))
    return seqs


def _mean_abs(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(torch.cat([x - y for x, y in zip(a, b)]).abs().mean())


def _proc_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def sync_memory(trainer) -> dict:
    """This rank's peak extra resident memory during one weight sync, measured by the kernel:
    the peak-RSS mark (VmHWM) is reset (/proc/self/clear_refs 5) just before the sync."""
    import gc

    from nat_megatron.rollout.weight_sync import MiB

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_kb("VmRSS")
    trainer.sync()
    extra = (_proc_kb("VmHWM") - before) * 1024
    params = {n: p for c in trainer.model for n, p in c.named_parameters()}
    own = sum(p.numel() * p.element_size() for p in params.values())
    arch = trainer.arch
    h, f, v = arch.hidden_size, arch.ffn_hidden_size, arch.padded_vocab_size
    largest = max(v * h, 2 * f * h) * 4  # fp32: the embedding or a full linear_fc1
    # The full tensor reassembled from TP shards by a copy (fc1's [gate_r; up_r], fc2's columns).
    converted = 2 * f * h * 4 if trainer.layout.tp > 1 else 0
    return {
        "sync_extra_bytes": extra,
        "bucket_bytes": int(trainer.cfg.rollout.sync_bucket_mb * MiB),
        "largest_param_bytes": largest,
        "converted_bytes": converted,
        "model_bytes": arch.num_params() * 4,
        "own_trainer_bytes": own,
    }


def temperature_gap(trainer, seqs: list[list[int]]) -> dict:
    """The engine samples at rollout.temperature and reports that distribution's log-probs; the
    trainer's log-probs of the same tokens with logits / T match them, without / T they do not."""
    prompts = [s[:-4] for s in seqs]
    groups = trainer.engine.generate(prompts, trainer.sampling, seeds=list(range(len(prompts))))
    sampled = [p + c.token_ids for p, g in zip(prompts, groups) for c in g]
    engine = [torch.tensor(c.logprobs, dtype=torch.float64) for g in groups for c in g]
    for c in trainer.model:
        c.eval()
    out = {}
    for name, t in (("gap_with_temperature", trainer.cfg.rollout.temperature), ("gap_ignoring_temperature", 1.0)):
        lps = megatron_logprobs(trainer.model, trainer.arch, sampled, temperature=t)
        mine = [lp[len(p) - 1 :] for lp, p in zip(lps, [p for p, g in zip(prompts, groups) for _ in g])]
        out[name] = _mean_abs(engine, mine)
    return out


def trainer_sync(
    *, hf_dir: str, tmp: str, steps: int, parallel: dict, rollout: dict | None = None, extra: dict | None = None
) -> dict:
    """Train `steps` steps of the tiny model with vLLM rollouts; after every step compare each
    engine's log-probs of fixed sequences with the trainer's Megatron forward. Every rank
    returns its own figures (its engine's)."""
    import tests.train.rewards  # noqa: F401  (registers the test reward before the config checks it)
    from nat_megatron.config import load_config
    from nat_megatron.train.trainer import Trainer

    over = tiny_overrides(
        hf_dir,
        tmp,
        **{f"parallel.{k}": v for k, v in parallel.items()},
        **{f"rollout.{k}": v for k, v in (rollout or {}).items()},
        **{"train.steps": steps, "checkpoint.every": 1000, **(extra or {})},
    )
    cfg = load_config(CONFIG, over)
    trainer = Trainer(cfg)
    try:
        seqs = fixed_sequences(trainer.tokenizer)

        def compare() -> tuple[list, list]:
            for c in trainer.model:
                c.eval()
            mg = megatron_logprobs(trainer.model, trainer.arch, seqs)
            for c in trainer.model:
                c.train()
            return mg, engine_logprobs(trainer.engine, seqs)

        init_mg, init_engine = compare()
        scalars, synced = [], []
        for _ in range(steps):
            out = trainer.train_step()
            scalars.append(
                {
                    k: float(v)
                    for k, v in out.items()
                    if k.startswith(("loss", "grad_norm", "reward/", "logprob_mismatch", "tokens/", "tis/"))
                }
            )
            mg, eng = compare()
            synced.append(_mean_abs(eng, mg))
        final_mg, final_engine = mg, eng
        temperature = temperature_gap(trainer, seqs)
        evaluation = trainer.evaluate() if trainer.cfg.eval.enabled else {}
        memory = sync_memory(trainer)
        return {
            "rank": dist.get_rank(),
            "engine": trainer.engines.engine_of(dist.get_rank()),
            **memory,
            "scalars": scalars,
            "tokens": sum(len(s) - 1 for s in seqs),
            **temperature,
            "eval": evaluation,
            "init_engine_vs_megatron": _mean_abs(init_engine, init_mg),
            "synced": synced,
            "synced_max": float(torch.cat([x - y for x, y in zip(final_engine, final_mg)]).abs().max()),
            "trained_vs_initial": _mean_abs(final_mg, init_mg),
            "engine_trained_vs_initial": _mean_abs(final_engine, init_engine),
        }
    finally:
        trainer.close()


def trainer_data(*, hf_dir: str, tmp: str, data_path: str) -> dict:
    """Build the real Trainer (1 rank, no rollout engine) on `data_path`; report its data."""
    import contextlib
    import io

    from nat_megatron.config import load_config
    from nat_megatron.train.trainer import Trainer

    cfg = load_config(
        CONFIG,
        tiny_overrides(
            hf_dir,
            tmp,
            **{"parallel.world_size": 1, "parallel.pp": 1, "data.path": data_path, "reward.name": "math_verify"},
        ),
    )
    Trainer._build_engine = lambda self: None  # data handling only: no vLLM start-up
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer = Trainer(cfg)
    try:
        batch = trainer.data.next_batch()
        return {
            "stdout": out.getvalue(),
            "examples": len(trainer.prompt_key),
            "batch_answers": sorted(p.answer for p in batch),
        }
    finally:
        trainer.close()
