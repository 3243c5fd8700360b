"""Autoscaling expert pools: the number of pool workers follows measured load between bounds.

`ScalingPolicy.decide` is pure (unit-tested): demand is the routed (token, expert) pairs per second
over the last window divided by what one worker should carry; the target moves up after `up_after`
consecutive windows above the current size, down after `down_after` windows below it (hysteresis),
always within [min_workers, max_workers]. `Autoscaler` applies a decision with the same three-phase
move as rebalancing: new workers start and load their experts off the critical path, the gateway
switches tables at a step boundary, and workers left out are stopped only after the switch, when no
call can be in flight to them (draining). No request fails in either direction.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

from cluster.deployment import Deployment
from cluster.rebalance import Rebalancer
from router.load import window


@dataclass
class ScalingPolicy:
    min_workers: int = 1
    max_workers: int = 8
    pairs_per_s_per_worker: float = 2000.0  # what one pool worker should carry
    up_after: int = 2  # consecutive windows of too little capacity before adding
    down_after: int = 5  # consecutive windows of spare capacity before removing
    _above: int = field(default=0, repr=False)
    _below: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(f"need 1 <= min_workers ({self.min_workers}) <= max_workers ({self.max_workers})")

    def decide(self, current: int, pairs_per_s: float) -> int:
        """The worker count to move to, given the current count and the load of the last window."""
        need = min(self.max_workers, max(self.min_workers, math.ceil(pairs_per_s / self.pairs_per_s_per_worker)))
        self._above = self._above + 1 if need > current else 0
        self._below = self._below + 1 if need < current else 0
        if self._above >= self.up_after:
            self._above = 0
            return need
        if self._below >= self.down_after:
            self._below = 0
            return max(need, current - 1)  # step down one at a time
        return current


class Autoscaler:
    def __init__(self, deployment: Deployment, rebalancer: Rebalancer, policy: ScalingPolicy) -> None:
        self.deployment, self.rebalancer, self.policy = deployment, rebalancer, policy
        self._last = rebalancer.dispatcher.load.snapshot()
        self._last_t = time.monotonic()
        self.history: list[dict] = []  # one entry per scaling action, with how long it took

    @property
    def workers(self) -> list:
        return self.rebalancer.workers

    async def tick(self) -> int:
        """Measure the window since the last tick and scale if the policy says so; returns the size."""
        snap, now = self.rebalancer.dispatcher.load.snapshot(), time.monotonic()
        pairs = sum(window(self._last, snap)["worker_pairs"].values())
        rate = pairs / max(1e-6, now - self._last_t)
        self._last, self._last_t = snap, now
        target = self.policy.decide(len(self.workers), rate)
        if target != len(self.workers):
            await self.scale_to(target, since=None)
        return len(self.workers)

    async def scale_to(self, n: int, since: dict | None = None) -> None:
        t0 = time.monotonic()
        before = len(self.workers)
        loop = asyncio.get_running_loop()
        workers = list(self.workers)
        while len(workers) < n:  # start new workers off the critical path (the gateway keeps stepping)
            workers.append(await loop.run_in_executor(None, self.deployment.add_worker, []))
        keep, gone = workers[:n], workers[n:]
        table = self.rebalancer.plan(since, num_workers=n)
        await self.rebalancer.apply(table, keep)
        for w in gone:  # after the switch: no routing table sends them work
            self.deployment.remove_worker(w)
        self.history.append({"from": before, "to": n, "seconds": time.monotonic() - t0, "version": table.version})
