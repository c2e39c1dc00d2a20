"""Guards on two gloo ranks: one rank's NaN skips the step on both, and the DDP checkpointing crash and its fix.

All scenarios share one spawn of two processes (tests/support/rank_workers.py), since each spawn costs seconds.
"""

from __future__ import annotations


import pytest
import torch
from rank_workers import guards_on_two_ranks, results_on_two_ranks

from vlm_dpo_plugins.distributed import any_rank, gather_from_ranks, max_across_ranks


@pytest.fixture(scope="module")
def ranks():
    return results_on_two_ranks(guards_on_two_ranks)


def test_outside_a_process_group_agreement_is_the_local_value():
    assert any_rank(True) is True and any_rank(False) is False
    assert max_across_ranks([1, -0.5]) == [1.0, -0.5]
    assert gather_from_ranks(["x"]) == [["x"]]


def test_a_skip_vote_on_one_rank_is_a_skip_on_every_rank(ranks):
    assert [ranks[rank]["votes"] for rank in (0, 1)] == [(True, False), (True, False)]


def test_a_nan_seen_by_one_rank_skips_the_step_on_both_and_replicas_stay_equal(ranks):
    rank0, rank1 = ranks[0]["guarded_steps"], ranks[1]["guarded_steps"]
    expected_outcomes = [
        (False, (), 1.0),
        (True, ("rank 1: non-finite gradient norm (nan) in group(s) language",), 1.0),
        (True, ("rank 1: non-finite loss (inf)",), 1.0),
        (False, (), 0.5),  # rank 1 alone holds a back-off: the smallest scale applies on both
    ]
    assert rank0["outcomes"] == rank1["outcomes"] == expected_outcomes
    assert rank0["learning_rates_used"] == rank1["learning_rates_used"] == [0.1, 0.05]
    for snapshot0, snapshot1 in zip(rank0["snapshots"], rank1["snapshots"]):
        assert all(torch.equal(a, b) for a, b in zip(snapshot0, snapshot1))
    before_skips, after_skips = rank0["snapshots"][1], rank0["snapshots"][3]
    assert all(torch.equal(a, b) for a, b in zip(before_skips, after_skips))
    assert rank0["adam_steps"] == rank1["adam_steps"] == 2.0
    assert rank0["skipped_steps"] == rank1["skipped_steps"] == 2


def test_reentrant_checkpointing_with_a_frozen_tower_crashes_ddp_and_the_plan_does_not(ranks):
    for rank in (0, 1):
        outcomes = ranks[rank]["checkpointing"]
        assert outcomes["reentrant, find_unused_parameters"].startswith("Expected to mark a variable ready only once")
        assert outcomes["plan"] == "ok"
        assert outcomes["plan keeping reentrant"] == "ok"


def test_mpos_reward_baseline_is_the_mean_over_ranks_and_a_nan_on_one_rank_moves_it_on_none(ranks):
    # Rank means 0.2 and 0.6: one update of weight two ranks, mean 0.4. Then rank 1's NaN: left on both.
    # Then both 0.0: (0.4 * 2 + 0.0 * 2) / 4 = 0.2.
    expected = [(pytest.approx(0.4), 2), (pytest.approx(0.4), 2), (pytest.approx(0.2), 4)]
    assert ranks[0]["reward_baseline"] == ranks[1]["reward_baseline"]
    assert ranks[0]["reward_baseline"] == expected
