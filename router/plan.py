"""Dispatch planning: which worker computes each routed (token, expert) pair, and the way back.

Pure tensors, no Ray. `assign_pairs` gives every pair one worker holding its expert. An expert with
several replicas has its pairs split among them by load (pairs in flight plus this batch's other
assignments, water-filled so replicas end level), never round-robin. `worker_request` cuts one
worker's share out of the batch: each of its tokens once, with the pairs it should compute (other
pairs masked as -1); the worker returns one weighted partial sum per token and `combine` adds them.
The gateway cuts requests for workers it sends rows to; a pool on the gateway's node reads the whole
batch from shared memory and cuts its own with the same function.
Legend: T tokens, A active experts per token, n tokens sent to one worker.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass
class WorkerRequest:
    worker: int
    rows: torch.Tensor  # [n] token rows of the batch
    expert_ids: torch.Tensor  # [n, A] global ids, -1 where the pair is computed elsewhere
    weights: torch.Tensor  # [n, A], 0 where the pair is computed elsewhere
    pairs: int  # (token, expert) pairs to compute: the worker's share of the work


class DispatchTable:
    """A routing table prepared for planning: a fixed owner per single-replica expert, and the
    replica lists of the experts that have several (the only ones that need a choice per batch)."""

    def __init__(self, replicas: list[list[int]]) -> None:
        self.replicas = replicas
        self.owner = torch.tensor([r[0] if len(r) == 1 else -1 for r in replicas], dtype=torch.long)
        self.multi = [e for e, r in enumerate(replicas) if len(r) > 1]
        self.num_workers = max(w for r in replicas for w in r) + 1


def assign_pairs(expert_ids: torch.Tensor, table: DispatchTable,
                 outstanding: dict[int, int] | None = None) -> torch.Tensor:
    """The worker of each pair `[T, A]`; `outstanding` is pairs already in flight per worker."""
    pair_worker = table.owner[expert_ids]  # [T, A]; -1 for experts with several replicas
    if not table.multi:
        return pair_worker
    # Fill replicas of hot experts by water-filling: each pair goes to the replica with the least
    # load so far (pairs in flight, plus this batch's fixed assignments), in token order.
    load = torch.zeros(table.num_workers)
    for w, n in (outstanding or {}).items():
        load[w] += n
    fixed = pair_worker[pair_worker >= 0]
    load += torch.bincount(fixed, minlength=table.num_workers)[: table.num_workers].float()
    flat_ids, flat_worker = expert_ids.reshape(-1), pair_worker.reshape(-1)
    counts = torch.bincount(flat_ids, minlength=len(table.replicas))
    for e in sorted(table.multi, key=lambda e: -int(counts[e])):
        if not counts[e]:
            continue
        where = (flat_ids == e).nonzero().squeeze(1)
        reps = torch.tensor(table.replicas[e])
        share = _water_fill(load[reps], int(counts[e]))
        flat_worker[where] = torch.repeat_interleave(reps, share)
        load[reps] += share.float()
    return pair_worker


def worker_request(worker: int, pair_worker: torch.Tensor, expert_ids: torch.Tensor,
                   weights: torch.Tensor) -> WorkerRequest:
    """`worker`'s share of a batch: the rows with at least one of its pairs, others masked."""
    mine = pair_worker == worker
    rows = mine.any(1).nonzero().squeeze(1)
    mine = mine[rows]
    return WorkerRequest(worker, rows, torch.where(mine, expert_ids[rows], -1),
                         torch.where(mine, weights[rows], 0), int(mine.sum()))


def plan_dispatch(expert_ids: torch.Tensor, weights: torch.Tensor, table: DispatchTable,
                  outstanding: dict[int, int] | None = None) -> list[WorkerRequest]:
    """Every worker's request for a batch, for workers with work, in worker order."""
    pair_worker = assign_pairs(expert_ids, table, outstanding)
    pairs = torch.bincount(pair_worker.reshape(-1), minlength=table.num_workers).tolist()
    return [worker_request(w, pair_worker, expert_ids, weights) for w, n in enumerate(pairs) if n]


def _water_fill(load: torch.Tensor, n: int) -> torch.Tensor:
    """Split n pairs among replicas with current `load` so their loads end as equal as possible."""
    levels = sorted((float(v), i) for i, v in enumerate(load.tolist()))
    k = len(levels)
    while k > 1 and (n + sum(v for v, _ in levels[:k])) / k <= levels[k - 1][0]:
        k -= 1  # the k-th lowest is already above the common level: it gets nothing
    target = (n + sum(v for v, _ in levels[:k])) / k
    share = torch.zeros(len(levels), dtype=torch.long)
    for v, i in levels[:k]:
        share[i] = int(target - v)
    for v, i in levels[: n - int(share.sum())]:  # rounding leftovers to the least loaded
        share[i] += 1
    return share


def combine(num_tokens: int, hidden: int, parts: Iterable[tuple[torch.Tensor, torch.Tensor]],
            dtype: torch.dtype) -> torch.Tensor:
    """Add each worker's per-token partial sums `(rows [n], partial [n, d])` back into `[T, d]`.
    Each part is added as it arrives, so a part may be a view its sender reuses afterwards."""
    out = torch.zeros(num_tokens, hidden, dtype=dtype)
    for rows, part in parts:
        out.index_add_(0, rows, part)
    return out
