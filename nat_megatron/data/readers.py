"""Raw rows from local files: JSON Lines (.jsonl/.json lines) and Parquet (pyarrow).

Readers yield `(row_number, row)`; a line that cannot be a row yields `(row_number,
InvalidRow(reason))` so the caller can count it, name its file and line, and go on instead of
failing the whole file: invalid_utf8, invalid_json, too_deep (nesting beyond Python's
recursion limit) and line_too_long (over MAX_LINE_BYTES, skipped without being held in memory).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
MAX_LINE_BYTES = 16 << 20  # a prompt/answer row is kilobytes; 16 MiB is a broken file


@dataclass(frozen=True)
class InvalidRow:
    """Marker for a line that is not a usable JSON value, and why."""

    reason: str


INVALID = InvalidRow("invalid_json")


def _lines(handle, limit: int) -> Iterator[bytes | None]:
    """Lines of a binary file; None for a line over `limit` bytes (its rest is skipped)."""
    while line := handle.readline(limit + 1):
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := handle.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield line


def parse_line(line: bytes | None) -> Any:
    """One JSONL line as a value, or an InvalidRow naming what is wrong with it."""
    if line is None:
        return InvalidRow("line_too_long")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return InvalidRow("invalid_utf8")
    try:
        return json.loads(text)
    except RecursionError:
        return InvalidRow("too_deep")
    except ValueError:  # JSONDecodeError, and integers past Python's digit limit
        return InvalidRow("invalid_json")


def read_jsonl(path: Path, *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, Any]]:
    """Rows of a JSON Lines file (1-based line numbers); blank lines are ignored."""
    with open(path, "rb") as handle:
        for number, line in enumerate(_lines(handle, max_line_bytes), start=1):
            if line is not None and not line.strip():
                continue
            yield number, parse_line(line)


def read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a Parquet file as dicts (1-based row numbers), read one record batch at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"reading {path} needs pyarrow: `pip install pyarrow` (or convert it to JSONL)") from err
    import pyarrow as pa

    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except (pa.ArrowException, OSError) as e:  # a damaged file: the rows after `number` are lost
        raise ValueError(
            f"data.path: {path} is not a readable Parquet file after row {number} "
            f"({type(e).__name__}: {e}); re-download or convert it"
        ) from None


def read_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Rows of `path`, the format chosen by its suffix."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"dataset file {path} does not exist; fix data.path")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return read_jsonl(path)
    if suffix in PARQUET_SUFFIXES:
        return read_parquet(path)
    raise ValueError(f"cannot read {path}: unknown suffix {suffix!r}; use one of {JSONL_SUFFIXES + PARQUET_SUFFIXES}")
