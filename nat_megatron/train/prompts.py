"""The trainer's prompts: the dataset of its config, less the rows whose reference answer its
reward cannot use. data/ reads datasets and knows no rewards; the trainer joins the two."""

from __future__ import annotations

import dataclasses
from typing import Any

from nat_megatron.data.dataset import DatasetConfig, PromptDataset
from nat_megatron.data.dataset import load_dataset as read_dataset
from nat_megatron.rewards import answer_check_of


def load_dataset(config: DatasetConfig, tokenizer: Any | None = None, *, reward: str | None = None) -> PromptDataset:
    """data.load_dataset; with `reward` (a reward name) the reference answers that reward cannot
    use are skipped and counted (e.g. exact_int needs integers)."""
    answer_check = answer_check_of(reward) if reward is not None else None
    return read_dataset(config, tokenizer, answer_check=answer_check)


def held_out_prompts(cfg: Any, tokenizer: Any) -> list:
    """The evaluation's prompts (eval.*): the test split of eval.path (or of the embedded
    problems), read with the training data's settings, up to eval.limit."""
    held_out = dataclasses.replace(cfg.data, path=cfg.eval.path, split="test", limit=cfg.eval.limit)
    return load_dataset(held_out, tokenizer).examples
