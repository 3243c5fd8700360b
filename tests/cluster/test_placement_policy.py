"""The placement policy as a pure function: replication of hot experts and balanced pools."""

from __future__ import annotations

import random

import pytest

from cluster.placement import PlacementError, balanced_placement


def worker_loads(table, load):
    per = [0.0] * len(table.workers)
    for e, reps in enumerate(table.replica_lists()):
        for w in reps:
            per[w] += load[e] / len(reps)
    return per


@pytest.mark.parametrize("seed", range(5))
def test_skewed_load_is_balanced_within_ten_percent(seed):
    rng = random.Random(seed)
    load = [1000.0 / (rank + 1) ** 1.2 + rng.random() for rank in range(32)]  # Zipf-like
    rng.shuffle(load)
    baseline = [sum(load[w * 8 : (w + 1) * 8]) for w in range(4)]  # contiguous blocks, no replicas
    table = balanced_placement(load, num_workers=4, slots_per_worker=12, version=2)
    per = worker_loads(table, load)
    mean = sum(per) / 4
    assert max(per) / mean <= 1.10 < max(baseline) / (sum(baseline) / 4)
    assert all(len(w) <= 12 for w in table.workers)
    assert all(table.replicas(e) for e in range(32)), "every expert keeps at least one replica"
    hottest = max(range(32), key=lambda e: load[e])
    assert len(table.replicas(hottest)) > 1, "the hottest expert is replicated"
    assert table.version == 2


def test_pairs_chosen_together_share_a_pool_when_balance_allows():
    load = [10.0] * 8
    table = balanced_placement(
        load,
        num_workers=2,
        slots_per_worker=4,
        version=1,
        pairs={(0, 5): 100.0, (1, 6): 100.0, (2, 7): 100.0, (3, 4): 100.0},
    )
    for a, b in [(0, 5), (1, 6), (2, 7), (3, 4)]:
        assert table.replicas(a) == table.replicas(b), f"experts {a} and {b} should share a pool"
    assert sorted(len(w) for w in table.workers) == [4, 4]


def test_too_few_slots_is_an_error():
    with pytest.raises(PlacementError, match="slots_per_worker"):
        balanced_placement([1.0] * 32, num_workers=4, slots_per_worker=7, version=1)
