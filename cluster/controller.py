"""The control plane: one named, detached Ray actor per application (`yuan-controller-<app>`).

It owns the expert pools (`cluster.pools.PoolSet`: start, restart, replace, add, remove), the
versioned routing table, the expert load summed over every gateway, rebalancing, the expert-pool
autoscaler, and pool health. Gateways attach to it by name and report every `report_every_s`
(`report`: the table version they use, their load since the last report, their stats); the reply
carries a newer table when there is one, which the gateway applies between two steps, and the
experts that have no live holder (the gateway's health is NOT_SERVING while there are any).

Health: every `probe_every_s` each pool is asked `info` with a `probe_timeout_s` deadline. A pool
that misses it (dead, or stopped) is unhealthy: the next table leaves it out when every one of its
experts has another healthy holder, else keeps it (requests wait for it) and names the experts as
uncovered. A pool that answers again with a new pid was restarted by Ray: it is given the table's
experts again, and the table is republished so gateways reconnect its data plane. A pool unhealthy
for `replace_after_s` is replaced by a new one holding its experts.

Moves (rebalance, scale) go grow -> publish -> wait for every live gateway to acknowledge the new
version -> shrink / stop, so no gateway ever sends to a retired worker. The actor runs with
`max_restarts=-1`; a restarted controller adopts the live pools by name (each knows its experts)
and publishes a table above every version a gateway reports, so a controller crash costs no pool.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import ray

from cluster.autoscale import ScalingPolicy
from cluster.placement import balanced_placement
from cluster.pools import NAMESPACE, PoolConfig, PoolSet, Worker
from router.load import LoadTracker, window
from router.table import RoutingTable

CONTROLLER_PREFIX = "yuan-controller-"


@dataclass(frozen=True)
class ControlConfig:
    probe_every_s: float = 0.5  # health probes, and the control loop's tick
    probe_timeout_s: float = 1.0  # a pool that does not answer `info` within this is unhealthy
    replace_after_s: float = 30.0  # unhealthy this long: replaced by a new pool with its experts
    gateway_timeout_s: float = 10.0  # a gateway not heard from this long is no longer waited for
    ack_timeout_s: float = 30.0  # a move waits at most this long for gateways to take a new table
    rebalance_every_s: float | None = None  # None: never rebalance on a timer
    slots_per_pool: int | None = None  # experts a pool may hold; default: its share + 4
    autoscale: ScalingPolicy | None = None  # None: fixed pool count
    autoscale_every_s: float = 5.0
    metrics: bool = True
    metrics_per_layer: bool = False
    serve_app: str | None = None  # the Serve application whose gateways use this; gone -> stop


@dataclass
class GatewayRecord:
    version: int
    seen: float
    stats: dict = field(default_factory=dict)
    serving: bool = False  # reported from its report loop (it runs once the gateway is up and bound)


def controller_name(app: str) -> str:
    return CONTROLLER_PREFIX + app


class Controller:
    def __init__(self, app: str, pools: PoolConfig, control: ControlConfig = ControlConfig()) -> None:
        self.app, self.control = app, control
        self.pools = PoolSet(pools, app)
        cfg = self.pools.model_cfg
        self.load = LoadTracker(cfg.num_layers, cfg.num_experts)  # every gateway's, summed
        self.table: RoutingTable | None = None
        self.serving: list[Worker] = []  # the table's workers, in its order
        self.uncovered: list[int] = []  # experts with no healthy holder
        self.unhealthy: dict[str, float] = {}  # worker name -> since when
        self.gateways: dict[str, GatewayRecord] = {}
        self.history: list[dict] = []  # moves, with how long they took
        self._setup: asyncio.Task | None = None
        self._loop_task: asyncio.Task | None = None
        self._move = asyncio.Lock()  # one table change at a time

    # ---- start or adopt ------------------------------------------------------------------------
    async def ready(self) -> dict:
        """Start the pools (or adopt the live ones); returns `status()`."""
        if self._setup is None:
            self._setup = asyncio.ensure_future(self._start())
        await asyncio.shield(self._setup)
        return self.status()

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        table = await loop.run_in_executor(None, self.pools.adopt)
        if table is None:
            table = await loop.run_in_executor(None, self.pools.start)
        self._publish(version=table.version)
        self._loop_task = asyncio.ensure_future(self._control_loop())

    # ---- gateways ------------------------------------------------------------------------------
    async def report(
        self, gateway_id: str, version: int, load: dict | None = None, stats: dict | None = None
    ) -> dict:
        """A gateway's heartbeat: the version it uses (its acknowledgement), its load since the last
        report and its stats. The reply has the table when the gateway's is not the current one."""
        await self.ready()
        rec = self.gateways.setdefault(gateway_id, GatewayRecord(version, time.monotonic()))
        rec.version, rec.seen, rec.stats = version, time.monotonic(), stats or rec.stats
        rec.serving |= stats is not None
        if load:
            self.load.add(load)
        if version > self.table.version:  # a gateway saw a later table than this (restarted) controller
            self._publish(version=version + 1)
        reply = {
            "version": self.table.version,
            "uncovered": list(self.uncovered),
            "gateways": self._serving_gateways(),
        }
        if version != self.table.version:
            reply |= self.table_now()
        return reply

    def table_now(self) -> dict:
        """The current table and its workers' handles and keys (a key changes when its process does)."""
        return {
            "table": self.table,
            "workers": [w.handle for w in self.serving],
            "keys": [f"{w.name}@{w.pid}" for w in self.serving],
        }

    async def attach(self, gateway_id: str) -> dict:
        """A gateway starting (or restarting): the current table, nothing else touched."""
        return await self.report(gateway_id, -1)

    def _live_gateways(self) -> dict[str, GatewayRecord]:
        """Gateways heard from lately, attaching ones included (a move waits for them too)."""
        now = time.monotonic()
        return {g: r for g, r in self.gateways.items() if now - r.seen <= self.control.gateway_timeout_s}

    def _serving_gateways(self) -> dict[str, dict]:
        """Live gateways that serve (their report loop runs), with their stats: what `status` and
        ModelInfo list, and what readiness counts. An attached gateway still loading is not one."""
        return {g: {"version": r.version, **r.stats} for g, r in self._live_gateways().items() if r.serving}

    async def _acknowledged(self, version: int) -> bool:
        """Wait until every live gateway uses `version` (or later); False if some did not in time."""
        deadline = time.monotonic() + self.control.ack_timeout_s
        while time.monotonic() < deadline:
            if all(r.version >= version for r in self._live_gateways().values()):
                return True
            await asyncio.sleep(0.05)
        return False

    # ---- the table -----------------------------------------------------------------------------
    def _publish(self, workers: list[Worker] | None = None, version: int | None = None) -> None:
        """Make the table of the healthy workers (plus unhealthy ones whose experts nobody else
        holds) the current one, under a new version."""
        pool = list(self.pools.workers) if workers is None else workers
        healthy = [w for w in pool if w.name not in self.unhealthy]
        covered = {e for w in healthy for e in w.experts}
        E = self.pools.model_cfg.num_experts
        self.uncovered = sorted(set(range(E)) - covered)
        need = set(self.uncovered)
        serving = [w for w in pool if w.name not in self.unhealthy or need & set(w.experts)]
        v = version if version is not None else (self.table.version + 1 if self.table else 1)
        self.table = RoutingTable(v, tuple(w.experts for w in serving), E)
        self.serving = serving
        for w in pool:  # fire and forget: a restarted controller starts above the highest noted
            w.handle.note_table.remote(v)

    def pid(self) -> int:
        import os

        return os.getpid()

    def load_snapshot(self) -> dict:
        """The summed load so far (for `rebalance(since=...)`)."""
        return self.load.snapshot()

    def status(self) -> dict:
        return {
            "version": self.table.version if self.table else 0,
            "uncovered": list(self.uncovered),
            "workers": [
                {
                    "name": w.name,
                    "experts": list(w.experts),
                    "pid": w.pid,
                    "node_id": w.node_id,
                    "healthy": w.name not in self.unhealthy,
                    "serving": any(s.name == w.name for s in self.serving),
                }
                for w in self.pools.workers
            ],
            "gateways": self._serving_gateways(),
            "history": list(self.history),
        }

    # ---- health --------------------------------------------------------------------------------
    async def _control_loop(self) -> None:
        metrics = LoadMetrics(self.control.metrics_per_layer) if self.control.metrics else None
        since, last_rebalance = self.load.snapshot(), time.monotonic()
        scale_since, last_scale = self.load.snapshot(), time.monotonic()
        while True:
            await asyncio.sleep(self.control.probe_every_s)
            try:
                await self._probe()
                if metrics:
                    metrics.export(self)
                now = time.monotonic()
                if self.control.rebalance_every_s and now - last_rebalance >= self.control.rebalance_every_s:
                    if window(since, self.load.snapshot())["expert_tokens"].sum() > 0:  # fresh load only
                        await self.rebalance(since)
                    since, last_rebalance = self.load.snapshot(), time.monotonic()
                if self.control.autoscale and now - last_scale >= self.control.autoscale_every_s:
                    snap = self.load.snapshot()
                    rate = float(window(scale_since, snap)["expert_tokens"].sum()) / (now - last_scale)
                    target = self.control.autoscale.decide(len(self.pools.workers), rate)
                    scale_since, last_scale = snap, now
                    if target != len(self.pools.workers):
                        await self.scale_to(target)
                if self.control.serve_app and not self._live_gateways() and await self._serve_app_gone():
                    await self.shutdown()
                    return
            except Exception as e:  # the loop goes on; the next tick tries again  # noqa: BLE001
                print(f"yuan-serve controller: {type(e).__name__}: {e}", flush=True)

    async def _probe(self) -> None:
        workers = list(self.pools.workers)
        results = await asyncio.gather(
            *[asyncio.wait_for(w.handle.info.remote(), self.control.probe_timeout_s) for w in workers],
            return_exceptions=True,
        )
        changed, now = False, time.monotonic()
        for w, res in zip(workers, results):
            if isinstance(res, BaseException):
                if w.name not in self.unhealthy:
                    self.unhealthy[w.name], changed = now, True
                elif now - self.unhealthy[w.name] >= self.control.replace_after_s:
                    await self._replace(w)
                continue
            if res["pid"] != w.pid:  # Ray restarted it: its experts are its constructor's again
                w.pid, w.node_id, changed = res["pid"], res["node_id"], True
                if sorted(res["experts"]) != sorted(w.experts):
                    await w.handle.set_experts.remote(list(w.experts), self.table.version)
            if w.name in self.unhealthy:
                del self.unhealthy[w.name]
                changed = True
        if changed:
            async with self._move:
                self._publish()

    async def _replace(self, old: Worker) -> None:
        """A new pool holding `old`'s experts takes its place; `old` stops once every gateway moved."""
        async with self._move:
            t0 = time.monotonic()
            new = await asyncio.get_running_loop().run_in_executor(
                None, self.pools.add_worker, list(old.experts)
            )
            order = [new if w.name == old.name else w for w in self.pools.workers if w.name != new.name]
            self.pools.workers = order
            self.unhealthy.pop(old.name, None)
            self._publish()
            await self._acknowledged(self.table.version)
            self.pools.remove_worker(old)
            self.history.append(
                {
                    "kind": "replace",
                    "old": old.name,
                    "new": new.name,
                    "seconds": time.monotonic() - t0,
                    "version": self.table.version,
                }
            )

    # ---- moves ---------------------------------------------------------------------------------
    def plan(self, since: dict | None = None, num_workers: int | None = None) -> RoutingTable:
        """The placement that balances the load measured since the snapshot `since` (or ever)."""
        snap = self.load.snapshot()
        load = window(since, snap) if since is not None else snap
        per_expert = [n + 1 for n in load["expert_tokens"].sum(0).tolist()]  # +1: unseen experts still placed
        pair_counts = load["pair_tokens"]
        pairs = {(a, b): float(pair_counts[a, b]) for a, b in pair_counts.nonzero().tolist()}
        n = num_workers or len(self.pools.workers)
        slots = self.control.slots_per_pool or -(-len(per_expert) // n) + 4
        slots = max(slots, -(-len(per_expert) // n))
        return balanced_placement(per_expert, n, slots, self.table.version + 1, pairs)

    async def rebalance(self, since: dict | None = None) -> dict:
        """Re-place expert replicas from the measured load; returns `status()`."""
        async with self._move:
            await self._apply(self.plan(since), list(self.pools.workers), "rebalance")
        return self.status()

    async def scale_to(self, n: int) -> dict:
        """Resize the pool set to n workers (new ones start off the critical path; removed ones stop
        only after every gateway took a table without them)."""
        async with self._move:
            loop, t0 = asyncio.get_running_loop(), time.monotonic()
            before = len(self.pools.workers)
            while len(self.pools.workers) < n:
                await loop.run_in_executor(None, self.pools.add_worker, [])
            keep, gone = self.pools.workers[:n], self.pools.workers[n:]
            await self._apply(self.plan(None, num_workers=n), keep, "scale")
            for w in gone:
                self.pools.remove_worker(w)
            self.history.append(
                {
                    "kind": "scale",
                    "from": before,
                    "to": n,
                    "seconds": time.monotonic() - t0,
                    "version": self.table.version,
                }
            )
        return self.status()

    async def _apply(self, new: RoutingTable, workers: list[Worker], kind: str) -> None:
        """grow (each worker loads what it will newly hold, keeping what it has), publish, wait for
        the gateways, shrink (each drops what the new table no longer sends it)."""
        t0 = time.monotonic()
        await asyncio.gather(
            *[
                w.handle.set_experts.remote(sorted(set(w.experts) | set(e)))
                for w, e in zip(workers, new.workers)
            ]
        )
        for w, e in zip(workers, new.workers):
            w.experts = tuple(e)
        self._publish(workers, version=new.version)
        await self._acknowledged(self.table.version)
        await asyncio.gather(
            *[w.handle.set_experts.remote(list(e), self.table.version) for w, e in zip(workers, new.workers)]
        )
        if kind == "rebalance":
            self.history.append(
                {"kind": kind, "seconds": time.monotonic() - t0, "version": self.table.version}
            )

    # ---- the end -------------------------------------------------------------------------------
    async def _serve_app_gone(self) -> bool:
        try:
            from ray import serve

            return self.control.serve_app not in serve.status().applications
        except Exception:  # noqa: BLE001
            return False

    async def shutdown(self) -> None:
        """Stop every pool and placement group of this application."""
        if self._loop_task is not None and self._loop_task is not asyncio.current_task():
            self._loop_task.cancel()
        await asyncio.get_running_loop().run_in_executor(None, self.pools.shutdown)


ControllerActor = ray.remote(Controller)


def start_controller(
    app: str, pools: PoolConfig, control: ControlConfig = ControlConfig(), timeout_s: float = 300.0
):
    """Get this application's controller, starting it if there is none; returns its handle once its
    pools are up."""
    handle = ControllerActor.options(
        name=controller_name(app),
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        num_cpus=0,
    ).remote(app, pools, control)
    ray.get(handle.ready.remote(), timeout=timeout_s)
    return handle


def stop_controller(app: str, timeout_s: float = 60.0) -> None:
    """Stop an application's pools and its controller (no-op if there is none)."""
    try:
        handle = ray.get_actor(controller_name(app), namespace=NAMESPACE)
    except ValueError:
        return
    try:
        ray.get(handle.shutdown.remote(), timeout=timeout_s)
    finally:
        ray.kill(handle, no_restart=True)


class LoadMetrics:
    """The summed load as Prometheus metrics through Ray's metrics agent (labels bounded: per expert
    and per worker; per layer only when asked)."""

    def __init__(self, per_layer: bool) -> None:
        from ray.util.metrics import Counter, Gauge

        self.per_layer = per_layer
        tags = ("layer", "expert") if per_layer else ("expert",)
        self.expert = Counter("yuan_expert_tokens", "Tokens routed to each expert", tag_keys=tags)
        self.pairs = Counter(
            "yuan_pool_pairs", "(token, expert) pairs computed per pool worker", tag_keys=("worker",)
        )
        self.compute = Counter(
            "yuan_pool_compute_seconds", "Expert math time per pool worker", tag_keys=("worker",)
        )
        self.workers = Gauge("yuan_pool_workers", "Expert-pool workers in the routing table")
        self.version = Gauge("yuan_routing_table_version", "Routing table version in use")
        self.gateways = Gauge("yuan_gateways", "Gateways reporting to the controller")
        self._last: dict | None = None

    def export(self, controller: Controller) -> None:
        snap = controller.load.snapshot()
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
        self.workers.set(len(controller.serving))
        self.version.set(controller.table.version)
        self.gateways.set(len(controller._serving_gateways()))
        self._last = snap
