"""A stop signal on one rank stops every rank after the same step (all_reduce MAX of a flag)."""

from __future__ import annotations

import pytest

from tests.launcher import launch


@pytest.mark.dist
@pytest.mark.parametrize("signal_rank", [0, 1])
def test_a_signal_on_one_rank_stops_all_ranks_at_the_same_step(tmp_path, signal_rank):
    marker = tmp_path / "preempted"
    results = launch(
        "tests.train.preemption_workers:stop_together",
        2,
        timeout=120,
        signal_rank=signal_rank,
        signal_at=7,
        marker=str(marker),
    )
    assert [r["stopped"] for r in results] == [7, 7], results
    assert all(r["code"] == r["expected_code"] == 75 for r in results), results
    assert marker.read_text() == "7\n"  # rank 0 tells the batch script the step that was saved
