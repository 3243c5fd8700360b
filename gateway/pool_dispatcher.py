"""The gateway's side of the expert step: plan, send to the pools, await all, combine.

Per layer one request goes to every worker that has work, all in flight at once. Each worker is
reached by its transport: the data plane (`experts/dataplane.py`, shared memory on one node, TCP
across nodes) by default, or plain Ray actor calls, which stay as the fallback: a worker whose data
plane fails is served by Ray calls from then on (`fallbacks` counts them). `submit`/`wait` split a
layer's call so two micro-batches can overlap; each micro-batch (`lane`) has its own connections.
The routing table can be swapped between steps (`set_table`) without touching this path.

Faults: when a worker dies mid-step, its request goes again to another worker holding all of its
experts, or, when it held the only copy, waits for Ray to restart it (pools run with
`max_restarts`), puts the table's experts back on it and reconnects its data plane. A worker that
stays unusable for `replace_after_s` (it keeps dying, or has no restarts left) leaves the routing
table: a new worker started by `replace_worker` takes its place under a new table version. `faults` counts such
events so the gateway can flag the requests they delayed.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from cluster.placement import RoutingTable
from experts.dataplane import DataPlaneError, PoolChannel
from experts.wire import decode, encode
from router.load import LoadTracker
from router.plan import DispatchTable, WorkerRequest, combine, plan_dispatch

TRANSPORTS = ("dataplane", "ray")
LANES = 2


@dataclass
class Pending:
    """One layer's requests in flight."""

    layer: int
    lane: int
    x: torch.Tensor
    requests: list[WorkerRequest]
    handles: list  # per request: an ObjectRef (Ray) or the PoolChannel that was sent to


