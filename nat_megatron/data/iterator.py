"""Endless, deterministic, resumable batches over a dataset.

Epoch e visits the examples in a permutation drawn from random.Random(seed, e) (or in file
order with shuffle=False); batches run across epoch boundaries, so every batch is full.
The position is a small dict (`state_dict`) that a checkpoint stores; `load_state_dict`
continues with exactly the batch that would have come next.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any


class DataIterator:
    """Batches of `batch_size` items from `dataset` (any sequence), forever."""

    def __init__(self, dataset: Sequence[Any], *, batch_size: int, seed: int = 0, shuffle: bool = True):
        if len(dataset) == 0:
            raise ValueError("cannot iterate over an empty dataset; check the data config")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # index into the current epoch's order
        self._order_epoch, self._order = -1, []
        # A PromptDataset can say whether its content changed, not just its length.
        fingerprint = getattr(dataset, "fingerprint", None)
        self.fingerprint = fingerprint() if callable(fingerprint) else None

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            order = list(range(len(self.dataset)))
            if self.shuffle:
                # Integer seed: Random's seeding and shuffle are stable across Python versions.
                random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
            self._order_epoch, self._order = self.epoch, order
        return self._order

    def next_batch(self) -> list[Any]:
        """The next `batch_size` items, moving to the next epoch when one runs out."""
        batch = []
        while len(batch) < self.batch_size:
            order = self._epoch_order()
            take = order[self.position : self.position + self.batch_size - len(batch)]
            batch.extend(self.dataset[i] for i in take)
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return batch

    def __iter__(self):
        return self

    def __next__(self) -> list[Any]:
        return self.next_batch()

    def state_dict(self) -> dict:
        """Position to store in a checkpoint (plain ints/bools, JSON-serialisable)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_examples": len(self.dataset),
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict, *, allow_changed: bool = False) -> None:
        """Continue from `state`; ValueError if it was taken on a different dataset or seed.

        allow_changed (data.allow_changed): the dataset may differ; the epoch is kept and the
        position wraps into the new dataset's length.
        """
        mine = {"seed": self.seed, "shuffle": self.shuffle, "num_examples": len(self.dataset)}
        if self.fingerprint is not None and state.get("fingerprint") is not None:
            mine["fingerprint"] = self.fingerprint
        if allow_changed:
            mine.pop("num_examples")
            mine.pop("fingerprint", None)
            state = dict(state, position=int(state["position"]) % len(self.dataset))
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(
                    f"data iterator state has {key}={state.get(key)!r} but this run has {value!r}; "
                    "resume with the same dataset and data seed, or start the data position afresh"
                )
        if not 0 <= state["position"] < len(self.dataset) or state["epoch"] < 0:
            raise ValueError(f"data iterator state out of range: {state}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
