"""Load accounting: tokens routed per (layer, expert), co-chosen expert pairs, and work per worker.

Cumulative counters updated once per layer call (a few vectorised ops); controllers take
`snapshot()`s and difference them over their own window, so smoothing is the reader's choice and
the hot path keeps no history.
"""

from __future__ import annotations

import torch


class LoadTracker:
    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.num_experts = num_experts
        self.expert_tokens = torch.zeros(num_layers, num_experts, dtype=torch.long)  # [L, E]
        self.pair_tokens = torch.zeros(num_experts, num_experts, dtype=torch.long)  # [E, E], a < b
        self.worker_pairs: dict[int, int] = {}  # (token, expert) pairs computed per worker
        self.worker_tokens: dict[int, int] = {}  # token rows sent per worker
        self.worker_compute_s: dict[int, float] = {}  # expert math time each worker reported

    def record_routing(self, layer: int, expert_ids: torch.Tensor) -> None:
        E = self.num_experts
        self.expert_tokens[layer] += torch.bincount(expert_ids.reshape(-1), minlength=E)
        if expert_ids.shape[1] >= 2:
            a, b = expert_ids[:, 0], expert_ids[:, 1]
            lo, hi = torch.minimum(a, b), torch.maximum(a, b)
            self.pair_tokens.view(-1).index_add_(0, lo * E + hi, torch.ones_like(lo))

    def record_request(self, worker: int, tokens: int, pairs: int) -> None:
        self.worker_tokens[worker] = self.worker_tokens.get(worker, 0) + tokens
        self.worker_pairs[worker] = self.worker_pairs.get(worker, 0) + pairs

    def record_compute(self, worker: int, seconds: float) -> None:
        self.worker_compute_s[worker] = self.worker_compute_s.get(worker, 0.0) + seconds

    def snapshot(self) -> dict:
        return {"expert_tokens": self.expert_tokens.clone(), "pair_tokens": self.pair_tokens.clone(),
                "worker_pairs": dict(self.worker_pairs), "worker_tokens": dict(self.worker_tokens),
                "worker_compute_s": dict(self.worker_compute_s)}


def max_over_mean(values: list[float]) -> float:
    """How unbalanced a load is: the largest share over the average (1.0 is perfectly even)."""
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean > 0 else 1.0


def worker_balance(worker_pairs: dict[int, int], workers: int) -> float:
    """`max_over_mean` of the pairs each of `workers` workers computed (absent ones count as 0)."""
    return max_over_mean([worker_pairs.get(w, 0) for w in range(workers)])


def window(before: dict, after: dict) -> dict:
    """What happened between two snapshots."""
    return {"expert_tokens": after["expert_tokens"] - before["expert_tokens"],
            "pair_tokens": after["pair_tokens"] - before["pair_tokens"],
            "worker_pairs": {w: n - before["worker_pairs"].get(w, 0) for w, n in after["worker_pairs"].items()},
            "worker_tokens": {w: n - before["worker_tokens"].get(w, 0) for w, n in after["worker_tokens"].items()},
            "worker_compute_s": {w: s - before["worker_compute_s"].get(w, 0.0)
                                 for w, s in after["worker_compute_s"].items()}}
