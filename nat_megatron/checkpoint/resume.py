"""Which checkpoint a run resumes from, and whether it belongs to this run.

Auto resume tries the complete checkpoints of checkpoint.dir newest step first. One that
fails its manifest check (integrity.py) or fails to load is named in a warning and the
previous one is tried; only when none loads is it an error (never a silent restart at step
0, whose first save would prune the good checkpoints away). A checkpoint that loads but was
saved by a run of another meaning (model, data, NAT, loss, group size, ...) or on another
dataset is an error naming what differs, not a fallback: every older checkpoint of that
directory would differ the same way.

Caveat: a load that fails on one rank inside one of Megatron's collectives can leave the
other ranks waiting; the manifest check (collective, same verdict on every rank) runs first
so that damaged files are caught before that.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nat_megatron.checkpoint.dist_ckpt import CheckpointError, load_checkpoint, read_meta, verify_checkpoint
from nat_megatron.checkpoint.integrity import COMPLETE_MARK, complete_checkpoints, pointer_problem

# Config keys whose change alters what the run computes. The others (train.steps, checkpoint.*,
# telemetry.*, eval.*, parallel.* since checkpoints are layout-independent, reward.timeout,
# rollout engine layout and memory) may change between submissions of one run.
MEANING_KEYS = (
    "model",
    "data",
    "nat",
    "loss",
    "advantage",
    "optim",
    "reward.name",
    "reward.bingo",
    "reward.overlong_buffer",
    "reward.overlong_penalty",
    "rollout.group_size",
    "rollout.temperature",
    "rollout.top_p",
    "rollout.max_new_tokens",
    "rollout.filter_groups",
    "rollout.max_resample",
    "train.prompts_per_step",
    "train.seed",
    "train.mini_batches",
    "train.epochs",
)
# Switches that only say what a resume may accept.
_NEVER_COMPARED = ("data.allow_changed",)


def warn(message: str) -> None:
    """A warning in the job log (rank 0 only: every rank reaches the same verdicts)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"checkpoint: warning: {message}", file=sys.stderr, flush=True)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_changes(stored: dict, current: dict, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys under MEANING_KEYS whose values differ between two config dicts, sorted."""
    a, b = flatten(stored), flatten(current)

    def meaningful(key: str) -> bool:
        under = lambda roots: any(key == r or key.startswith(r + ".") for r in roots)  # noqa: E731
        return under(MEANING_KEYS) and not under(_NEVER_COMPARED + skip)

    return sorted(k for k in set(a) | set(b) if meaningful(k) and a.get(k, "<absent>") != b.get(k, "<absent>"))


def check_run(path: Path, meta: dict | None, *, config: dict, fingerprint: str | None) -> None:
    """ValueError when `path` was saved by a run of another meaning or on another dataset,
    unless checkpoint.allow_config_change / data.allow_changed say to accept it (warning)."""
    if meta is None:
        raise ValueError(
            f"checkpoint.resume: {path} has no run.json: it was not saved by the RL trainer "
            "(a converted checkpoint?); load its weights through model.hf_dir instead"
        )
    config = json.loads(json.dumps(config, default=str))  # compared as saved: tuples as lists
    allow_config = config["checkpoint"].get("allow_config_change", False)
    allow_data = config["data"].get("allow_changed", False)
    changed = config_changes(meta.get("config", {}), config, skip=("data",) if allow_data else ())
    if changed:
        stored = flatten(meta.get("config", {}))
        now = flatten(config)
        detail = ", ".join(f"{k}: {stored.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}" for k in changed[:8])
        if not allow_config:
            raise ValueError(
                f"checkpoint.allow_config_change: resuming {path} with a config that changes the "
                f"run's meaning ({detail}); use the saved values, another checkpoint.dir, or set "
                "checkpoint.allow_config_change=true to resume anyway"
            )
        warn(f"resuming {path} with changed keys (checkpoint.allow_config_change=true): {detail}")
    saved = meta.get("data_fingerprint")
    if saved is not None and fingerprint is not None and saved != fingerprint:
        if not allow_data:
            raise ValueError(
                f"data.allow_changed: the dataset differs from the one {path} was trained on "
                f"(fingerprint {saved} then, {fingerprint} now); point data.path at the original "
                "data, or set data.allow_changed=true to continue on the new data"
            )
        warn(f"dataset changed since {path} (fingerprint {saved} -> {fingerprint}); data.allow_changed=true")


def _same_on_all_ranks(obj):
    box = [obj]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _any_rank(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda(torch.cuda.current_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def resume_checkpoint(
    root: str | Path,
    explicit: str | Path | None,
    chunks: list,
    *,
    optimizer=None,
    check: Callable[[Path, dict | None], None] = lambda path, meta: None,
) -> tuple[Path, dict] | None:
    """Collective: load the checkpoint to resume from; returns (path, extra) or None for none.

    explicit: that checkpoint only (any failure is an error); else the complete checkpoints
    under root, newest first. `check(path, run_meta)` raises when a checkpoint belongs to
    another run (no fallback for that).
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not (path / COMPLETE_MARK).is_file():
            raise ValueError(
                f"checkpoint.resume: {path} is not a complete checkpoint (no {COMPLETE_MARK}); "
                "give a step_NNNNNN directory that a finished save wrote, or 'auto'"
            )
        candidates = [path]
    else:
        root = Path(root)
        problem = pointer_problem(root)
        if problem:
            warn(f"{problem}; looking for the newest complete checkpoint instead")
        candidates = _same_on_all_ranks(complete_checkpoints(root))
    failures = []
    for path in candidates:
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            if explicit is not None:
                raise ValueError(f"checkpoint.resume: {e}") from None
            warn(f"{e}; trying the previous complete checkpoint")
            failures.append(str(path))
            continue
        check(path, read_meta(path))
        error = None
        try:
            extra = load_checkpoint(path, chunks, optimizer=optimizer, verify=False)
        except Exception as e:  # noqa: BLE001 - any failure to load means: try the previous one
            error = f"{type(e).__name__}: {str(e)[:300]}"
        if not _any_rank(error is not None):
            return path, extra
        if explicit is not None:
            raise ValueError(f"checkpoint.resume: {path} failed to load ({error or 'on another rank'})")
        warn(f"{path} failed to load ({error or 'on another rank'}); trying the previous complete checkpoint")
        failures.append(str(path))
    if failures:
        raise ValueError(
            f"checkpoint.dir: none of the complete checkpoints under {root} can be resumed from "
            f"({', '.join(failures)}; see the warnings above); move them away to start afresh, "
            "or set checkpoint.resume to one that loads"
        )
    return None
