"""Time and memory of one NAT training step (fwd + bwd) for schemes none, URS and RPC, side by side.

    python tools/bench_nat.py [--preset tiny|qwen3-1.7b|qwen3-8b] [--budget 0.5] [--repeats 3]

Builds a random-weight model with the trainer's own build_model / wrap_ddp / forward_backward
(one process, world size 1), draws a batch of samples (random prompt and response tokens of
fixed lengths), and for every scheme builds the micro-batches with train/batching.py and runs
forward + backward of the NAT loss with the selected-position output layer. Every scheme uses
the same number of micro-batches; the schemes take turns in every repeat (so a change in
machine load hits them alike), and each reports the median wall time after warm-up (and the
median process CPU time, steadier on a machine shared with other jobs).
"rpc_unsorted" is RPC with unsorted equal-count micro-batches, the baseline for sorting.
"urs_output_only" is URS with the last transformer layer on every position (only the final
norm and output layer selected); "urs" runs that layer's attention queries, projection and MLP
on the kept positions too, and "urs_vs_output_only" reports what that saves.

Memory. GPU: torch.cuda.max_memory_allocated over the step. CPU: a TorchDispatchMode counts the
bytes of every tensor storage created during the step until it is freed (weak references on the
storages; a separate, untimed run), plus the parameters and gradient buffers that exist
before the step. Output-layer memory: the peak of live bytes from the entry of the model's
output stage (selection, final norm, output layer) until the loss has been computed, above the
level at that entry, the largest over micro-batches (for "urs" that region also holds the
selected last layer, which runs from there). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from nat_megatron.checkpoint.gather import unwrap  # noqa: E402
from nat_megatron.model.arch import ModelArch  # noqa: E402
from nat_megatron.model.build import build_model  # noqa: E402
from nat_megatron.nat.loss import LossConfig  # noqa: E402
from nat_megatron.nat.selection import sample, selection_generators  # noqa: E402
from nat_megatron.parallel.distributed import init_distributed, shutdown  # noqa: E402
from nat_megatron.parallel.layout import Layout  # noqa: E402
from nat_megatron.train.batching import KEPT_FIELD, Sample, build_micro_batches, nat_loss_fn  # noqa: E402
from nat_megatron.train.forward_backward import forward_backward  # noqa: E402
from nat_megatron.train.optimizer import wrap_ddp  # noqa: E402

# Model shape, dtype and the batch each preset runs. tiny: compute-bound on 2 CPU cores (the
# 32k-vocabulary output layer is about half the FLOPs, as in small real models).
PRESETS = {
    "tiny": dict(
        arch=dict(
            family="llama",
            vocab_size=32000,
            hidden_size=256,
            ffn_hidden_size=768,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=64,
            max_position_embeddings=8192,
        ),
        dtype="float32",
        samples=8,
        prompt_len=64,
        response_len=512,
        micro_batches=2,
    ),
    "qwen3-1.7b": dict(
        arch=dict(
            family="qwen3",
            vocab_size=151936,
            hidden_size=2048,
            ffn_hidden_size=6144,
            num_layers=28,
            num_heads=16,
            num_kv_heads=8,
            head_dim=128,
            rope_theta=1e6,
            tie_embeddings=True,
            qk_norm=True,
            max_position_embeddings=40960,
        ),
        dtype="bfloat16",
        samples=16,
        prompt_len=256,
        response_len=4096,
        micro_batches=8,
    ),
    "qwen3-8b": dict(
        arch=dict(
            family="qwen3",
            vocab_size=151936,
            hidden_size=4096,
            ffn_hidden_size=12288,
            num_layers=36,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            rope_theta=1e6,
            qk_norm=True,
            max_position_embeddings=40960,
        ),
        dtype="bfloat16",
        samples=8,
        prompt_len=256,
        response_len=4096,
        micro_batches=8,
    ),
}


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages created inside the mode and still alive; peaks overall and
    inside a region (begin/end)."""

    def __init__(self):
        super().__init__()
        self.seen, self.live, self.peak = WeakIdKeyDictionary(), 0, 0
        self.region_base, self.region_peak, self.region_max = None, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                if st not in self.seen:
                    n = st.nbytes()
                    self.seen[st] = weakref.ref(st, lambda _, n=n: self._free(n))
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    self.region_peak = max(self.region_peak, self.live)
        return out

    def _free(self, n):
        self.live -= n

    def begin(self):
        self.region_base = self.region_peak = self.live

    def end(self):
        if self.region_base is not None:
            self.region_max = max(self.region_max, self.region_peak - self.region_base)
        self.region_base = None


