"""pass@k and standard errors by hand."""

import math

import pytest

from nat_megatron.rewards.passk import mean_and_se, pass_at_k


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    # 4 samples, 1 correct, k = 2: 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # 5 samples, 2 correct, k = 3: 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    assert pass_at_k(3, 2, 2) == 1.0  # n - c < k: every k-subset holds a correct one
    for bad in ((2, 3, 1), (2, 1, 3), (2, 1, 0)):
        with pytest.raises(ValueError, match="pass@k"):
            pass_at_k(*bad)


def test_mean_and_se_by_hand():
    assert mean_and_se([]) == (0.0, 0.0) and mean_and_se([0.5]) == (0.5, 0.0)
    mean, se = mean_and_se([1.0, 0.0, 1.0, 0.0])
    assert mean == 0.5 and se == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))


def test_overlong_penalty_by_hand():
    import torch

    from nat_megatron.rewards.shaping import overlong_penalty

    lengths = torch.tensor([10, 80, 90, 95, 100])
    # max 100, buffer 20: free up to 80 tokens, then -penalty * (L - 80) / 20.
    got = overlong_penalty(lengths, max_len=100, buffer=20, penalty=1.0)
    assert torch.allclose(got, torch.tensor([0.0, 0.0, -0.5, -0.75, -1.0]))
    assert torch.equal(overlong_penalty(lengths, max_len=100, buffer=0, penalty=1.0), torch.zeros(5))
