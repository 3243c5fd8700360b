"""Dispatch planning: from a batch's top-A choices, one request per worker, and the way back.

Pure tensors, no Ray. Each (token, expert) pair goes to one worker holding that expert. An expert
with several replicas has its pairs split among them by load (tokens in flight plus this batch's
other assignments, water-filled so replicas end level), never round-robin. A worker gets each of its tokens once, with the pairs
it should compute (other pairs masked as -1), and returns one weighted partial sum per token.
Legend: T tokens, A active experts per token, n tokens sent to one worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class WorkerRequest:
    worker: int
    rows: torch.Tensor  # [n] token rows of the batch
    expert_ids: torch.Tensor  # [n, A] global ids, -1 where the pair is computed elsewhere
    weights: torch.Tensor  # [n, A]
    pairs: int  # (token, expert) pairs to compute: the worker's share of the work


class DispatchTable:
    """A routing table prepared for planning: a fixed owner per single-replica expert, and the
    replica lists of the experts that have several (the only ones that need a choice per batch)."""

    def __init__(self, replicas: list[list[int]]) -> None:
        self.replicas = replicas
        self.owner = torch.tensor([r[0] if len(r) == 1 else -1 for r in replicas], dtype=torch.long)
        self.multi = [e for e, r in enumerate(replicas) if len(r) > 1]
        self.num_workers = max(w for r in replicas for w in r) + 1


def plan_dispatch(expert_ids: torch.Tensor, weights: torch.Tensor, table: DispatchTable,
                  outstanding: dict[int, int] | None = None) -> list[WorkerRequest]:
    """Split a batch's routed pairs among workers; `outstanding` is tokens already in flight per worker."""
    T, A = expert_ids.shape
    pair_worker = table.owner[expert_ids]  # [T, A]; -1 for experts with several replicas
    if table.multi:
        # Fill replicas of hot experts by water-filling: each pair goes to the replica with the least
        # load so far (tokens in flight, plus this batch's fixed assignments), in token order.
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
    # One entry per (worker, token) that has work there, sorted by worker then token.
    keys = torch.unique(pair_worker * T + torch.arange(T)[:, None])
    workers, rows = keys // T, keys % T
    mine = pair_worker[rows] == workers[:, None]  # [K, A]
    ids = torch.where(mine, expert_ids[rows], -1)
    wts = torch.where(mine, weights[rows], 0)
    sizes = torch.bincount(workers).tolist()
    pairs = torch.bincount(workers, weights=mine.sum(1).double()).long().tolist()
    requests = []
    for w, r, i, x in zip(range(len(sizes)), rows.split(sizes), ids.split(sizes), wts.split(sizes)):
        if sizes[w]:
            requests.append(WorkerRequest(w, r, i, x, pairs[w]))
    return requests


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


def combine(num_tokens: int, hidden: int, requests: list[WorkerRequest], partials: list[torch.Tensor],
            dtype: torch.dtype) -> torch.Tensor:
    """Add each worker's per-token partial sums back into their rows `[T, d]`."""
    out = torch.zeros(num_tokens, hidden, dtype=dtype)
    for req, part in zip(requests, partials):
        out.index_add_(0, req.rows, part)
    return out
