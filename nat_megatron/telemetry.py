"""Per-step metrics: TensorBoard (and W&B) scalars, phase timers, memory, NVML GPU metrics, a progress line.

    tel = Telemetry(cfg.telemetry, total_steps=cfg.train.steps)
    for step in range(1, steps + 1):
        with tel.phase("rollout"):
            ...
        with tel.phase("train"):
            ...
        tel.log_step(step, {"loss": loss, "reward/mean": r})  # adds time/*, memory/*, gpu/*
    tel.close()

Every rank times its phases; only rank 0 writes TensorBoard and prints. Phase times of a step
go into that step's scalars as time/<phase> (seconds, summed when a phase runs several times).
GPU metrics (nvidia-ml-py) are those of this rank's GPU and are skipped cleanly without one.
With telemetry.wandb.enabled, rank 0 also logs every scalar to a Weights & Biases run, at the
same step as TensorBoard (wandb is imported only then).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import sys
import time
from collections import defaultdict

import torch

GiB = 1024**3


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rss_bytes() -> int:
    """Resident set size of this process now (peak RSS where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def format_duration(seconds: float) -> str:
    """7384 -> '2h03m', 95 -> '1m35s', 4.2 -> '4.2s'."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class GpuMonitor:
    """NVML utilisation, memory used and power of this process's GPU; inert without a GPU."""

    def __init__(self):
        self.handle = None
        if not torch.cuda.is_available():
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = torch.cuda.current_device()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            ids = [v.strip() for v in visible.split(",") if v.strip()]
            if ids and all(v.isdigit() for v in ids):  # NVML counts all GPUs, CUDA visible ones
                index = int(ids[index])
            self._nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as e:  # no driver, no library, MIG slices: metrics are optional
            print(f"telemetry: NVML GPU metrics disabled ({e})", file=sys.stderr)
            self.handle = None

    def read(self) -> dict[str, float]:
        """gpu/util (%), gpu/mem_used_gb, gpu/power_w; {} when unavailable."""
        if self.handle is None:
            return {}
        nv, out = self._nvml, {}
        with contextlib.suppress(Exception):
            out["gpu/util"] = float(nv.nvmlDeviceGetUtilizationRates(self.handle).gpu)
        with contextlib.suppress(Exception):
            out["gpu/mem_used_gb"] = nv.nvmlDeviceGetMemoryInfo(self.handle).used / GiB
        with contextlib.suppress(Exception):
            out["gpu/power_w"] = nv.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
        return out

    def close(self):
        if self.handle is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self.handle = None


class Telemetry:
    """Metrics logger container (module docstring). Use as a context manager or call close()."""

    def __init__(
        self,
        cfg,
        *,
        total_steps: int,
        start_step: int = 0,
        rank: int | None = None,
        stream=None,
        progress_keys: tuple[str, ...] | None = None,
    ):
        """cfg: the run's telemetry section (config.py TelemetryConfig). progress_keys: the
        scalars the progress line shows (None: all); TensorBoard gets all."""
        self.cfg = cfg
        self.total_steps = total_steps
        self.rank = _rank() if rank is None else rank
        self.stream = stream if stream is not None else sys.stdout
        self.writer = self.wandb = None
        if self.rank == 0 and self.cfg.wandb.enabled:
            self.wandb = start_wandb(self.cfg)
            self.info(f"telemetry: W&B run ({self.cfg.wandb.mode}) in {self.wandb.settings.sync_dir}")
        if self.rank == 0 and self.cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.cfg.tensorboard_dir)
        self.gpu = GpuMonitor() if self.cfg.nvml else None
        self._phases: dict[str, float] = defaultdict(float)
        self._start_step = start_step  # steps done before this process (a resumed run)
        self.progress_keys = progress_keys
        self._t_step = time.perf_counter()
        self._step_seconds = 0.0  # time/step summed over this process's steps

    def start_step(self) -> None:
        """The step begins now: time/step counts from here (not the evaluation or checkpoint
        before it; without this call, from the previous log_step)."""
        self._t_step = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time a block; its seconds are added to this step's time/<name>."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._phases[name] += time.perf_counter() - t0

    def memory(self) -> dict[str, float]:
        """memory/rss_gb, and on GPU memory/cuda_max_allocated_gb since the last step (then reset)."""
        out = {"memory/rss_gb": rss_bytes() / GiB}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["memory/cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / GiB
            torch.cuda.reset_peak_memory_stats()
        return out

    def log_step(self, step: int, scalars: dict | None = None) -> dict[str, float]:
        """Record step `step` (1-based): scalars plus time/*, memory/*, gpu/*; returns them all.

        Every log_every steps (and at the last step) rank 0 writes TensorBoard and prints the
        progress line. Every rank must call this (phase times are per rank).
        """
        now = time.perf_counter()
        out = {k: _number(v) for k, v in (scalars or {}).items()}
        out.update({f"time/{k}": v for k, v in self._phases.items()})
        out["time/step"] = now - self._t_step
        self._step_seconds += out["time/step"]
        self._phases.clear()
        self._t_step = now
        if step % self.cfg.log_every and step != self.total_steps:
            return out
        out.update(self.memory())
        if self.gpu is not None:
            out.update(self.gpu.read())
        if self.rank == 0:
            self._write(step, out)
            self.info(self.progress_line(step, out, scalars or {}))
        return out

    def _write(self, step: int, scalars: dict) -> None:
        """Rank 0: the finite scalars to TensorBoard and W&B, at `step`."""
        finite = {tag: float(v) for tag, v in scalars.items() if math.isfinite(float(v))}
        if self.writer is not None:
            for tag, value in finite.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(finite, step=step)

    def progress_line(self, step: int, out: dict, scalars: dict) -> str:
        """'step 3/20 (15%) | loss 0.1234 | rollout 3.1s train 2.0s | 5.2s/step | ETA 1m28s'.

        s/step: the mean time/step so far (evaluations and checkpoints between steps excluded);
        the ETA is that times the steps left."""
        done = step - self._start_step
        per_step = self._step_seconds / max(done, 1)
        eta = per_step * max(self.total_steps - step, 0)
        parts = [f"step {step}/{self.total_steps} ({100 * step / max(self.total_steps, 1):.0f}%)"]
        shown = [k for k in scalars if self.progress_keys is None or k in self.progress_keys]
        if shown:
            parts.append(" ".join(f"{k} {_fmt(out[k])}" for k in shown))
        phases = [f"{k[5:]} {v:.1f}s" for k, v in out.items() if k.startswith("time/") and k != "time/step"]
        if phases:
            parts.append(" ".join(phases))
        mem = f"rss {out['memory/rss_gb']:.1f}G"
        if "memory/cuda_max_allocated_gb" in out:
            mem += f" cuda {out['memory/cuda_max_allocated_gb']:.1f}G"
        parts += [mem, f"{per_step:.1f}s/step", f"ETA {format_duration(eta)}"]
        return " | ".join(parts)

    def log_scalars(self, step: int, scalars: dict, line: str) -> None:
        """Scalars outside the step cadence (evaluation): TensorBoard, W&B and one line, rank 0."""
        if self.rank != 0:
            return
        self._write(step, scalars)
        self.info(line)

    def info(self, message: str) -> None:
        """One log line, rank 0 only."""
        if self.rank == 0:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            import wandb

            self.wandb.finish()
            wandb.teardown()  # stops W&B's service process: the run's files are complete now
            self.wandb = None
        if self.gpu is not None:
            self.gpu.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_wandb(cfg):
    """A W&B run for the telemetry section `cfg` (telemetry.wandb), in cfg.wandb_dir()."""
    try:
        import wandb
    except ImportError:
        raise ImportError(
            "telemetry.wandb.enabled=true needs the wandb package (requirements.txt: "
            "`pip install wandb==0.31.0`), or set telemetry.wandb.enabled=false"
        ) from None
    directory = cfg.wandb_dir()
    directory.mkdir(parents=True, exist_ok=True)
    # console="off": the console stays ours (W&B would wrap stdout/stderr); x_disable_stats:
    # no system-metrics sampler next to the trainer (memory/* and gpu/* are logged already).
    settings = wandb.Settings(console="off", silent=True, x_disable_stats=True)
    return wandb.init(project=cfg.wandb.project, mode=cfg.wandb.mode, dir=str(directory), settings=settings)


def _number(value) -> float:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item()
    return float(value)


def _fmt(value: float) -> str:
    if value == 0 or not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"
