"""No tracked file points outside the repository: no path of the machine it was written on
(/work/..., a home directory, a tool's job directory) and no relative path that climbs above
the repository root (e.g. a design folder beside the clone). A clone must work wherever it is checked out."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Absolute paths of some machine. (This file names them, so it is not searched.)
OUTSIDE = re.compile(r"(?<![\w.~-])/(?:work|home/[\w.-]+|Users/[\w.-]+|root)(?:/|\b)|/tmp/bash_jobs")
CLIMB = re.compile(r"(?<![\w.])((?:\.\./)+)")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, text=True
    ).stdout.split("\0")
    out = []
    for name in filter(None, names):
        path = ROOT / name
        if path == Path(__file__).resolve() or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        out.append(path)
    return out


def outside_references(name: str, text: str) -> list[str]:
    """'name:line: text' for every reference in file `name` (relative to the root) that leaves
    the repository."""
    depth = len(Path(name).parts) - 1  # directories between the root and the file
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        climbs = [len(m.group(1)) // 3 for m in CLIMB.finditer(line)]
        if OUTSIDE.search(line) or any(c > depth for c in climbs):
            found.append(f"{name}:{number}: {line.strip()[:160]}")
    return found


def test_no_tracked_file_refers_outside_the_repository():
    files = tracked_text_files()
    assert len(files) > 50, "git ls-files found too little: is this a git checkout?"
    found = [hit for path in files for hit in outside_references(str(path.relative_to(ROOT)), path.read_text())]
    assert not found, "references outside the repository:\n" + "\n".join(found)


def test_the_check_finds_each_kind():
    lines = [
        "see ../README.md",  # inside: the file is one directory below the root
        "data in ../../design/x",  # above the root
        "cd /work/main && make",
        "/tmp/bash_jobs.1000/3/stdout",
        "cache in /home/alice/.cache",
        "~/.cache/nat_megatron and runs/tb are fine",
    ]
    hits = outside_references("docs/example.md", "\n".join(lines))
    assert [h.split(":")[1] for h in hits] == ["2", "3", "4", "5"], hits
