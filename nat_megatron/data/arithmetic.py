"""The embedded dataset: generated arithmetic word problems with integer answers.

Deterministic in (seed, index): the same seed always gives the same problems in the same
order, on any machine. One- and two-step problems with small numbers, so a 135M instruct
model solves some but far from all of them (see `ONE_STEP_WEIGHT`), which leaves room for RL.
The test split is the first `test_size` unique problems of the stream and the train split
the ones after, so the two never share a question.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from nat_megatron.data.layouts import Example

NAMES = (
    "Tom",
    "Anna",
    "Ben",
    "Lucy",
    "Sam",
    "Mia",
    "Leo",
    "Emma",
    "Jack",
    "Sara",
    "Noah",
    "Lily",
    "Max",
    "Zoe",
    "Omar",
    "Nina",
    "Ivan",
    "Rosa",
    "Paul",
    "Kate",
)
# (singular, plural)
ITEMS = (
    ("apple", "apples"),
    ("pencil", "pencils"),
    ("marble", "marbles"),
    ("cookie", "cookies"),
    ("sticker", "stickers"),
    ("book", "books"),
    ("orange", "oranges"),
    ("card", "cards"),
    ("shell", "shells"),
    ("balloon", "balloons"),
    ("candy", "candies"),
    ("toy car", "toy cars"),
    ("egg", "eggs"),
    ("flower", "flowers"),
    ("coin", "coins"),
)

Template = Callable[[random.Random, str, str, str, str], tuple[str, int]]


def _add(r, n, m, item, items):
    a, b = r.randint(1, 9), r.randint(1, 9)
    return f"{n} has {a} {items}. {n} gets {b} more {items}. How many {items} does {n} have now?", a + b


def _sub(r, n, m, item, items):
    b = r.randint(1, 8)
    a = r.randint(b + 1, 12)
    return f"{n} has {a} {items} and gives {b} of them to {m}. How many {items} does {n} have left?", a - b


def _mul(r, n, m, item, items):
    a, b = r.randint(2, 5), r.randint(2, 5)
    return f"{n} has {a} bags with {b} {items} in each bag. How many {items} does {n} have?", a * b


def _div(r, n, m, item, items):
    a, b = r.randint(2, 5), r.randint(2, 5)
    return (f"{n} shares {a * b} {items} equally among {a} friends. How many {items} does each friend get?"), b


def _add_sub(r, n, m, item, items):
    a, b = r.randint(2, 9), r.randint(2, 9)
    c = r.randint(1, 5)
    return (
        f"{n} has {a} {items}. {n} gets {b} more and then gives {c} to {m}. How many {items} does {n} have now?"
    ), a + b - c


def _mul_add(r, n, m, item, items):
    a, b, c = r.randint(2, 4), r.randint(2, 5), r.randint(1, 5)
    return (
        f"{n} has {a} boxes with {b} {items} in each box and {c} more {items} on the table. "
        f"How many {items} does {n} have in all?"
    ), a * b + c


def _change(r, n, m, item, items):
    a, b = r.randint(1, 3), r.randint(2, 3)
    dollars = "dollar" if a == 1 else "dollars"
    return (
        f"One {item} costs {a} {dollars}. {n} buys {b} {items} and pays with a 10 dollar bill. "
        f"How many dollars of change does {n} get?"
    ), 10 - a * b


def _together(r, n, m, item, items):
    a, b = r.randint(2, 9), r.randint(1, 5)
    return (
        f"{n} has {a} {items}. {m} has {b} more {items} than {n}. How many {items} do {n} and {m} have together?"
    ), a + (a + b)


ONE_STEP: tuple[Template, ...] = (_add, _sub, _mul, _div)
TWO_STEP: tuple[Template, ...] = (_add_sub, _mul_add, _change, _together)
# Share of one-step problems; tuned on SmolLM2-135M-Instruct greedy accuracy.
ONE_STEP_WEIGHT = 0.7


def _stream(seed: int) -> Iterator[tuple[str, int]]:
    """Endless unique (question, answer) pairs for `seed`."""
    rng = random.Random(seed)
    seen: set[str] = set()
    while True:
        template = rng.choice(ONE_STEP if rng.random() < ONE_STEP_WEIGHT else TWO_STEP)
        name, other = rng.sample(NAMES, 2)
        item, items = rng.choice(ITEMS)
        question, answer = template(rng, name, other, item, items)
        if question not in seen:
            seen.add(question)
            yield question, answer


def arithmetic_examples(
    split: str = "train", *, size: int | None = None, seed: int = 0, test_size: int = 256
) -> list[Example]:
    """`size` problems of `split` ("train": 4096 by default, "test": `test_size`)."""
    if split not in ("train", "test"):
        raise ValueError(f"embedded dataset split must be 'train' or 'test', got {split!r}")
    if split == "test":
        size = test_size if size is None else min(size, test_size)
    elif size is None:
        size = 4096
    if size <= 0 or test_size < 0:
        raise ValueError(f"embedded dataset size must be > 0 (got size={size}, test_size={test_size})")
    start = 0 if split == "test" else test_size
    examples = []
    for index, (question, answer) in enumerate(_stream(seed)):
        if index >= start + size:
            break
        if index >= start:
            uid = f"arith-s{seed}:{index}"
            examples.append(Example(uid=uid, question=question, answer=str(answer)))
    return examples