class PoolDispatcher:
    def __init__(self, table: RoutingTable, workers: list, transport: str = "dataplane",
                 num_layers: int = 1) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.transport = transport
        self.outstanding: dict[int, int] = {}  # tokens in flight per worker
        self.load = LoadTracker(num_layers, table.num_experts)
        self.fallbacks = 0
        self.faults = 0
        self.recovery_timeout_s = 120.0
        self.replace_after_s = 30.0  # a worker unusable this long is replaced (Ray's restart comes first)
        self.replaced = 0
        self.replace_worker = None  # (old handle, expert ids) -> new ready handle; set by the deployment
        self._channels: dict[tuple[int, int], PoolChannel] = {}
        self.set_table(table, workers)

    def set_table(self, table: RoutingTable, workers: list) -> None:
        """Switch to a new routing table (call between steps). Connections to workers that stay
        are kept; new workers get theirs; gone ones are closed."""
        if len(workers) != len(table.workers):
            raise ValueError(f"routing table v{table.version} has {len(table.workers)} workers, "
                             f"got {len(workers)} handles")
        old = {id(h): w for w, h in enumerate(getattr(self, "workers", []))}
        kept = {(w, lane): self._channels.pop((old[id(h)], lane))
                for w, h in enumerate(workers) if id(h) in old for lane in range(LANES)
                if (old[id(h)], lane) in self._channels}
        self.close()
        self._channels = kept
        self.table, self.workers, self._plan = table, list(workers), DispatchTable(table.replica_lists())
        self._connect([w for w in range(len(workers)) if (w, 0) not in kept])

    def _connect(self, workers: list[int]) -> None:
        """Open the data plane to these workers, every lane; one that cannot be reached is served
        by Ray calls."""
        if self.transport != "dataplane" or not workers:
            return
        here = socket.gethostname()
        for w, info in zip(workers, ray.get([self.workers[w].open_data_plane.remote() for w in workers])):
            try:
                for lane in range(LANES):
                    self._channels[(w, lane)] = PoolChannel(info["address"], same_node=info["host"] == here)
            except OSError:
                self._drop(w)

    def experts(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        return self.wait(self.submit(layer, x, expert_ids, weights))

    def submit(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
               lane: int = 0) -> Pending:
        requests = plan_dispatch(expert_ids, weights, self._plan, self.outstanding)
        self.load.record_routing(layer, expert_ids)
        handles = []
        for r in requests:
            n = int(r.rows.numel())
            self.outstanding[r.worker] = self.outstanding.get(r.worker, 0) + n
            self.load.record_request(r.worker, n, r.pairs)
            handles.append(self._send(r, layer, x, lane))
        return Pending(layer, lane, x, requests, handles)

    def wait(self, pending: Pending) -> torch.Tensor:
        x = pending.x
        try:
            partials = [self._receive(r, h, pending) for r, h in zip(pending.requests, pending.handles)]
            return combine(x.shape[0], x.shape[1], pending.requests, partials, x.dtype)
        finally:
            for r in pending.requests:
                self.outstanding[r.worker] -= int(r.rows.numel())

    def _send(self, r: WorkerRequest, layer: int, x: torch.Tensor, lane: int):
        channel = self._channels.get((r.worker, lane))
        if channel is not None:
            try:
                channel.send(layer, x, r.expert_ids, r.weights, rows=r.rows)
                return channel
            except DataPlaneError:
                self._drop(r.worker)
        return self._ray_call(r, layer, x[r.rows])

    def _receive(self, r: WorkerRequest, handle, pending: Pending) -> torch.Tensor:
        x = pending.x
        if isinstance(handle, PoolChannel):
            try:
                out = handle.recv()
                self.load.record_compute(r.worker, handle.last_compute_s)
                return out
            except DataPlaneError:  # resend this request the Ray way
                self._drop(r.worker)
                handle = self._ray_call(r, pending.layer, x[r.rows])
        try:
            return decode(ray.get(handle), x.dtype)
        except (RayActorError, ActorUnavailableError):
            return self._recover(r, pending)

    def _recover(self, r: WorkerRequest, pending: Pending) -> torch.Tensor:
        """The worker died: another replica holding all of the request's experts computes it, or the
        restarted worker does once Ray has brought it back."""
        self.faults += 1
        failing_since = time.monotonic()
        x, needed = pending.x, set(r.expert_ids[r.expert_ids >= 0].tolist())
        others = [w for w, held in enumerate(self.table.workers) if w != r.worker and needed <= set(held)]
        deadline = time.monotonic() + self.recovery_timeout_s
        while True:
            for w in others + [r.worker]:
                try:
                    if w == r.worker:
                        self._resync(w)
                    return decode(ray.get(self._ray_call(r, pending.layer, x[r.rows], worker=w)), x.dtype)
                except (RayActorError, ActorUnavailableError, GetTimeoutError):
                    if w == r.worker and time.monotonic() - failing_since >= self.replace_after_s:
                        self._replace(w)
                        failing_since = time.monotonic()
            if time.monotonic() > deadline:
                raise RuntimeError(f"expert pool worker {r.worker} did not come back within "
                                   f"{self.recovery_timeout_s:.0f}s and no other replica holds experts {sorted(needed)}")
            time.sleep(0.2)

    def _replace(self, worker: int) -> None:
        """Take a failing worker out of the table: a new one holding its experts takes its index,
        under a new table version."""
        if self.replace_worker is None:
            return
        old = self.workers[worker]
        self._drop(worker)
        self.workers[worker] = self.replace_worker(old, list(self.table.workers[worker]))
        self.table = RoutingTable(self.table.version + 1, self.table.workers, self.table.num_experts)
        self.replaced += 1

    def _resync(self, worker: int) -> None:
        """A restarted worker: give it this table's experts again and reconnect its data plane."""
        info = ray.get(self.workers[worker].info.remote(), timeout=5)
        if info["experts"] != list(self.table.workers[worker]):
            ray.get(self.workers[worker].set_experts.remote(list(self.table.workers[worker])))
        if (worker, 0) not in self._channels:
            self._connect([worker])

    def _ray_call(self, r: WorkerRequest, layer: int, rows: torch.Tensor, worker: int | None = None):
        """The request as a plain Ray actor call, to its worker or to `worker` (another replica)."""
        target = self.workers[r.worker if worker is None else worker]
        return target.compute.remote(layer, encode(rows), encode(r.expert_ids), encode(r.weights))

    def _drop(self, worker: int) -> None:
        """Stop using a worker's data plane (it failed); Ray calls serve it from now on."""
        self.fallbacks += 1
        for lane in range(LANES):
            channel = self._channels.pop((worker, lane), None)
            if channel is not None:
                channel.close()

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
