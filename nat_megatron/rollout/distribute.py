"""A step's rollouts, from the engines that sampled them to the replicas that train on them.

    groups = engine.generate(...)                            # this engine's share (layout.py)
    scores = gather_scores(groups, share, n, score=...)      # every sample scored once
    batch = collect(mine, prompts, keep, scores, ...)        # this replica's RolloutBatch

Every sample is scored exactly once: the ranks of an engine hold the same samples and split
the scoring between them. The scores and response lengths (a few numbers per sample) are
gathered on every rank, which is what the step's metrics and the balanced assignment of groups
to data-parallel replicas need. The tokens and log-probs travel only to the ranks that train
on them: one all-to-all over the gloo world, sent by the first rank of each engine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nat_megatron.rollout.engine import Completion
from nat_megatron.rollout.layout import EngineLayout, assign_groups

FINISH = ("stop", "length", "abort")  # finish reasons, sent as their index


@dataclass
class RolloutBatch:
    """The step's rollouts as one data-parallel replica sees them.

    `prompts[j]` and `completions[j*G:(j+1)*G]` are this replica's j-th group (ascending step
    order); `rewards`/`correct` follow `completions`. `step_*` describe every sample of the step,
    in step order (prompt i's responses at i*G..i*G+G-1), the same on every rank.
    """

    prompts: list
    prompt_index: list[int]  # each group's prompt position in the step
    completions: list[Completion]
    rewards: torch.Tensor
    correct: torch.Tensor
    group_size: int
    step_rewards: torch.Tensor
    step_correct: torch.Tensor
    step_lengths: torch.Tensor
    status: Counter = field(default_factory=Counter)

    @property
    def group_index(self) -> torch.Tensor:
        """The local group of each completion (0..len(prompts)-1)."""
        return torch.arange(len(self.completions)) // self.group_size


Score = tuple[float, bool, str]  # reward, correct, status


@dataclass
class StepScores:
    """Every sample of a step, in step order (prompt i's samples at i*G..i*G+G-1), on every rank."""

    rewards: torch.Tensor
    correct: torch.Tensor
    lengths: torch.Tensor
    status: Counter
    group_size: int

    def __add__(self, more: StepScores) -> StepScores:
        """The scores of more prompts (a resampling round) after these."""
        return StepScores(
            torch.cat([self.rewards, more.rewards]),
            torch.cat([self.correct, more.correct]),
            torch.cat([self.lengths, more.lengths]),
            self.status + more.status,
            max(self.group_size, more.group_size),
        )

    def informative(self) -> torch.Tensor:
        """[prompts] bool: the group's rewards are not all equal (so GRPO has a signal)."""
        r = self.rewards.view(-1, self.group_size)
        return (r != r[:, :1]).any(1)


def gather_scores(
    groups: Sequence[list[Completion]],
    share: range,
    num_prompts: int,
    *,
    layout: EngineLayout,
    score: Callable[[list[int], list[Completion]], list[Score]],
    group: dist.ProcessGroup,
) -> StepScores:
    """Score each sample exactly once (the ranks of an engine split its samples) and give every
    rank the scores and response lengths of all `num_prompts` prompts (a collective).

    groups: the completions of this rank's engine, for prompts `share` (indices < num_prompts).
    score(prompt_indices, completions) -> one Score per completion.
    """
    rank = dist.get_rank()
    engine = layout.engine_of(rank)
    if len(groups) != len(share):
        raise ValueError(f"engine {engine} sampled {len(groups)} groups for {len(share)} prompts")
    local = rank - layout.ranks(engine)[0]
    flat = [(i, k, c) for i, g in zip(share, groups) for k, c in enumerate(g)][local :: layout.tp]
    scores = score([i for i, _, _ in flat], [c for _, _, c in flat])
    mine = [(i, k, *sc) for (i, k, _), sc in zip(flat, scores)]
    lengths = {i: [len(c.token_ids) for c in g] for i, g in zip(share, groups)} if local == 0 else {}
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (mine, lengths), group=group)
    G = max((len(ls) for _, lens in gathered for ls in lens.values()), default=0)
    n = num_prompts * G
    out = StepScores(
        rewards=torch.zeros(n),
        correct=torch.zeros(n, dtype=torch.bool),
        lengths=torch.zeros(n, dtype=torch.long),
        status=Counter(),
        group_size=G,
    )
    for part, lens in gathered:
        for i, k, reward, ok, status in part:
            out.rewards[i * G + k], out.correct[i * G + k] = reward, ok
            out.status[status] += 1
        for i, ls in lens.items():
            out.lengths[i * G : (i + 1) * G] = torch.tensor(ls)
    return out


def collect(
    mine: dict[int, list[Completion]],
    prompts: Sequence,
    keep: Sequence[int],
    scores: StepScores,
    *,
    layout: EngineLayout,
    replicas: int,
    replica_of: Sequence[int],
    group: dist.ProcessGroup,
) -> RolloutBatch:
    """This replica's RolloutBatch: the groups `keep` (indices into `prompts`) go whole to the
    data-parallel replicas, balanced by tokens (a collective over `group`).

    mine: this rank's engine's groups by prompt index. prompts: every prompt sampled this step,
    the same on every rank; scores: theirs. replica_of[r]: the replica of global rank r.
    """
    G = scores.group_size
    keep = list(keep)
    prompt_tokens = torch.tensor([len(prompts[i].prompt_ids) for i in keep])
    group_tokens = (scores.lengths.view(-1, G)[keep] + prompt_tokens[:, None]).sum(1)
    owner = dict(zip(keep, assign_groups(group_tokens.tolist(), replicas)))
    received = route(mine, owner, layout=layout, replica_of=replica_of, group=group)
    order = sorted(received)
    take = torch.tensor([i * G + k for i in order for k in range(G)], dtype=torch.long)
    return RolloutBatch(
        prompts=[prompts[i] for i in order],
        prompt_index=order,
        completions=[c for i in order for c in received[i]],
        rewards=scores.rewards[take],
        correct=scores.correct[take],
        group_size=G,
        step_rewards=scores.rewards,
        step_correct=scores.correct,
        step_lengths=scores.lengths,
        status=scores.status,
    )


def route(
    mine: dict[int, list[Completion]],
    owner: dict[int, int],
    *,
    layout: EngineLayout,
    replica_of: Sequence[int],
    group: dist.ProcessGroup,
) -> dict[int, list[Completion]]:
    """Send each group in `owner` from its engine's first rank to every rank of its replica.

    Returns {prompt index: completions} of the groups this rank's replica trains on.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    sends = [[] for _ in range(world)]
    if rank == layout.ranks(layout.engine_of(rank))[0]:
        for i, g in sorted(mine.items()):
            if i not in owner:
                continue
            packed = _pack(i, g)
            for dst in range(world):
                if replica_of[dst] == owner[i]:
                    sends[dst].append(packed)
    payload = [torch.cat(s) if s else torch.zeros(0, dtype=torch.float64) for s in sends]
    counts_out = torch.tensor([len(p) for p in payload], dtype=torch.long)
    counts_in = torch.empty_like(counts_out)
    dist.all_to_all_single(counts_in, counts_out, group=group)
    received = torch.empty(int(counts_in.sum()), dtype=torch.float64)
    dist.all_to_all_single(
        received,
        torch.cat(payload),
        output_split_sizes=counts_in.tolist(),
        input_split_sizes=counts_out.tolist(),
        group=group,
    )
    return _unpack(received)


def _pack(index: int, group: list[Completion]) -> torch.Tensor:
    """[index, G, then per completion: T, finish, T token ids, T log-probs] as float64 (exact
    for token ids and for the engine's fp32 log-probs)."""
    parts = [torch.tensor([index, len(group)], dtype=torch.float64)]
    for c in group:
        parts.append(torch.tensor([len(c.token_ids), FINISH.index(c.finish_reason)], dtype=torch.float64))
        parts.append(torch.tensor(c.token_ids, dtype=torch.float64))
        parts.append(torch.tensor(c.logprobs, dtype=torch.float64))
    return torch.cat(parts)


def _unpack(flat: torch.Tensor) -> dict[int, list[Completion]]:
    out, at = {}, 0
    values = flat.tolist()
    while at < len(values):
        index, n = int(values[at]), int(values[at + 1])
        at += 2
        group = []
        for _ in range(n):
            T, finish = int(values[at]), int(values[at + 1])
            at += 2
            tokens = [int(t) for t in values[at : at + T]]
            logprobs = values[at + T : at + 2 * T]
            at += 2 * T
            group.append(Completion(token_ids=tokens, logprobs=logprobs, finish_reason=FINISH[finish]))
        out[index] = group
    return out
