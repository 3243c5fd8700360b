"""Applying a placement online: measure load, plan replicas, move experts without stalling or failing.

Three phases, so no request fails and no step waits longer than a weight load:
1. grow: every worker loads the experts it will newly hold, keeping the ones it holds (off the
   critical path: pools keep serving from their current banks while they read);
2. switch: the gateway adopts the new routing-table version at a step boundary (nothing in flight);
3. shrink: workers drop the experts the new table no longer routes to them.
"""

from __future__ import annotations

import asyncio

from cluster.placement import RoutingTable, balanced_placement
from gateway.service import Gateway
from router.load import window


class Rebalancer:
    def __init__(self, gateway: Gateway, workers: list, slots_per_worker: int) -> None:
        self.gateway, self.workers, self.slots = gateway, list(workers), slots_per_worker

    @property
    def dispatcher(self):
        return self.gateway.engine.dispatcher

    def plan(self, since: dict | None = None) -> RoutingTable:
        """The placement that balances the load measured since the snapshot `since` (or ever)."""
        snap = self.dispatcher.load.snapshot()
        load = window(since, snap) if since is not None else snap
        per_expert = load["expert_tokens"].sum(0).tolist()
        pair_counts = load["pair_tokens"]
        nz = pair_counts.nonzero().tolist()
        pairs = {(a, b): float(pair_counts[a, b]) for a, b in nz}
        return balanced_placement(per_expert, len(self.workers), self.slots, self.dispatcher.table.version + 1, pairs)

    async def apply(self, new: RoutingTable) -> RoutingTable:
        old = self.dispatcher.table
        if len(new.workers) != len(self.workers):
            raise ValueError(f"table v{new.version} has {len(new.workers)} workers, the deployment {len(self.workers)}")
        grow = [w.set_experts.remote(sorted(set(a) | set(b))) for w, a, b in zip(self.workers, old.workers, new.workers)]
        await asyncio.gather(*grow)
        await self.gateway.switch_table(new, self.workers)
        await asyncio.gather(*[w.set_experts.remote(list(e)) for w, e in zip(self.workers, new.workers)])
        return new

    async def rebalance(self, since: dict | None = None) -> RoutingTable:
        return await self.apply(self.plan(since))
