"""Load accounting: tokens routed per (layer, expert), co-chosen expert pairs, and work per worker.

Cumulative counters; controllers take `snapshot()`s and difference them over their own window, so
smoothing is the reader's choice. The hot path only appends each layer's routing to a short list;
it is folded into the counters every `FOLD_EVERY` layers and before any read, in one pass.
"""

from __future__ import annotations

import threading

import torch


class LoadTracker:
    FOLD_EVERY = 64

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.num_experts = num_experts
        self._expert_tokens = torch.zeros(num_layers, num_experts, dtype=torch.long)  # [L, E]
        self._pair_tokens = torch.zeros(num_experts, num_experts, dtype=torch.long)  # [E, E], a < b
        self._routed: list[tuple[int, torch.Tensor]] = []  # (layer, expert ids [T, A]) not yet folded
        self._lock = threading.Lock()  # the engine's thread records while stats and controllers read
        self.worker_pairs: dict[int, int] = {}  # (token, expert) pairs sent to and computed by each worker
        self.worker_compute_s: dict[int, float] = {}  # expert math time each worker reported

    def record_routing(self, layer: int, expert_ids: torch.Tensor) -> None:
        with self._lock:
            self._routed.append((layer, expert_ids))
            if len(self._routed) >= self.FOLD_EVERY:
                self._fold()

    def _fold(self) -> None:
        """Add the recorded routing to the counters; the caller holds the lock."""
        if not self._routed:
            return
        E, (L, _) = self.num_experts, self._expert_tokens.shape
        ids = torch.cat([e for _, e in self._routed])  # [N, A]
        layers = torch.repeat_interleave(
            torch.tensor([layer for layer, _ in self._routed]),
            torch.tensor([e.shape[0] for _, e in self._routed]),
        )
        self._routed.clear()
        self._expert_tokens += torch.bincount((layers[:, None] * E + ids).reshape(-1), minlength=L * E).view(
            L, E
        )
        if ids.shape[1] >= 2:
            lo, hi = torch.minimum(ids[:, 0], ids[:, 1]), torch.maximum(ids[:, 0], ids[:, 1])
            self._pair_tokens += torch.bincount(lo * E + hi, minlength=E * E).view(E, E)

    @property
    def expert_tokens(self) -> torch.Tensor:
        """Tokens routed per (layer, expert) `[L, E]`, up to now (a copy)."""
        with self._lock:
            self._fold()
            return self._expert_tokens.clone()

    @property
    def pair_tokens(self) -> torch.Tensor:
        """Tokens that chose experts a < b together `[E, E]`, up to now (a copy)."""
        with self._lock:
            self._fold()
            return self._pair_tokens.clone()

    def record_request(self, worker: int, pairs: int, compute_s: float | None = None) -> None:
        """A worker computed `pairs`, in `compute_s` of expert math by its own clock (None: not
        reported, as over Ray calls; such a worker is left out of `worker_compute_s`, not shown as 0)."""
        self.worker_pairs[worker] = self.worker_pairs.get(worker, 0) + pairs
        if compute_s is not None:
            self.worker_compute_s[worker] = self.worker_compute_s.get(worker, 0.0) + compute_s

    def add(self, delta: dict) -> None:
        """Add another tracker's `window` (a gateway's load, summed by the controller)."""
        with self._lock:
            self._fold()
            self._expert_tokens += torch.as_tensor(delta["expert_tokens"], dtype=torch.long)
            self._pair_tokens += torch.as_tensor(delta["pair_tokens"], dtype=torch.long)
        for w, n in delta["worker_pairs"].items():
            self.worker_pairs[w] = self.worker_pairs.get(w, 0) + n
        for w, t in delta["worker_compute_s"].items():
            self.worker_compute_s[w] = self.worker_compute_s.get(w, 0.0) + t

    def snapshot(self) -> dict:
        return {
            "expert_tokens": self.expert_tokens,
            "pair_tokens": self.pair_tokens,
            "worker_pairs": dict(self.worker_pairs),
            "worker_compute_s": dict(self.worker_compute_s),
        }


def max_over_mean(values: list[float]) -> float:
    """How unbalanced a load is: the largest share over the average (1.0 is perfectly even)."""
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean > 0 else 1.0


def worker_balance(worker_pairs: dict[int, int], workers: int) -> float:
    """`max_over_mean` of the pairs each of `workers` workers computed (absent ones count as 0)."""
    return max_over_mean([worker_pairs.get(w, 0) for w in range(workers)])


def window(before: dict, after: dict) -> dict:
    """What happened between two snapshots."""
    return {
        "expert_tokens": after["expert_tokens"] - before["expert_tokens"],
        "pair_tokens": after["pair_tokens"] - before["pair_tokens"],
        "worker_pairs": {w: n - before["worker_pairs"].get(w, 0) for w, n in after["worker_pairs"].items()},
        "worker_compute_s": {
            w: s - before["worker_compute_s"].get(w, 0.0) for w, s in after["worker_compute_s"].items()
        },
    }
