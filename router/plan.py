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


def plan_dispatch(expert_ids: torch.Tensor, weights: torch.Tensor, replicas: list[list[int]],
                  outstanding: dict[int, int] | None = None) -> list[WorkerRequest]:
    """Split a batch's routed pairs among workers; `outstanding` is tokens already in flight per worker."""
    load = dict(outstanding or {})
    counts = torch.bincount(expert_ids.reshape(-1), minlength=len(replicas)).tolist()
    owner = torch.full((len(replicas),), -1, dtype=torch.long)
    for e in sorted(range(len(replicas)), key=lambda e: -counts[e]):
        if counts[e]:
            w = min(replicas[e], key=lambda w: load.get(w, 0))
            owner[e] = w
            load[w] = load.get(w, 0) + counts[e]
    pair_worker = owner[expert_ids]  # [T, A]
    requests = []
    for w in sorted(set(pair_worker.reshape(-1).tolist())):
        mine = pair_worker == w
        rows = mine.any(dim=1).nonzero().squeeze(1)
        requests.append(WorkerRequest(w, rows, torch.where(mine, expert_ids, -1)[rows],
                                      torch.where(mine, weights, 0)[rows]))
    return requests


def combine(num_tokens: int, hidden: int, requests: list[WorkerRequest], partials: list[torch.Tensor],
            dtype: torch.dtype) -> torch.Tensor:
    """Add each worker's per-token partial sums back into their rows `[T, d]`."""
    out = torch.zeros(num_tokens, hidden, dtype=dtype)
    for req, part in zip(requests, partials):
        out.index_add_(0, req.rows, part)
    return out
