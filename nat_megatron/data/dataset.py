"""Loading a prompt/answer dataset from a config: file or embedded set, layouts, filtering.

    ds = load_dataset(DatasetConfig(path="gsm8k_train.jsonl"), tokenizer)
    ds.examples[0].prompt_ids, ds.examples[0].answer, ds.skipped  # Counter of dropped rows

Rows that cannot be used are skipped and counted per reason (`skipped`), never fatal, and
the first MAX_PROBLEMS of them are listed with file and line (`problems`, `report()`): bad
UTF-8, bad or too deeply nested JSON, missing fields, a repeated row id (the later row is
skipped: two rows with one id would share a uid), a reference answer the reward cannot use
(`answer_check`, e.g. exact_int needs integers). A dataset left empty is a ValueError that
shows those counts.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nat_megatron.data.arithmetic import arithmetic_examples
from nat_megatron.data.chat import DEFAULT_SYSTEM_PROMPT, template_examples
from nat_megatron.data.layouts import LAYOUTS, Example, detect_layout, get_layout, parse_row
from nat_megatron.data.readers import InvalidRow, read_rows

DETECT_ROWS = 100  # rows looked at to detect a layout
MAX_PROBLEMS = 20  # skipped rows listed by file and line in the report


@dataclass
class DatasetConfig:
    """Where prompts come from and how they are filtered.

    path: a .jsonl/.parquet file, or None for the embedded arithmetic set (`split`, `size`,
    `seed` then select it). layout: "auto" or one of nat_megatron.data.layouts.LAYOUTS.
    allow_changed: resume on data whose fingerprint differs from the checkpoint's (else an error).
    """

    path: str | None = None
    layout: str = "auto"
    split: str = "train"
    size: int | None = None
    seed: int = 0
    limit: int | None = None
    max_prompt_tokens: int | None = 512
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    allow_changed: bool = False

    def __post_init__(self):
        if self.layout != "auto" and self.layout not in LAYOUTS:
            raise ValueError(f"data.layout={self.layout!r} is unknown; use 'auto' or one of {sorted(LAYOUTS)}")
        for name in ("size", "limit", "max_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"data.{name} must be > 0 or null, got {value}")


@dataclass
class PromptDataset:
    """Usable examples plus what was dropped on the way, per reason."""

    examples: list[Example]
    source: str
    layout: str
    skipped: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)  # "file:line: reason" of the first skipped rows

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    def report(self) -> str:
        """One line per reason count, then the first skipped rows by file and line."""
        lines = [f"data: {self.source}: {len(self.examples)} examples; skipped rows by reason: {dict(self.skipped)}"]
        lines += [f"data:   {p}" for p in self.problems]
        if sum(self.skipped.values()) > len(self.problems):
            lines.append(f"data:   ... ({sum(self.skipped.values()) - len(self.problems)} more)")
        return "\n".join(lines)

    def fingerprint(self) -> str:
        """Short hash of the example uids and answers: tells a resumed run the data is unchanged."""
        digest = hashlib.sha256()
        for ex in self.examples:
            digest.update(f"{ex.uid}\t{ex.answer}\n".encode())
        return digest.hexdigest()[:16]


def read_examples(
    path: str | Path,
    layout: str = "auto",
    limit: int | None = None,
    *,
    answer_check: Callable[[str], str | None] | None = None,
) -> PromptDataset:
    """Examples of a JSONL/Parquet file (no templating); bad rows skipped, counted and listed.

    answer_check(answer) -> None, or the reason the reward cannot use that reference answer.
    """
    path = Path(path).expanduser()
    rows = read_rows(path)
    head = list(itertools.islice(rows, DETECT_ROWS))
    chosen = (
        get_layout(layout)
        if layout != "auto"
        else detect_layout([r for _, r in head if not isinstance(r, InvalidRow)], str(path))
    )
    examples, skipped, problems, seen = [], Counter(), [], set()
    for number, row in itertools.chain(head, rows):
        if limit is not None and len(examples) >= limit:
            break
        result = row.reason if isinstance(row, InvalidRow) else parse_row(row, chosen, f"{path.stem}:{number}")
        if not isinstance(result, str):
            if result.uid in seen:
                result = "duplicate_id"
            elif answer_check is not None:
                result = answer_check(result.answer) or result
        if isinstance(result, str):
            skipped[result] += 1
            if len(problems) < MAX_PROBLEMS:
                problems.append(f"{path}:{number}: {result}")
        else:
            seen.add(result.uid)
            examples.append(result)
    if not examples:
        raise ValueError(
            f"data.path: no usable rows in {path} with layout {chosen.name!r} (fields {chosen.prompt_field!r}, "
            f"{chosen.answer_field!r}); skipped: {dict(skipped)}. Check data.layout and the file's fields, "
            "or point data.path at another file"
        )
    return PromptDataset(examples, source=str(path), layout=chosen.name, skipped=skipped, problems=problems)


def load_dataset(
    config: DatasetConfig,
    tokenizer: Any | None = None,
    *,
    answer_check: Callable[[str], str | None] | None = None,
) -> PromptDataset:
    """The dataset `config` describes; with a tokenizer, chat-templated and length-filtered.
    answer_check: as read_examples (the reward's, rewards/registry.py answer_check_of)."""
    if config.path is None:
        examples = arithmetic_examples(config.split, size=config.size, seed=config.seed)
        dataset = PromptDataset(
            examples[: config.limit], source=f"embedded:arithmetic/{config.split}", layout="generic"
        )
    else:
        dataset = read_examples(config.path, config.layout, config.limit, answer_check=answer_check)
    if tokenizer is None:
        return dataset
    kept, dropped = template_examples(
        dataset.examples, tokenizer, system_prompt=config.system_prompt, max_prompt_tokens=config.max_prompt_tokens
    )
    skipped = dataset.skipped + dropped
    if not kept:
        raise ValueError(
            f"all {len(dataset)} prompts of {dataset.source} are longer than "
            f"max_prompt_tokens={config.max_prompt_tokens} tokens; raise data.max_prompt_tokens"
        )
    return PromptDataset(kept, source=dataset.source, layout=dataset.layout, skipped=skipped, problems=dataset.problems)
