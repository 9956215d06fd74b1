"""The engine-vs-trainer log-prob mismatch metric (no vLLM needed)."""

import pytest
import torch

from nat_megatron.rollout.engine import logprob_mismatch


def test_mismatch_over_ragged_completions():
    engine = [[-1.0, -2.0], [-0.5]]
    trainer = [torch.tensor([-1.1, -2.0]), torch.tensor([-0.2])]
    m = logprob_mismatch(engine, trainer)
    assert m["mean_abs"] == pytest.approx(0.4 / 3) and m["max_abs"] == pytest.approx(0.3)
    assert logprob_mismatch([], []) == {"mean_abs": 0.0, "max_abs": 0.0}
    with pytest.raises(ValueError, match="3 engine log-probs but 2"):
        logprob_mismatch(engine, [[-1.0, -2.0]])
