"""Raw rows from local files: JSON Lines (.jsonl/.json lines) and Parquet (needs pyarrow).

Readers yield `(row_number, row)`; an unparseable JSON line yields `(row_number, INVALID)`
so the caller can count it and go on instead of failing the whole file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

INVALID = object()  # marker for a line that is not valid JSON
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a JSON Lines file (1-based line numbers); blank lines are ignored."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError:
                yield number, INVALID


def read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a Parquet file as dicts (1-based row numbers), read one record batch at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"reading {path} needs pyarrow: `pip install pyarrow` (or convert it to JSONL)") from err
    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            yield number, row


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
    raise ValueError(
        f"cannot read {path}: unknown suffix {suffix!r}; use one of {JSONL_SUFFIXES + PARQUET_SUFFIXES}"
    )
