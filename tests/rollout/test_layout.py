"""Who samples and who trains what (rollout/layout.py, distribute.py's StepScores): by hand."""

from collections import Counter

import pytest
import torch

from nat_megatron.rollout.distribute import StepScores
from nat_megatron.rollout.layout import EngineLayout, assign_groups, choose_groups, request_seed


def test_engine_layout_and_prompt_shares():
    lay = EngineLayout(world=8, tp=2)
    assert lay.engines == 4 and lay.engine_of(5) == 2 and list(lay.ranks(2)) == [4, 5]
    shares = [lay.prompt_share(e, 10) for e in range(4)]
    assert [list(s) for s in shares] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert [len(EngineLayout(world=4, tp=1).prompt_share(e, 2)) for e in range(4)] == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="rollout.tp=3 must divide the world size 8"):
        EngineLayout(world=8, tp=3)


def test_request_seeds_are_stable_and_distinct():
    assert request_seed(0, 3, 7) == request_seed(0, 3, 7)
    seeds = {request_seed(s, t, i) for s in range(3) for t in range(5) for i in range(20)}
    assert len(seeds) == 3 * 5 * 20


def test_assign_groups_balances_tokens():
    owner = assign_groups([100, 10, 60, 50, 40], replicas=2)
    load = Counter()
    for g, r in enumerate(owner):
        load[r] += [100, 10, 60, 50, 40][g]
    assert sorted(load.values()) == [120, 140]  # longest first onto the lighter replica
    assert sorted(set(assign_groups([5, 5, 5], replicas=3))) == [0, 1, 2]  # each replica one


def test_dynamic_sampling_filter_by_hand():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5])  # 4 groups of 2
    s = StepScores(rewards, rewards > 0, torch.ones(8, dtype=torch.long), Counter(), group_size=2)
    assert s.informative().tolist() == [False, True, False, False]
    assert choose_groups(s.informative().tolist(), need=2, replicas=1) == [1]
    # Fewer informative groups than replicas: uninformative ones fill up, in order.
    assert choose_groups([False, True, False, False], need=4, replicas=3) == [0, 1, 2]
    assert choose_groups([True, True, True, True], need=2, replicas=2) == [0, 1]
    both = s + s
    assert both.rewards.numel() == 16 and both.informative().tolist() == [False, True, False, False] * 2
