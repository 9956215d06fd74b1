"""Checkpoint integrity: a manifest of sizes and hashes, durable renames, and which checkpoint
to resume from.

A checkpoint is TRUSTED input. torch's distributed-checkpoint reader unpickles `.metadata`
and `common.pt`, so a crafted file in a checkpoint directory runs code when it is loaded. The
manifest written at save (size + blake2b of every file) catches truncated, corrupted and
swapped files, and a checkpoint whose files do not match it is refused before anything is
unpickled. It is not a signature: whoever can write the directory can write a matching
manifest, so only point checkpoint.dir / checkpoint.resume at directories your own jobs wrote.

Resume order: the complete checkpoints (`step_NNNNNN/` with metadata.json) newest step first;
the `latest` pointer is only a hint, and a bad one (empty, missing target, target without
metadata.json) is reported, never a reason to start again at step 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

MANIFEST = "manifest.json"
LATEST = "latest"
COMPLETE_MARK = "metadata.json"  # torch_dist writes it last: its presence means the save finished
_STEP_RE = re.compile(r"^step_(\d+)$")
_CHUNK = 1 << 20


def file_digest(path: Path) -> tuple[int, str]:
    """(size, blake2b-128 hex) of a file, read in 1 MiB chunks."""
    h, size = hashlib.blake2b(digest_size=16), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk (a rename is only durable once the data it points at is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_files(root: Path) -> list[str]:
    """Every regular file under root (relative, sorted), the manifest itself excepted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def hash_share(root: Path, names: list[str], *, rank: int = 0, world: int = 1) -> dict[str, list]:
    """Size and hash of this rank's share of `names` (every world-th), each fsynced on the way:
    ranks hash in parallel, and the save is on disk before it is renamed into place."""
    out = {}
    for name in names[rank::world]:
        fsync_file(root / name)
        out[name] = list(file_digest(root / name))
    return out


def write_manifest(root: Path, entries: dict[str, list]) -> None:
    """root/manifest.json with every file's [size, hash], synced."""
    path = root / MANIFEST
    path.write_text(json.dumps({"hash": "blake2b-128", "files": dict(sorted(entries.items()))}, indent=0))
    fsync_file(path)


def verify_share(root: Path, *, rank: int = 0, world: int = 1) -> list[str]:
    """What is wrong with this rank's share of root's files against its manifest ([] if all match)."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return [f"{root} has no {MANIFEST} (not written by this trainer, or an older version)"] if rank == 0 else []
    except (ValueError, KeyError, TypeError) as e:
        return [f"{root / MANIFEST} is unreadable ({e.__class__.__name__})"] if rank == 0 else []
    problems = []
    for name in sorted(files)[rank::world]:
        size, digest = files[name]
        path = root / name
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        got = path.stat().st_size
        if got != size:
            problems.append(f"{path} has {got} bytes, the manifest says {size} (truncated or overwritten)")
        elif file_digest(path)[1] != digest:
            problems.append(f"{path} does not match its hash in the manifest (corrupted)")
    return problems


def step_of(path: Path) -> int | None:
    """N of a `step_N` directory name, else None."""
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def complete_checkpoints(root: Path) -> list[Path]:
    """root's finished `step_N` checkpoints, newest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None and (p / COMPLETE_MARK).is_file()]
    return sorted(found, key=step_of, reverse=True)


def pointer_problem(root: Path) -> str | None:
    """Why root/latest does not name a complete checkpoint, or None when it does (or is absent)."""
    marker = root / LATEST
    if not marker.exists():
        return None
    try:
        name = marker.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        return f"{marker} is unreadable ({e.__class__.__name__})"
    if not name:
        return f"{marker} is empty"
    target = root / name
    if not target.is_dir():
        return f"{marker} names {name!r}, which does not exist"
    if not (target / COMPLETE_MARK).is_file():
        return f"{marker} names {name!r}, which has no {COMPLETE_MARK} (an unfinished save)"
    return None


def write_pointer(root: Path, name: str) -> None:
    """Point root/latest at `name`: write, sync, rename over the old one, sync the directory."""
    tmp = root / f"{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    fsync_dir(root)


def prune(root: Path, keep_last: int, *, protect: tuple[Path | None, ...] = ()) -> list[Path]:
    """Delete complete checkpoints beyond the keep_last highest steps; never one in `protect`
    (the one just saved, the one this run resumed from). Returns what was deleted."""
    keep = {Path(p).resolve() for p in protect if p is not None}
    deleted = []
    for old in complete_checkpoints(root)[keep_last:]:
        if old.resolve() not in keep:
            shutil.rmtree(old, ignore_errors=True)
            deleted.append(old)
    return deleted
