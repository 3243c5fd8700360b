"""The control loop a serving gateway runs beside its engine: metrics, rebalancing, autoscaling.

It wakes every `interval_s` on the gateway's event loop (so table switches land between steps),
exports the load counters as Prometheus metrics through Ray's metrics agent (labels bounded: per
expert and per worker; per layer only when asked), rebalances replicas every `rebalance_every_s`,
and lets the autoscaler resize the pool set when enabled.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from cluster.autoscale import Autoscaler, ScalingPolicy
from cluster.deployment import Deployment
from cluster.rebalance import Rebalancer
from gateway.service import Gateway
from router.load import window


@dataclass(frozen=True)
class ControlConfig:
    interval_s: float = 5.0
    rebalance_every_s: float | None = None  # None: never rebalance on a timer
    slots_per_pool: int | None = None  # experts a pool may hold; default: its share + 4
    autoscale: ScalingPolicy | None = None  # None: fixed pool count
    metrics: bool = True
    metrics_per_layer: bool = False


class LoadMetrics:
    def __init__(self, per_layer: bool) -> None:
        from ray.util.metrics import Counter, Gauge

        self.per_layer = per_layer
        tags = ("layer", "expert") if per_layer else ("expert",)
        self.expert = Counter("yuan_expert_tokens", "Tokens routed to each expert", tag_keys=tags)
        self.pairs = Counter("yuan_pool_pairs", "(token, expert) pairs computed per pool worker", tag_keys=("worker",))
        self.compute = Counter("yuan_pool_compute_seconds", "Expert math time per pool worker", tag_keys=("worker",))
        self.queue = Gauge("yuan_queue_delay_seconds_mean", "Mean wait for a batch slot since the last export")
        self.workers = Gauge("yuan_pool_workers", "Expert-pool workers in the routing table")
        self.version = Gauge("yuan_routing_table_version", "Routing table version in use")
        self._last: dict | None = None
        self._last_queue = (0, 0.0)

    def export(self, gateway: Gateway) -> None:
        dispatcher, engine = gateway.engine.dispatcher, gateway.engine
        admitted, delay = engine.admitted - self._last_queue[0], engine.queue_delay_s - self._last_queue[1]
        if admitted:
            self.queue.set(delay / admitted)
        self._last_queue = (engine.admitted, engine.queue_delay_s)
        snap = dispatcher.load.snapshot()
        if self._last is not None:
            diff = window(self._last, snap)
            grid = diff["expert_tokens"]
            if self.per_layer:
                for layer, e in grid.nonzero().tolist():
                    self.expert.inc(int(grid[layer, e]), tags={"layer": str(layer), "expert": str(e)})
            else:
                for e, n in enumerate(grid.sum(0).tolist()):
                    if n:
                        self.expert.inc(n, tags={"expert": str(e)})
            for w, n in diff["worker_pairs"].items():
                if n > 0:
                    self.pairs.inc(n, tags={"worker": str(w)})
            for w, s in diff["worker_compute_s"].items():
                if s > 0:
                    self.compute.inc(s, tags={"worker": str(w)})
        self.workers.set(len(dispatcher.table.workers))
        self.version.set(dispatcher.table.version)
        self._last = snap


async def control_loop(gateway: Gateway, deployment: Deployment, cfg: ControlConfig) -> None:
    dispatcher = gateway.engine.dispatcher
    n_experts = dispatcher.table.num_experts
    slots = cfg.slots_per_pool or -(-n_experts // len(dispatcher.workers)) + 4
    rebalancer = Rebalancer(gateway, slots)
    autoscaler = Autoscaler(deployment, rebalancer, cfg.autoscale) if cfg.autoscale else None
    metrics = LoadMetrics(cfg.metrics_per_layer) if cfg.metrics else None
    since, last_rebalance = dispatcher.load.snapshot(), time.monotonic()
    while True:
        await asyncio.sleep(cfg.interval_s)
        if metrics:
            metrics.export(gateway)
        if autoscaler:
            await autoscaler.tick()
        if cfg.rebalance_every_s and time.monotonic() - last_rebalance >= cfg.rebalance_every_s:
            seen = window(since, dispatcher.load.snapshot())["expert_tokens"].sum()
            if seen > 0:  # only with fresh load to go by
                await rebalancer.apply(rebalancer.plan(since))
            since, last_rebalance = dispatcher.load.snapshot(), time.monotonic()
