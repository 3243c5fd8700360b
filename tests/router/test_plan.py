"""Dispatch planning and placement as pure functions (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from router.table import PlacementError, RoutingTable, plan_pools
from model.experts import ExpertBank, bits, sum_slots
from router._pairsort import sort_pairs
from router.plan import DispatchTable, assign_pairs, plan_dispatch


def test_plan_pools_covers_every_expert_in_blocks():
    table = plan_pools(32, pools=3, replicas=2)
    assert len(table.workers) == 6
    assert table.workers[0] == table.workers[1]  # pool 0's two replicas
    assert sorted(e for w in table.workers[::2] for e in w) == list(range(32))
    assert table.replicas(0) == [0, 1]
    with pytest.raises(PlacementError, match="pools"):
        plan_pools(32, pools=33)
    with pytest.raises(PlacementError, match=r"experts \[31\]"):
        RoutingTable(1, ((0,),) + tuple((e,) for e in range(1, 31)), 32)


def test_each_pair_goes_to_exactly_one_holder():
    table = plan_pools(32, pools=4)
    ids = torch.tensor([[0, 9], [9, 12], [31, 30], [1, 2]])  # token 1: both experts on worker 1
    w = torch.rand(4, 2)
    plan = plan_dispatch(ids, w, DispatchTable(table.replica_lists()))
    seen = []
    for r in plan.requests():
        for row, slot, e, weight in zip(
            r.rows.tolist(), r.slots.tolist(), r.expert_ids[:, 0].tolist(), r.weights[:, 0].tolist()
        ):
            assert e in table.workers[r.worker]
            a = ids[row].tolist().index(e)
            assert slot == row * 2 + a, "each pair's output goes to its (token, a) slot"
            assert weight == w[row, a].item()
            seen.append((row, a))
        assert r.rows.tolist() == sorted(r.rows.tolist()), "a worker's pairs come in token order"
    assert sorted(seen) == [(t, a) for t in range(4) for a in range(2)]
    assert [w for w, _, _ in plan.spans] == [0, 1, 3], "spans in worker order; worker 2 has no work"


def test_replica_choice_follows_load_not_turns():
    table = plan_pools(32, pools=1, replicas=2)
    ids = torch.tensor([[0, 1]] * 6 + [[2, 3]] * 2)
    reqs = plan_dispatch(
        ids, torch.ones(8, 2), DispatchTable(table.replica_lists()), outstanding={0: 100}
    ).requests()
    assert {r.worker for r in reqs} == {1}, "worker 0 is busy: everything goes to worker 1"
    reqs = plan_dispatch(ids, torch.ones(8, 2), DispatchTable(table.replica_lists())).requests()
    tokens = {r.worker: int((r.expert_ids >= 0).sum()) for r in reqs}
    assert sorted(tokens.values()) == [8, 8], "experts spread so both replicas carry equal pairs"


def test_split_and_combine_equals_one_bank_bitwise():
    torch.manual_seed(0)
    d, F = 16, 8
    full = ExpertBank(list(range(8)), d, F)
    torch.nn.init.normal_(full.w1)
    torch.nn.init.normal_(full.w2)
    table = plan_pools(8, pools=3)
    parts = []
    for experts in table.workers:
        bank = ExpertBank(list(experts), d, F)
        bank.w1.data = full.w1.data[list(experts)]
        bank.w2.data = full.w2.data[list(experts)]
        parts.append(bank)
    x, ids = torch.randn(20, d), torch.stack([torch.randperm(8)[:2] for _ in range(20)])
    w = torch.rand(20, 2)
    reqs = plan_dispatch(ids, w, DispatchTable(table.replica_lists())).requests()
    slots = torch.full((20 * 2, d), float("nan"))
    with torch.no_grad():
        for r in reqs:
            slots[r.slots] = parts[r.worker](x[r.rows], r.expert_ids, r.weights)
        assert torch.equal(sum_slots(slots.view(20, 2, d)), full(x, ids, w))


def test_plan_moves_bfloat16_weights_bit_for_bit():
    """Weights travel through numpy as raw bits (numpy has no bfloat16): none may change."""
    table = plan_pools(32, pools=4)
    ids = torch.stack([torch.randperm(32)[:2] for _ in range(16)])
    w = torch.rand(16, 2).bfloat16()
    plan = plan_dispatch(ids, w, DispatchTable(table.replica_lists()))
    assert plan.weights.dtype == torch.bfloat16
    assert torch.equal(plan.weights, w.reshape(-1)[plan.slots])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pair_sort_is_a_stable_sort_by_worker(dtype):
    """The C sort against numpy's stable argsort, on random plans of several sizes and widths."""
    g = torch.Generator().manual_seed(1)
    for tokens, top_k, workers in [(1, 2, 4), (64, 2, 4), (37, 3, 7), (200, 2, 1), (16, 4, 32)]:
        k = tokens * top_k
        pair_worker = torch.randint(workers, (k,), generator=g).numpy()
        ids = torch.randint(1000, (k,), generator=g).numpy()
        w = torch.rand(k, generator=g).to(dtype)
        index, out_w = np.full((3, k), -1, dtype=np.int64), torch.empty(k, dtype=dtype)
        sizes = sort_pairs(pair_worker, ids, bits(w), top_k, workers, index, bits(out_w))
        order = np.argsort(pair_worker, kind="stable")
        assert sizes == np.bincount(pair_worker, minlength=workers).tolist()
        assert (index[0] == order // top_k).all() and (index[1] == order).all()
        assert (index[2] == ids[order]).all()
        assert torch.equal(out_w, w[torch.from_numpy(order)])


def test_pair_sort_rejects_what_it_cannot_sort():
    ids, w = np.arange(8, dtype=np.int64), np.ones(8, dtype=np.float32)
    index, out_w = np.empty((3, 8), dtype=np.int64), np.empty(8, dtype=np.float32)
    with pytest.raises(ValueError, match="pair 3 has worker 4"):
        sort_pairs(np.array([0, 1, 2, 4, 0, 1, 2, 3]), ids, w, 2, 4, index, out_w)
    with pytest.raises(ValueError, match="need expert_ids"):
        sort_pairs(np.zeros(8, dtype=np.int64), ids[:6], w, 2, 4, index, out_w)
    with pytest.raises(TypeError, match="pair_worker: expected integer items of 8 bytes"):
        sort_pairs(np.zeros(8, dtype=np.int32), ids, w, 2, 4, index, out_w)
    with pytest.raises(ValueError, match="read-only"):
        sort_pairs(np.zeros(8, dtype=np.int64), ids, w, 2, 4, index, _read_only(out_w))


def _read_only(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


def test_planning_ignores_in_flight_counts_of_workers_an_older_table_had():
    """After a table shrinks, the outstanding counts may still name workers past its end."""
    table = DispatchTable(RoutingTable(2, ((0, 1), (1, 2), (2, 0)), 3).replica_lists())
    ids = torch.tensor([[0, 1], [1, 2], [2, 0]])
    assert assign_pairs(ids, table, {0: 1, 7: 0, 9: 4}).shape == (3, 2)
