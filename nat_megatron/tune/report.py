"""The tuner's output: a ranked text table, or one JSON document."""

from __future__ import annotations

import collections
import re

from nat_megatron.model.arch import ModelArch
from nat_megatron.model.recompute import RECOMPUTE
from nat_megatron.tune import constants as C
from nat_megatron.tune.search import SearchResult
from nat_megatron.tune.workload import Workload


def assumptions(
    arch: ModelArch,
    work: Workload,
    dev: C.Device,
    *,
    gpus: int,
    mem_gb: float,
    gpus_per_node: int,
    rollout: dict | None,
) -> dict:
    """What the estimates assume, for the reader of the table or the JSON."""
    out = {
        "params_b": round(arch.num_params() / 1e9, 3),
        "gpus": gpus,
        "gpus_per_node": gpus_per_node,
        "gpu_mem_gb": mem_gb,
        "fit_headroom": C.FIT_HEADROOM,
        "device": dev.name,
        "seq_len": work.seq_len,
        "response_len": work.response_len,
        "global_batch": work.global_batch,
        "nat": f"{work.nat}:{work.budget:g}",
        "expected_trained_len": round(work.mean_len, 1),
        "logits_on": work.logits_on,
        "nat_peak": work.nat_peak,
        "dtypes": {"params": dev.param_bytes, "activations": dev.act_bytes, "grads": C.GRAD_BYTES},
        "mfu": dev.mfu,
        "peak_tflops": dev.peak_flops / 1e12,
        "nvlink_gbps": dev.intra_node_bw / 1e9,
        "ib_gbps_per_gpu": dev.inter_node_bw / 1e9,
        "workspace_gb": dev.workspace_gb,
        "fragmentation": dev.fragmentation,
        "backend": dev.backend,
        "recompute": {k: v for k, v in RECOMPUTE.items()},
        "tokens_per_s_per_gpu": "prompt+full-response tokens of the step / step time / GPUs",
    }
    if rollout:
        out["rollout"] = {k: v for k, v in rollout.items() if k != "bytes"}
    return out


def to_json(result: SearchResult, info: dict) -> dict:
    """The JSON document: candidates best first, then the rejected layouts with reasons."""
    return {
        "assumptions": info,
        "candidates": [c.as_json() for c in result.candidates],
        "rejected": [{"layout": lay, "reason": why} for lay, why in result.rejected],
    }


def table(result: SearchResult, info: dict, *, top: int = 20) -> str:
    """Ranked table of the best `top` candidates, with the assumptions above it."""
    lines = [
        f"model {info['params_b']}B params, {info['gpus']} GPUs x {info['gpu_mem_gb']:g} GB "
        f"({info['device']}, {info['gpus_per_node']} per node), seq {info['seq_len']} "
        f"(response {info['response_len']}), global batch {info['global_batch']}, "
        f"NAT {info['nat']} (expected trained length {info['expected_trained_len']})",
        f"assumed: MFU {info['mfu']} of {info['peak_tflops']:g} TFLOP/s, NVLink "
        f"{info['nvlink_gbps']:g} GB/s, IB {info['ib_gbps_per_gpu']:g} GB/s per GPU, workspace "
        f"{info['workspace_gb']:g} GB + {info['fragmentation']:.0%}, fits = <= "
        f"{1 - info['fit_headroom']:.0%} of memory, logits on {info['logits_on']} positions",
    ]
    if "rollout" in info:
        r = info["rollout"]
        lines.append(
            f"colocated rollout: vLLM TP {r['tp']}, gpu_memory_utilization "
            f"{r['gpu_memory_utilization']}: weights {r['weights_gb']} GB, KV cache "
            f"{r['kv_cache_gb']} GB (~{r['kv_cache_sequences']:.0f} sequences); asleep "
            f"while training ('roll'), generating next to the trainer's state ('gen')"
        )
    head = (
        f"{'#':>3} {'tp':>2} {'pp':>2} {'vpp':>3} {'cp':>2} {'dp':>3} {'mbs':>3} "
        f"{'recompute':<9} {'fits':<4} {'total':>6} {'weig':>5} {'grad':>5} {'opt':>5} "
        f"{'act':>5} {'logit':>5} {'roll':>5} {'work':>5} {'gen':>5} {'step s':>7} {'tok/s/gpu':>9}"
    )
    lines += ["", head, "-" * len(head)]
    # Tiny (CPU) models print in MB so that their columns are not all 0.0.
    scale, unit = (1, "GB") if max((c.memory.total for c in result.candidates), default=0) >= C.GiB else (1024, "MB")
    for i, c in enumerate(result.candidates[:top], 1):
        lay = c.plan.layout
        g = {k: v * scale for k, v in c.memory.gb().items()}
        lines.append(
            f"{i:>3} {lay.tp:>2} {lay.pp:>2} {lay.vpp or '-':>3} {lay.cp:>2} {lay.dp:>3} "
            f"{c.plan.mbs:>3} {c.plan.recompute:<9} {'yes' if c.fits else 'no':<4} "
            f"{g['total']:6.1f} {g['weights']:5.1f} {g['grads']:5.1f} {g['optimizer']:5.1f} "
            f"{g['activations']:5.1f} {g['logits']:5.1f} {g['rollout']:5.1f} "
            f"{g['workspace']:5.1f} {c.rollout_peak / C.GiB * scale:5.1f} {c.time.step_s:7.2f} "
            f"{c.time.tokens_per_s_per_gpu:9.0f}"
        )
    shown = min(top, len(result.candidates))
    lines.append(f"({shown} of {len(result.candidates)} candidates shown; memory in {unit})")
    if result.rejected:
        reasons = collections.Counter(_reason_kind(why) for _, why in result.rejected)
        lines.append(
            f"rejected {len(result.rejected)} layouts: " + "; ".join(f"{n} x {why}" for why, n in reasons.most_common())
        )
    return "\n".join(lines)


def _reason_kind(why: str) -> str:
    """A reason without its numbers, to group rejections."""
    return re.sub(r"\d+", "N", why.split(";")[0])[:100]
