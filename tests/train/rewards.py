"""A test-only reward that a random tiny model earns unevenly (math rewards would all be 0).

Importing this module registers it. GRPO with all-equal rewards has zero advantages, so no
gradient: the RL-loop tests need rewards that differ within a group to move the weights.
"""

import zlib

from nat_megatron.rewards.registry import Score, register_reward

NAME = "test_text_hash"


@register_reward(NAME)
def text_hash_reward(completion: str, answer: str) -> Score:
    """Deterministic and varied: a hash of the completion's text, in [0, 1)."""
    r = (zlib.crc32(completion.encode()) % 1000) / 1000
    return Score(r, r > 0.5, None, "ok")
