"""Enumerate layouts, estimate each, rank them; and `check_layout`, the dry run's entry point.

Every layout rule lives in parallel/layout.py's `validate_layout`: the search proposes all
factorisations tp x pp x cp x dp of the GPU count (with virtual stages, micro-batch sizes and
recompute options) and keeps what validate_layout accepts, with its reason for the rest.
Ranking: layouts that fit first, by estimated tokens/s/GPU; then the others by memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nat_megatron.model.arch import ModelArch
from nat_megatron.model.recompute import RECOMPUTE
from nat_megatron.parallel.layout import Layout, validate_layout
from nat_megatron.tune import constants as C
from nat_megatron.tune.memory import MemoryEstimate, Plan, estimate_memory
from nat_megatron.tune.step_time import TimeEstimate, estimate_time
from nat_megatron.tune.workload import Workload

MICRO_BATCH_SIZES = (1, 2, 4, 8)
MAX_VPP = 8  # virtual stages per pipeline stage tried by the search (a search bound, not a rule)


@dataclass
class Candidate:
    """One evaluated plan: memory, time, and whether it fits."""

    plan: Plan
    memory: MemoryEstimate
    time: TimeEstimate
    fits: bool
    why_not: str = ""
    rollout_peak: float = 0.0  # bytes while the colocated engine generates (0: no engine)

    def as_json(self) -> dict:
        """One entry of the tuner's JSON "candidates" list."""
        lay = self.plan.layout
        return {
            "tp": lay.tp,
            "pp": lay.pp,
            "vpp": lay.vpp,
            "cp": lay.cp,
            "dp": lay.dp,
            "mbs": self.plan.mbs,
            "recompute": self.plan.recompute,
            "sequence_parallel": lay.sequence_parallel,
            "fits": self.fits,
            "mem_gb": self.memory.gb(),
            "rollout_peak_gb": round(self.rollout_peak / C.GiB, 4),
            "step_time_s": round(self.time.step_s, 4),
            "tokens_per_s_per_gpu": round(self.time.tokens_per_s_per_gpu, 1),
            "peak_stage": self.memory.stage,
            "why_not": self.why_not or None,
            "time_s": self.time.as_dict(),
        }

    @property
    def layout_text(self) -> str:
        """tp=..,pp=..,cp=..,dp=..[,vpp=..],mbs=.. (the CLI's --layout syntax)."""
        lay = self.plan.layout
        text = f"tp={lay.tp},pp={lay.pp},cp={lay.cp},dp={lay.dp}"
        return text + (f",vpp={lay.vpp}" if lay.vpp else "") + f",mbs={self.plan.mbs}"


@dataclass
class SearchResult:
    """Ranked candidates, best first, and the (layout, reason) pairs validate_layout rejected."""

    candidates: list[Candidate]
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (layout, reason)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def evaluate(
    arch: ModelArch,
    plan: Plan,
    work: Workload,
    dev: C.Device,
    *,
    mem_gb: float | None = None,
    gpus_per_node: int = 8,
    rollout: dict | None = None,
) -> Candidate:
    """Memory and time of one plan (assumed valid: see validate_layout)."""
    mem_gb = dev.mem_gb if mem_gb is None else mem_gb
    memory = estimate_memory(arch, plan, work, dev, mem_gb=mem_gb, rollout=rollout)
    time = estimate_time(arch, plan, work, dev, gpus_per_node=gpus_per_node)
    why = ""
    usable = mem_gb * (1 - C.FIT_HEADROOM)
    rollout_peak = memory.resident + rollout["bytes"] if rollout else 0.0
    if memory.total > usable * C.GiB:
        why = (
            f"needs {memory.total / C.GiB:.1f} GB > {usable:.1f} GB ({mem_gb:g} GB less {C.FIT_HEADROOM:.0%} headroom)"
        )
    elif rollout_peak > usable * C.GiB:
        why = (
            f"while generating, the engine's {rollout['bytes'] / C.GiB:.1f} GB next to the "
            f"trainer's resident {memory.resident / C.GiB:.1f} GB exceed {usable:.1f} GB; "
            "lower rollout.gpu_memory_utilization or shard the trainer more"
        )
    elif rollout and rollout["kv_cache_sequences"] < 1:
        why = "the rollout engine's KV cache cannot hold one sequence"
    return Candidate(plan=plan, memory=memory, time=time, fits=not why, why_not=why, rollout_peak=rollout_peak)


