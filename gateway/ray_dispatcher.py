"""The gateway's side of the expert step over Ray: plan, fan out to pools, await all, combine.

Per layer it sends one request to every worker that has work (plain actor calls, all in flight at
once; see docs/TRANSPORT.md for why this transport) and adds the partial sums back. The routing
table can be swapped between steps (`set_table`) without touching this code path.
"""

from __future__ import annotations

import ray
import torch

from cluster.placement import RoutingTable
from experts.wire import decode, encode
from router.plan import combine, plan_dispatch


class RayDispatcher:
    def __init__(self, table: RoutingTable, workers: list) -> None:
        self.set_table(table, workers)
        self.outstanding: dict[int, int] = {}  # tokens in flight per worker
        self.tokens_sent: dict[int, int] = {}

    def set_table(self, table: RoutingTable, workers: list) -> None:
        if len(workers) != len(table.workers):
            raise ValueError(f"routing table v{table.version} has {len(table.workers)} workers, "
                             f"got {len(workers)} handles")
        self.table, self.workers, self._replicas = table, list(workers), table.replica_lists()

    def experts(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        requests = plan_dispatch(expert_ids, weights, self._replicas, self.outstanding)
        refs = []
        for r in requests:
            n = int(r.rows.numel())
            self.outstanding[r.worker] = self.outstanding.get(r.worker, 0) + n
            self.tokens_sent[r.worker] = self.tokens_sent.get(r.worker, 0) + n
            refs.append(self.workers[r.worker].compute.remote(layer, encode(x[r.rows]), encode(r.expert_ids),
                                                             encode(r.weights)))
        try:
            partials = [decode(a, x.dtype) for a in ray.get(refs)]
        finally:
            for r in requests:
                self.outstanding[r.worker] -= int(r.rows.numel())
        return combine(x.shape[0], x.shape[1], requests, partials, x.dtype)
