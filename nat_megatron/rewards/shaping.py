"""Reward shaping that depends on the response, not on its correctness."""

from __future__ import annotations

import torch


def overlong_penalty(lengths: torch.Tensor, *, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer tokens, then falling linearly
    to -penalty at max_len (a response cut at the generation limit gets the full penalty).
    buffer = 0 turns it off."""
    if buffer <= 0 or penalty == 0:
        return torch.zeros(lengths.shape)
    if buffer > max_len:
        raise ValueError(f"reward.overlong_buffer={buffer} exceeds rollout.max_new_tokens={max_len}")
    exceed = lengths.float() - (max_len - buffer)
    return (-exceed / buffer * penalty).clamp(min=-penalty, max=0.0)
