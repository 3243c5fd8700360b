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
    def __init__(self, gateway: Gateway, slots_per_worker: int) -> None:
        self.gateway, self.slots = gateway, slots_per_worker

    @property
    def dispatcher(self):
        return self.gateway.engine.dispatcher

    @property
    def workers(self) -> list:
        """The workers the gateway dispatches to now (a replaced pool's successor included)."""
        return self.dispatcher.workers

    def plan(self, since: dict | None = None, num_workers: int | None = None) -> RoutingTable:
        """The placement that balances the load measured since the snapshot `since` (or ever)."""
        snap = self.dispatcher.load.snapshot()
        load = window(since, snap) if since is not None else snap
        per_expert = [n + 1 for n in load["expert_tokens"].sum(0).tolist()]  # +1: unseen experts still placed
        pair_counts = load["pair_tokens"]
        pairs = {(a, b): float(pair_counts[a, b]) for a, b in pair_counts.nonzero().tolist()}
        n = num_workers or len(self.workers)
        slots = max(self.slots, -(-len(per_expert) // n))
        return balanced_placement(per_expert, n, slots, self.dispatcher.table.version + 1, pairs)

    async def apply(self, new: RoutingTable, workers: list | None = None) -> RoutingTable:
        """Move to `new`, served by `workers` (default: the same ones; new handles start empty-handed,
        handles left out stop getting work at the switch and can then be stopped)."""
        workers = list(self.workers if workers is None else workers)
        if len(new.workers) != len(workers):
            raise ValueError(f"table v{new.version} has {len(new.workers)} workers, got {len(workers)} handles")
        old = self.dispatcher.table
        held = {id(h): set(e) for h, e in zip(self.dispatcher.workers, old.workers)}
        grow = [w.set_experts.remote(sorted(held.get(id(w), set()) | set(e))) for w, e in zip(workers, new.workers)]
        await asyncio.gather(*grow)
        await self.gateway.switch_table(new, workers)
        await asyncio.gather(*[w.set_experts.remote(list(e)) for w, e in zip(workers, new.workers)])
        return new

    async def rebalance(self, since: dict | None = None) -> RoutingTable:
        return await self.apply(self.plan(since))
