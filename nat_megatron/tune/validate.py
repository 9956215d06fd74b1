"""`--validate`: run plans for a few steps on this machine and compare with the estimates.

Each plan runs on world_size local processes (parallel.launch.launch_function; gloo on CPU) through the real
code: build_model, wrap_ddp + the distributed optimizer, NAT selection (nat/selection.py),
train/batching.py's micro-batches and NAT loss, and forward_backward with the selected-position
output layer. The peak is taken over steps 2.. (Adam's states exist from step 1 on) and over
ranks: torch.cuda.max_memory_allocated on GPU, live tensor bytes (measure.py) on CPU, where
the estimate uses the CPU device profile (constants.CPU: fp32, model/layers.py backend).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict

import torch

from nat_megatron.model.arch import ModelArch
from nat_megatron.model.recompute import RECOMPUTE
from nat_megatron.parallel.layout import Layout
from nat_megatron.tune import constants as C
from nat_megatron.tune.memory import Plan, estimate_memory
from nat_megatron.tune.step_time import estimate_time
from nat_megatron.tune.workload import Workload


def machine_device() -> C.Device:
    """The device profile of the machine at hand."""
    return C.H100 if torch.cuda.is_available() else C.CPU


def validate_plans(
    arch: ModelArch, work: Workload, plans: list[Plan], *, steps: int = 3, seed: int = 1234, timeout: float = 600
) -> list[dict]:
    """Run every plan; one row per plan with predicted and measured peak GB and step time."""
    if steps < 2:
        raise ValueError(f"validation needs >= 2 steps (the peak is taken after step 1), got {steps}")
    dev = machine_device()
    rows = []
    for plan in plans:
        from nat_megatron.parallel.launch import launch_function as launch

        mem = estimate_memory(arch, plan, work, dev)
        est = estimate_time(arch, plan, work, dev)
        results = launch(
            "nat_megatron.tune.validate:run_plan",
            plan.layout.world_size,
            timeout=timeout,
            arch=arch.to_dict(),
            layout=asdict(plan.layout),
            mbs=plan.mbs,
            recompute=plan.recompute,
            distributed_optimizer=plan.distributed_optimizer,
            work=asdict(work),
            steps=steps,
            seed=seed,
        )
        peak = max(r["peak"] for r in results)
        measured_s = statistics.median(results[0]["times"][1:])
        rows.append(
            {
                "plan": plan,
                "nat": f"{work.nat}:{work.budget:g}",
                "predicted_gb": mem.total / C.GiB,
                "measured_gb": peak / C.GiB,
                "mem_error": (mem.total - peak) / peak,
                "peak_rank": max(range(len(results)), key=lambda r: results[r]["peak"]),
                "predicted_s": est.step_s,
                "measured_s": measured_s,
                "predicted_detail": mem.gb(),
                "per_rank_gb": [r["peak"] / C.GiB for r in results],
            }
        )
    return rows


def format_rows(rows: list[dict]) -> str:
    """Predicted vs measured, one line per plan."""
    head = (
        f"{'layout':<34} {'nat':<9} {'recompute':<9} {'pred GB':>9} {'meas GB':>9} "
        f"{'err':>6} {'pred s':>8} {'meas s':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        p = r["plan"]
        lay = p.layout
        text = (
            f"tp={lay.tp},pp={lay.pp},cp={lay.cp},dp={lay.dp}"
            + (f",vpp={lay.vpp}" if lay.vpp else "")
            + f",mbs={p.mbs}"
        )
        lines.append(
            f"{text:<34} {r['nat']:<9} {p.recompute:<9} {r['predicted_gb']:9.4f} "
            f"{r['measured_gb']:9.4f} {r['mem_error']:+6.0%} {r['predicted_s']:8.3f} "
            f"{r['measured_s']:8.3f}"
        )
    return "\n".join(lines)


# ----- what every rank runs --------------------------------------------------------------


def _samples(work: Workload, vocab: int, seed: int, step: int):
    """The step's global batch: every sequence at full prompt and response length."""
    from nat_megatron.train.batching import Sample

    g = torch.Generator().manual_seed(seed * 1000 + step)
    P, R = work.prompt_len, work.response_len
    return [
        Sample(
            prompt=torch.randint(0, vocab, (max(P, 1),), generator=g),
            response=torch.randint(0, vocab, (R,), generator=g),
            old_logprobs=-torch.rand(R, generator=g) - 0.1,
            advantage=float(torch.randn((), generator=g)),
        )
        for _ in range(work.global_batch)
    ]


def _micro_batches(work: Workload, plan: Plan, arch: ModelArch, seed: int, step: int, dp_rank: int):
    from nat_megatron.nat.selection import sample, selection_generators
    from nat_megatron.train.batching import build_micro_batches

    ids = list(range(work.global_batch))[dp_rank :: plan.layout.dp]  # as the trainer shares
    samples = _samples(work, arch.vocab_size, seed, step)
    mine = [samples[i] for i in ids]
    sel = None
    if mine:  # a rank without samples runs one zero-weight row
        lengths = torch.tensor([len(s.response) for s in mine])
        sel = sample(work.nat, work.budget, lengths, selection_generators(seed, step, ids))
    return build_micro_batches(
        mine,
        sel,
        aggregation="token-mean",
        seq_multiple=plan.layout.seq_multiple,
        num_micro_batches=max(1, -(-len(mine) // plan.mbs)),
        pad_rows=plan.layout.vpp is not None,
    )


def run_plan(
    *,
    arch: dict,
    layout: dict,
    mbs: int,
    recompute: str,
    distributed_optimizer: bool,
    work: dict,
    steps: int,
    seed: int,
) -> dict:
    """One rank: build, train `steps` steps, return its peak bytes and step times."""
    from megatron.core import parallel_state

    from nat_megatron.model.build import build_model
    from nat_megatron.nat.loss import LossConfig
    from nat_megatron.parallel.distributed import init_distributed, shutdown
    from nat_megatron.train.batching import KEPT_FIELD, nat_loss_fn
    from nat_megatron.train.forward_backward import forward_backward
    from nat_megatron.train.optimizer import build_optimizer, wrap_ddp
    from nat_megatron.tune.measure import PeakMemory

    arch, lay, wl = ModelArch(**arch), Layout(**layout), Workload(**work)
    plan = Plan(lay, mbs, recompute, distributed_optimizer)
    init_distributed(lay, seed=seed)
    dp_rank = parallel_state.get_data_parallel_rank()
    batches = [_micro_batches(wl, plan, arch, seed, s, dp_rank) for s in range(steps)]
    on_gpu = torch.cuda.is_available()
    loss_fn = nat_loss_fn(LossConfig())
    mask = KEPT_FIELD if wl.logits_on == "selected" else None
    times = []
    with PeakMemory() as pm:
        chunks = build_model(arch, lay, dtype=torch.bfloat16 if on_gpu else torch.float32, **RECOMPUTE[recompute])
        ddp = wrap_ddp(chunks, use_distributed_optimizer=distributed_optimizer)
        opt = build_optimizer(ddp, lr=1e-5, use_distributed_optimizer=distributed_optimizer, bf16=on_gpu)
        for step in range(steps):
            if step == 1:
                pm.reset_peak()
            t0 = time.perf_counter()
            for c in ddp:
                c.zero_grad_buffer()
            opt.zero_grad()
            forward_backward(ddp, batches[step], loss_fn, vocab_size=arch.vocab_size, output_mask=mask)
            opt.step()
            if on_gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = pm.peak
    shutdown()
    return {"peak": peak, "times": times}
