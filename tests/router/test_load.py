"""Load accounting: what the counters say equals a direct count, whenever they are read."""

from __future__ import annotations

import torch

from router.load import LoadTracker


def test_counters_equal_a_direct_count_before_and_after_folding():
    g = torch.Generator().manual_seed(0)
    tracker = LoadTracker(num_layers=3, num_experts=8)
    expected_experts = torch.zeros(3, 8, dtype=torch.long)
    expected_pairs = torch.zeros(8, 8, dtype=torch.long)
    for step in range(LoadTracker.FOLD_EVERY + 5):  # crosses one automatic fold, then reads mid-batch
        layer = step % 3
        ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(1 + step % 4)])
        tracker.record_routing(layer, ids)
        for a, b in ids.tolist():
            expected_experts[layer, a] += 1
            expected_experts[layer, b] += 1
            expected_pairs[min(a, b), max(a, b)] += 1
        if step in (3, LoadTracker.FOLD_EVERY + 4):
            snap = tracker.snapshot()
            assert torch.equal(snap["expert_tokens"], expected_experts)
            assert torch.equal(snap["pair_tokens"], expected_pairs)
    tracker.record_routing(0, torch.tensor([[1, 2]]))
    assert int(snap["expert_tokens"].sum()) == int(expected_experts.sum()), "a snapshot is a copy"


def test_compute_time_lists_only_workers_that_reported_it():
    """Ray calls report no pool time: such a worker counts pairs but is not shown with 0 s of math."""
    tracker = LoadTracker(num_layers=1, num_experts=8)
    tracker.record_request(0, 5, 0.25)
    tracker.record_request(0, 3, 0.5)
    tracker.record_request(1, 7)  # served by a Ray call
    snap = tracker.snapshot()
    assert snap["worker_pairs"] == {0: 8, 1: 7}
    assert snap["worker_compute_s"] == {0: 0.75}
