"""Dispatch planning: which worker computes each routed (token, expert) pair, and the way back.

Pure functions on tensors, no Ray. `assign_pairs` gives every pair one worker holding its expert. An
expert with several replicas has its pairs split among them by load (pairs in flight plus this batch's other
assignments, water-filled so replicas end level), never round-robin. `plan_dispatch` then sorts the
pairs by worker (a stable counting sort, in C: `router/_pairsort.c` says why) into a
`DispatchPlan`, so each worker's request is a contiguous span of it and pools on the gateway's node
read their span straight out of one shared copy. A token with two experts on one worker appears
twice in that worker's span. Workers return one weighted output per pair, which lands in the pair's
slot t*A + a of `[T, A, d]` outputs; `model.experts.sum_slots` adds a token's slots in `a` order,
as the in-process expert sum does, so every path gives the same bits.
Legend: T tokens, A active experts per token, K pairs planned, n pairs sent to one worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.experts import bits
from router._pairsort import sort_pairs


@dataclass
class WorkerRequest:
    worker: int
    rows: torch.Tensor  # [n] the token row of each pair
    slots: torch.Tensor  # [n] where its output goes: slot t*A + a of the `[T, A, d]` outputs
    expert_ids: torch.Tensor  # [n, 1] the expert of each pair (global id)
    weights: torch.Tensor  # [n, 1] its routing weight


class DispatchTable:
    """A routing table prepared for planning: a fixed owner per single-replica expert, and the
    replica lists of the experts that have several (the only ones that need a choice per batch)."""

    def __init__(self, replicas: list[list[int]]) -> None:
        self.replicas = replicas
        self.owner = np.array([r[0] if len(r) == 1 else -1 for r in replicas], dtype=np.int64)
        self.multi = [e for e, r in enumerate(replicas) if len(r) > 1]
        self.num_workers = max(w for r in replicas for w in r) + 1


def assign_pairs(
    expert_ids: torch.Tensor, table: DispatchTable, outstanding: dict[int, int] | None = None
) -> torch.Tensor:
    """The worker of each pair `[T, A]`; `outstanding` is pairs already in flight per worker."""
    return torch.from_numpy(_assign(expert_ids.reshape(-1).numpy(), table, outstanding)).view(
        expert_ids.shape
    )


def _assign(flat_ids: np.ndarray, table: DispatchTable, outstanding: dict[int, int] | None) -> np.ndarray:
    """`assign_pairs` on flat ids `[T*A]`, in numpy and plain lists: per-op overhead is what a
    decode step's small batches pay for."""
    pair_worker = table.owner[flat_ids]  # -1 for experts with several replicas
    if table.multi:
        # Fill replicas of hot experts by water-filling: each pair goes to the replica with the least
        # load so far (pairs in flight, plus this batch's fixed assignments), in token order.
        load = np.bincount(pair_worker[pair_worker >= 0], minlength=table.num_workers).tolist()
        for w, n in (outstanding or {}).items():
            if w < len(load):  # (a worker of an older table has none in flight)
                load[w] += n
        counts = np.bincount(flat_ids, minlength=len(table.replicas))
        by_expert = np.argsort(flat_ids, kind="stable")  # each expert's pairs, in token order
        starts = np.concatenate(([0], np.cumsum(counts)))
        for e in sorted(table.multi, key=lambda e: -counts[e]):
            if not counts[e]:
                continue
            reps = table.replicas[e]
            share = _water_fill([load[r] for r in reps], int(counts[e]))
            pair_worker[by_expert[starts[e] : starts[e + 1]]] = np.repeat(reps, share)
            for r, n in zip(reps, share):
                load[r] += n
    return pair_worker


@dataclass
class DispatchPlan:
    """A batch's routed pairs sorted by worker, then token: worker w's are [start, end) of its span."""

    index: np.ndarray  # [3, K] int64: per pair its token row, its output slot and its expert id
    weights: torch.Tensor  # [K] its routing weight
    spans: list[tuple[int, int, int]]  # (worker, start, end) for workers with work
    tokens: int  # T
    top_k: int  # A: the outputs the slots index are `[T, A, d]`

    @property
    def slots(self) -> torch.Tensor:
        return torch.from_numpy(self.index[1])

    def request(self, span: tuple[int, int, int]) -> WorkerRequest:
        """The request of one of `spans`."""
        w, start, end = span
        rows, slots, ids = (torch.from_numpy(a[start:end]) for a in self.index)
        return WorkerRequest(w, rows, slots, ids.view(-1, 1), self.weights[start:end].view(-1, 1))

    def requests(self) -> list[WorkerRequest]:
        return [self.request(span) for span in self.spans]


def plan_dispatch(
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    table: DispatchTable,
    outstanding: dict[int, int] | None = None,
    into: tuple[np.ndarray, torch.Tensor] | None = None,
) -> DispatchPlan:
    """Split a batch's routed pairs among workers; `outstanding` is pairs already in flight per worker.
    The plan's index `[3, K]` and weights `[K]` are built in `into` when given (a shared batch's, so
    they need no second copy), else in new arrays."""
    A = expert_ids.shape[1]
    flat = expert_ids.numpy().ravel()
    index, plan_weights = (
        into
        if into is not None
        else (np.empty((3, flat.size), dtype=np.int64), torch.empty(flat.size, dtype=weights.dtype))
    )
    sizes = sort_pairs(
        _assign(flat, table, outstanding),
        flat,
        bits(weights).ravel(),
        A,
        table.num_workers,
        index,
        bits(plan_weights),
    )
    spans, start = [], 0
    for w, n in enumerate(sizes):
        if n:
            spans.append((w, start, start + n))
            start += n
    return DispatchPlan(index, plan_weights, spans, expert_ids.shape[0], A)


def _water_fill(load: list[float], n: int) -> list[int]:
    """Split n pairs among replicas with current `load` so their loads end as equal as possible."""
    levels = sorted((v, i) for i, v in enumerate(load))
    k = len(levels)
    while k > 1 and (n + sum(v for v, _ in levels[:k])) / k <= levels[k - 1][0]:
        k -= 1  # the k-th lowest is already above the common level: it gets nothing
    target = (n + sum(v for v, _ in levels[:k])) / k
    share = [0] * len(levels)
    for v, i in levels[:k]:
        share[i] = int(target - v)
    for v, i in levels[: n - sum(share)]:  # rounding leftovers to the least loaded
        share[i] += 1
    return share
