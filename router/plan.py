"""Dispatch planning: from a batch's top-A choices, one request per worker, and the way back.

Pure tensors, no Ray. Each (token, expert) pair goes to one worker holding that expert; among
replicas the least loaded worker wins (outstanding tokens, updated as the plan grows, heaviest
experts placed first), never round-robin. A worker gets each of its tokens once, with the pairs
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
    owner = table.owner
    if table.multi:
        owner = owner.clone()
        counts = torch.bincount(expert_ids.reshape(-1), minlength=len(table.replicas))
        load = dict(outstanding or {})
        fixed = torch.bincount(owner[owner >= 0], weights=counts[owner >= 0].double(),
                               minlength=table.num_workers).tolist()
        for w, n in enumerate(fixed):
            load[w] = load.get(w, 0) + n
        for e in sorted(table.multi, key=lambda e: -int(counts[e])):
            if counts[e]:
                w = min(table.replicas[e], key=lambda w: load.get(w, 0))
                owner[e] = w
                load[w] += int(counts[e])
    T, A = expert_ids.shape
    pair_worker = owner[expert_ids]  # [T, A]
    # One entry per (worker, token) that has work there, sorted by worker then token.
    keys = torch.unique(pair_worker * T + torch.arange(T)[:, None])
    workers, rows = keys // T, keys % T
    mine = pair_worker[rows] == workers[:, None]  # [K, A]
    ids = torch.where(mine, expert_ids[rows], -1)
    wts = torch.where(mine, weights[rows], 0)
    sizes = torch.bincount(workers).tolist()
    requests = []
    for w, r, i, x in zip(range(len(sizes)), rows.split(sizes), ids.split(sizes), wts.split(sizes)):
        if sizes[w]:
            requests.append(WorkerRequest(w, r, i, x))
    return requests


def combine(num_tokens: int, hidden: int, requests: list[WorkerRequest], partials: list[torch.Tensor],
            dtype: torch.dtype) -> torch.Tensor:
    """Add each worker's per-token partial sums back into their rows `[T, d]`."""
    out = torch.zeros(num_tokens, hidden, dtype=dtype)
    for req, part in zip(requests, partials):
        out.index_add_(0, req.rows, part)
    return out