class CudaBytes:
    """The same figures from CUDA's allocator statistics."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.step_peak, self.region_base, self.region_max = 0, None, 0
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak = max(self.step_peak, torch.cuda.max_memory_allocated())

    def begin(self):
        torch.cuda.synchronize()
        # Resetting the allocator's peak starts the region; keep the step's peak so far.
        self.step_peak = max(self.step_peak, torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        self.region_base = torch.cuda.memory_allocated()

    def end(self):
        if self.region_base is not None:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - self.region_base
            self.region_max, self.region_base = max(self.region_max, peak), None


def make_samples(n, prompt_len, response_len, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        Sample(
            prompt=torch.randint(0, vocab, (prompt_len,), generator=g),
            response=torch.randint(0, vocab, (response_len,), generator=g),
            old_logprobs=-10.0 - torch.rand(response_len, generator=g),
            advantage=float(torch.randn((), generator=g)),
        )
        for _ in range(n)
    ]


def plan_scheme(name, samples, budget, micro_batches, seed, cfg):
    scheme = name.removesuffix("_unsorted").removesuffix("_output_only")
    lengths = torch.tensor([len(s.response) for s in samples])
    sel = sample(
        scheme, 1.0 if scheme == "none" else budget, lengths, selection_generators(seed, 0, range(len(samples)))
    )
    mbs = build_micro_batches(
        samples, sel, aggregation=cfg.aggregation, num_micro_batches=micro_batches, sort=not name.endswith("_unsorted")
    )
    real = sum(len(s.prompt) + int(c) - 1 for s, c in zip(samples, sel.cut) if c > 0)
    padded = sum(mb.tokens.numel() for mb in mbs)
    info = {
        "kept_fraction": round(sel.kept_fraction, 4),
        "micro_batches": len(mbs),
        "input_tokens": padded,
        "pad_fraction": round(1 - real / padded, 4),
        "output_positions": int(sum(mb.fields[KEPT_FIELD].sum() for mb in mbs)),
    }
    return mbs, info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--response-len", type=int)
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--samples", type=int)
    parser.add_argument("--micro-batches", type=int)
    parser.add_argument(
        "--schemes",
        default="none,urs,urs_output_only,rpc",
        help="comma list; rpc_unsorted: RPC without sorting (the padding "
        "baseline); urs_output_only: URS without the selected last layer",
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    shape = {k: getattr(args, k) or preset[k] for k in ("samples", "prompt_len", "response_len", "micro_batches")}
    with socket.socket() as sock:  # a free port: several benchmarks may run side by side
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    for key, val in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", port),
    ):
        os.environ.setdefault(key, val)
    init_distributed(Layout(), seed=args.seed)
    arch = ModelArch(**preset["arch"])
    dtype = getattr(torch, preset["dtype"])
    ddp = wrap_ddp(build_model(arch, Layout(), dtype=dtype), use_distributed_optimizer=False)
    cfg = LossConfig()
    samples = make_samples(shape["samples"], shape["prompt_len"], shape["response_len"], arch.vocab_size, args.seed)
    names = args.schemes.split(",")
    plans = {n: plan_scheme(n, samples, args.budget, shape["micro_batches"], args.seed, cfg) for n in names}
    gpu = torch.cuda.is_available()
    model = unwrap(ddp[0])
    tracker = None
    model_postprocess = model._postprocess

    def postprocess(*a, **k):  # marks the output stage for the output-layer memory figure
        if tracker is not None:
            tracker.begin()
        return model_postprocess(*a, **k)

    model._postprocess = postprocess
    loss = nat_loss_fn(cfg)

    def loss_fn(stats, mb):
        out = loss(stats, mb)
        if tracker is not None:
            tracker.end()
        return out

    def step(name):
        model.select_last_layer = not name.endswith("_output_only")
        for c in ddp:
            c.zero_grad_buffer()
        forward_backward(ddp, plans[name][0], loss_fn, vocab_size=arch.vocab_size, output_mask=KEPT_FIELD)
        if gpu:
            torch.cuda.synchronize()

    times, cpu_times = {n: [] for n in names}, {n: [] for n in names}
    for r in range(args.warmup + args.repeats):
        for n in names:
            t0, c0 = time.perf_counter(), time.process_time()
            step(n)
            if r >= args.warmup:
                times[n].append(time.perf_counter() - t0)
                cpu_times[n].append(time.process_time() - c0)
    static = sum(p.numel() * p.element_size() for p in model.parameters())
    static += sum(buf.grad_data.numel() * buf.grad_data.element_size() for c in ddp for buf in c.buffers)
    result = {}
    for n in names:
        tracker = CudaBytes() if gpu else LiveBytes()
        with tracker:
            step(n)
        peak = tracker.peak if gpu else static + tracker.peak
        result[n] = dict(
            time_s=round(statistics.median(times[n]), 4),
            times_s=[round(t, 4) for t in times[n]],
            cpu_time_s=round(statistics.median(cpu_times[n]), 4),
            peak_bytes=peak,
            output_layer_bytes=tracker.region_max,
            **plans[n][1],
        )
        tracker = None
    base = result.get("none")
    ratios = {
        n: {
            "time": round(r["time_s"] / base["time_s"], 3),
            "cpu_time": round(r["cpu_time_s"] / base["cpu_time_s"], 3),
            "peak_memory": round(r["peak_bytes"] / base["peak_bytes"], 3),
            "output_layer_memory": round(r["output_layer_bytes"] / base["output_layer_bytes"], 3),
        }
        for n, r in result.items()
        if base and n != "none"
    }
    if "urs" in result and "urs_output_only" in result:  # the selected last layer's saving
        u, o = result["urs"], result["urs_output_only"]
        ratios["urs_vs_output_only"] = {
            "time": round(u["time_s"] / o["time_s"], 3),
            "cpu_time": round(u["cpu_time_s"] / o["cpu_time_s"], 3),
            "peak_memory": round(u["peak_bytes"] / o["peak_bytes"], 3),
        }
    print(
        json.dumps(
            {
                "preset": args.preset,
                "device": torch.cuda.get_device_name() if gpu else "cpu",
                "threads": torch.get_num_threads(),
                # Other jobs on a shared machine distort wall times (and multi-thread barriers most).
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "dtype": preset["dtype"],
                "budget": args.budget,
                **shape,
                "arch": preset["arch"],
                "warmup": args.warmup,
                "repeats": args.repeats,
                "memory_method": "cuda max_memory_allocated"
                if gpu
                else "TorchDispatchMode live storage bytes during the step + parameter and grad-buffer bytes",
                "schemes": result,
                "ratios_to_none": ratios,
            }
        ),
        flush=True,
    )  # before teardown
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
