"""Prompt/answer datasets: file readers and layouts, the embedded arithmetic set, chat
templating with length filtering, and a resumable batch iterator.

    from nat_megatron.data import DatasetConfig, load_dataset, DataIterator
    ds = load_dataset(DatasetConfig(), tokenizer)          # embedded arithmetic problems
    it = DataIterator(ds, batch_size=8, seed=1)
    batch = it.next_batch(); state = it.state_dict()       # store `state` in a checkpoint
"""

from nat_megatron.data.arithmetic import arithmetic_examples
from nat_megatron.data.chat import DEFAULT_SYSTEM_PROMPT, chat_messages, render_prompt, template_examples
from nat_megatron.data.dataset import DatasetConfig, PromptDataset, load_dataset, read_examples
from nat_megatron.data.iterator import DataIterator
from nat_megatron.data.layouts import LAYOUTS, Example, Layout, detect_layout, get_layout, parse_row
from nat_megatron.data.readers import read_rows

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "DataIterator",
    "DatasetConfig",
    "Example",
    "LAYOUTS",
    "Layout",
    "PromptDataset",
    "arithmetic_examples",
    "chat_messages",
    "detect_layout",
    "get_layout",
    "load_dataset",
    "parse_row",
    "read_examples",
    "read_rows",
    "render_prompt",
    "template_examples",
]
