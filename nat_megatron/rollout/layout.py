"""Who generates what, and who trains on what: pure functions, the same on every rank.

- Engines: the world is cut into world / rollout.tp engines of rollout.tp consecutive ranks
  (vLLM's external_launcher does the same cut; consecutive ranks share a node, as tensor
  parallelism needs). Engine e samples a contiguous share of the step's prompts; a prompt's
  group of responses never splits across engines.
- Seeds: prompt i of step s is sampled with its own seed, so what it gets does not depend on
  the engine layout, the batch it shares, or whether the run was resumed.
- Training shares: whole groups go to data-parallel replicas, balanced by token count (the
  slowest replica sets the step's pace); a replica's groups stay in step order. Whole groups
  keep every group statistic (GRPO's mean and std, OTB's baseline) inside one replica.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineLayout:
    """world ranks cut into engines of `tp` consecutive ranks."""

    world: int
    tp: int

    def __post_init__(self):
        if self.tp < 1 or self.world % self.tp:
            raise ValueError(
                f"rollout.tp={self.tp} must divide the world size {self.world} "
                "(every rank belongs to one engine); change rollout.tp"
            )

    @property
    def engines(self) -> int:
        return self.world // self.tp

    def engine_of(self, rank: int) -> int:
        return rank // self.tp

    def ranks(self, engine: int) -> range:
        """Global ranks of `engine`; the first one sends its samples to the trainers."""
        return range(engine * self.tp, (engine + 1) * self.tp)

    def prompt_share(self, engine: int, num_prompts: int) -> range:
        """Indices of the step's prompts that `engine` samples (contiguous, sizes differ by <= 1)."""
        base, extra = divmod(num_prompts, self.engines)
        start = engine * base + min(engine, extra)
        return range(start, start + base + (engine < extra))


def request_seed(seed: int, step: int, prompt_index: int) -> int:
    """The sampling seed of prompt `prompt_index` in step `step` of a run seeded `seed`."""
    return zlib.crc32(f"{seed}/{step}/{prompt_index}".encode())


def assign_groups(group_tokens: list[int], replicas: int) -> list[int]:
    """The data-parallel replica that trains each group: greedy longest-first onto the least
    loaded replica (ties: the lower index), so replicas get nearly equal token counts."""
    load = [0] * replicas
    owner = [0] * len(group_tokens)
    for g in sorted(range(len(group_tokens)), key=lambda g: (-group_tokens[g], g)):
        r = min(range(replicas), key=lambda r: (load[r], r))
        owner[g] = r
        load[r] += group_tokens[g]
    return owner


def choose_groups(informative: list[bool], need: int, replicas: int) -> list[int]:
    """DAPO's dynamic sampling: the first `need` informative groups (rewards not all equal), in
    order; if fewer than `replicas` are informative, uninformative ones fill up to one per
    data-parallel replica (their advantages are 0: they keep every replica in the step)."""
    useful = [i for i, ok in enumerate(informative) if ok][:need]
    fill = [i for i, ok in enumerate(informative) if not ok][: max(0, replicas - len(useful))]
    return sorted(useful + fill)
