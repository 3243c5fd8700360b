"""The expert step as a Ray Compiled Graph: gateway -> every pool -> gateway, compiled once.

A compiled graph has a fixed shape, so each layer's whole batch goes to every pool with the pairs
that are not its own masked (-1); each pool returns its weighted partial sums `[T, d]` (zeros where
it had nothing) and the gateway adds them, which gives the same bits as the other transports
(adding a zero changes nothing). Limits that keep it out of the default path (docs/TRANSPORT.md):
only the compiling process may execute it, an actor serves one graph at a time (so pools cannot be
shared by several gateways), and idle graph actors spin a core each until `close()` tears it down.
"""

from __future__ import annotations

import ray
import torch
from ray.dag import InputNode, MultiOutputNode

from router.table import RoutingTable
from router.wire import decode, encode
from router.plan import DispatchTable, assign_pairs


class CompiledGraphDispatcher:
    transport = "compiled"

    def __init__(self, table: RoutingTable, workers: list) -> None:
        self.table, self.workers, self._plan = table, list(workers), DispatchTable(table.replica_lists())
        with InputNode() as inp:
            outs = [
                w.compute.bind(inp[0], inp[1], inp[2 + 2 * k], inp[3 + 2 * k])
                for k, w in enumerate(self.workers)
            ]
            dag = MultiOutputNode(outs)
        self._graph = dag.experimental_compile()

    def experts(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        return self.wait(self.submit(layer, x, expert_ids, weights))

    def submit(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, lane: int = 0
    ):
        per_worker = []
        pair_worker = assign_pairs(expert_ids, self._plan)
        for k in range(len(self.workers)):  # every worker gets the whole batch, others' pairs masked
            mine = pair_worker == k
            per_worker += [encode(torch.where(mine, expert_ids, -1)), encode(torch.where(mine, weights, 0))]
        return x, self._graph.execute(layer, encode(x), *per_worker)

    def wait(self, handle) -> torch.Tensor:
        x, refs = handle
        out = torch.zeros_like(x)
        for part in ray.get(refs):  # copies out of the graph's buffers, which must not be held
            out += decode(part, x.dtype)
        return out

    def close(self) -> None:
        self._graph.teardown()