def candidate_layouts(arch: ModelArch, gpus: int, *, gpus_per_node: int) -> tuple[list[Layout], list[tuple[str, str]]]:
    """Every tp x pp x cp x dp (x vpp) = gpus that validate_layout accepts, and the rejects.
    No sequence-length rule: the trainer pads every length to the layout's multiple."""
    ok, rejected = [], []
    for tp in _divisors(gpus):
        for pp in _divisors(gpus // tp):
            for cp in _divisors(gpus // (tp * pp)):
                dp = gpus // (tp * pp * cp)
                vpps = [None]
                if pp > 1 and arch.num_layers % pp == 0:
                    vpps += [v for v in range(2, MAX_VPP + 1) if (arch.num_layers // pp) % v == 0]
                for vpp in vpps:
                    lay = Layout(tp=tp, pp=pp, cp=cp, dp=dp, vpp=vpp, sequence_parallel=tp > 1)
                    try:
                        validate_layout(arch, lay, world_size=gpus, gpus_per_node=gpus_per_node)
                    except ValueError as e:
                        rejected.append((_text(lay), str(e)))
                        continue
                    ok.append(lay)
    return ok, rejected


def _text(lay: Layout) -> str:
    return f"tp={lay.tp},pp={lay.pp},cp={lay.cp},dp={lay.dp}" + (f",vpp={lay.vpp}" if lay.vpp else "")


def search(
    arch: ModelArch,
    work: Workload,
    gpus: int,
    dev: C.Device = C.H100,
    *,
    mem_gb: float | None = None,
    gpus_per_node: int = 8,
    rollout: dict | None = None,
    layouts: list[Layout] | None = None,
    mbs_options=MICRO_BATCH_SIZES,
    recompute_options=tuple(RECOMPUTE),
    distributed_optimizer: bool = True,
) -> SearchResult:
    """Evaluate every valid plan (or those of `layouts`) and rank them best first."""
    rejected: list[tuple[str, str]] = []
    if layouts is None:
        layouts, rejected = candidate_layouts(arch, gpus, gpus_per_node=gpus_per_node)
    out = []
    for lay in layouts:
        for mbs in mbs_options:
            try:
                validate_layout(arch, lay, global_batch=work.global_batch, micro_batch_size=mbs)
            except ValueError as e:
                rejected.append((_text(lay) + f",mbs={mbs}", str(e)))
                continue
            for rc in recompute_options:
                plan = Plan(lay, mbs, rc, distributed_optimizer)
                out.append(evaluate(arch, plan, work, dev, mem_gb=mem_gb, gpus_per_node=gpus_per_node, rollout=rollout))
    out.sort(key=lambda c: (not c.fits, -c.time.tokens_per_s_per_gpu if c.fits else c.memory.total, c.memory.total))
    return SearchResult(out, rejected)


def check_layout(
    arch: ModelArch,
    layout: Layout,
    *,
    seq_len: int,
    response_len: int | None = None,
    global_batch: int | None = None,
    micro_batch_size: int = 1,
    recompute: str = "none",
    nat: str = "none",
    budget: float = 1.0,
    logits_on: str = "selected",
    world_size: int | None = None,
    gpus_per_node: int = 8,
    device: str = "h100",
    gpu_mem_gb: float | None = None,
    rollout: dict | None = None,
    distributed_optimizer: bool = True,
    require_fit: bool = False,
) -> Candidate:
    """Validate a layout for this model and run (one place for the rules) and estimate it.

    Raises ValueError for a layout validate_layout rejects, or, with require_fit, one whose
    estimated peak memory exceeds the GPU (the message carries the breakdown). global_batch
    None means the smallest batch that fills the pipeline: dp x mbs x pp sequences.
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r} is unknown; use one of {tuple(RECOMPUTE)}")
    if device not in C.DEVICES:
        raise ValueError(f"device={device!r} is unknown; use one of {tuple(C.DEVICES)}")
    if global_batch is None:
        global_batch = layout.dp * micro_batch_size * layout.pp
    validate_layout(
        arch,
        layout,
        world_size=world_size,
        gpus_per_node=gpus_per_node,
        global_batch=global_batch,
        micro_batch_size=micro_batch_size,
    )
    work = Workload(
        seq_len=seq_len,
        response_len=response_len or seq_len,
        global_batch=global_batch,
        nat=nat,
        budget=budget,
        logits_on=logits_on,
    )
    plan = Plan(layout, micro_batch_size, recompute, distributed_optimizer)
    cand = evaluate(
        arch, plan, work, C.DEVICES[device], mem_gb=gpu_mem_gb, gpus_per_node=gpus_per_node, rollout=rollout
    )
    if require_fit and not cand.fits:
        raise ValueError(
            f"layout {cand.layout_text} ({recompute} recompute) does not fit: "
            f"{cand.why_not}; estimated GB {cand.memory.gb()}. Raise tp/pp/cp, "
            "use recompute, or lower the micro-batch size"
        )
    return cand
