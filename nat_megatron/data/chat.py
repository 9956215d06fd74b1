"""Chat templating of problems and prompt-length filtering, with the tokenizer of the policy.

The prompt text and token ids come from the tokenizer's own chat template, so rollouts see
exactly what the model saw in instruction tuning. Templated text already holds the special
tokens, so it is tokenized with add_special_tokens=False (no second BOS).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from nat_megatron.data.layouts import Example

# Short on purpose: SmolLM2-135M-Instruct got longer-winded (and less accurate) with a
# "solve step by step" persona line, and ran out of tokens before the answer.
DEFAULT_SYSTEM_PROMPT = "Solve the math problem. Put the final answer in \\boxed{}."


def chat_messages(question: str, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[dict]:
    """The conversation for one problem: an optional system line, then the user's question."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": question}]


def render_prompt(tokenizer: Any, question: str, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    """Prompt text ending where the assistant's answer starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} has no chat "
            "template; use an instruct model's tokenizer or set one (tokenizer.chat_template = ...)"
        )
    return tokenizer.apply_chat_template(
        chat_messages(question, system_prompt), tokenize=False, add_generation_prompt=True
    )


def template_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    max_prompt_tokens: int | None = None,
) -> tuple[list[Example], Counter]:
    """Fill `prompt` and `prompt_ids`; drop prompts over `max_prompt_tokens` (counted as too_long)."""
    if max_prompt_tokens is not None and max_prompt_tokens <= 0:
        raise ValueError(f"max_prompt_tokens must be > 0 or None, got {max_prompt_tokens}")
    texts = [render_prompt(tokenizer, ex.question, system_prompt) for ex in examples]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    kept, dropped = [], Counter()
    for example, text, token_ids in zip(examples, texts, ids):
        if max_prompt_tokens is not None and len(token_ids) > max_prompt_tokens:
            dropped["too_long"] += 1
            continue
        kept.append(replace(example, prompt=text, prompt_ids=tuple(token_ids)))
    return kept, dropped
