"""The gateway's side of the expert step: plan, send to the pools, await all, combine.

Per layer one request goes to every worker that has work, all in flight at once. Each worker is
reached by its transport: the data plane (`experts/dataplane.py`) by default, where pools on this
node compute their span of a batch and plan written once to shared memory, straight into the pairs'
output slots, and pools on other nodes get their rows over TCP; or plain Ray actor calls, which stay
as the fallback: a worker whose data plane fails is served by Ray calls from then on (`fallbacks`
counts them). Once every reply is in, each token's slots are added (`sum_slots`). `submit`/`wait`
split a layer's call so two micro-batches can overlap; each micro-batch (`lane`) has its own
connections. The routing table can be swapped between steps (`set_table`) without touching this path.

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
from experts.dataplane import DataPlaneError, PoolChannel, SharedBatch
from experts.wire import decode, encode
from model.experts import scatter_rows, sum_slots
from router.load import LoadTracker
from router.plan import DispatchPlan, DispatchTable, WorkerRequest, plan_dispatch

TRANSPORTS = ("dataplane", "ray")
LANES = 2


@dataclass
class Pending:
    """One layer's requests in flight."""

    layer: int
    lane: int
    x: torch.Tensor
    plan: DispatchPlan
    handles: list  # per span of the plan: the PoolChannel it went to, or an ObjectRef (Ray)
    outputs: torch.Tensor | None = None  # the output slots `[T*A, d]`: the lane's shared batch once written


class PoolDispatcher:
    def __init__(self, table: RoutingTable, workers: list, transport: str = "dataplane",
                 num_layers: int = 1) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.transport = transport
        self.outstanding: dict[int, int] = {}  # pairs in flight per worker
        self.load = LoadTracker(num_layers, table.num_experts)
        self.fallbacks = 0
        self.faults = 0
        self.recovery_timeout_s = 120.0
        self.replace_after_s = 30.0  # a worker unusable this long is replaced (Ray's restart comes first)
        self.replaced = 0
        self.replace_worker = None  # (old handle, expert ids) -> new ready handle; set by the deployment
        self._channels: dict[tuple[int, int], PoolChannel] = {}
        self._local_pools = False  # some channel reaches its pool through the shared batch (kept after a drop)
        self._batches = [SharedBatch() for _ in range(LANES)]  # per lane: the batch pools on this node read
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
        self._close_channels()
        self._channels = kept
        self._local_pools = any(c.shared for c in kept.values())
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
                    self._local_pools |= self._channels[(w, lane)].shared
            except OSError:
                self._drop(w)

    def experts(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        return self.wait(self.submit(layer, x, expert_ids, weights))

    def submit(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
               lane: int = 0) -> Pending:
        into = None
        if self._local_pools:  # build the plan right in the lane's shared batch
            into = self._batches[lane].reserve(x.shape[0], expert_ids.shape[1], x.shape[1], x.dtype)
        plan = plan_dispatch(expert_ids, weights, self._plan, self.outstanding, into)
        pending = Pending(layer, lane, x, plan, [])
        for span in plan.spans:
            pending.handles.append(self._send(span, pending))
        # Bookkeeping after the sends: the pools are already working while it runs.
        for w, start, end in plan.spans:
            self.outstanding[w] = self.outstanding.get(w, 0) + end - start
        self.load.record_routing(layer, expert_ids)
        return pending

    def wait(self, pending: Pending) -> torch.Tensor:
        x, plan = pending.x, pending.plan
        try:
            parts = [self._receive(span, h, pending) for span, h in zip(plan.spans, pending.handles)]
            outputs = pending.outputs
            if outputs is None:
                outputs = torch.empty(plan.tokens * plan.top_k, x.shape[1], dtype=x.dtype)
            for (_, start, end), part in zip(plan.spans, parts):
                if part is not None:  # not already in the shared slots
                    scatter_rows(outputs, plan.slots[start:end], part)
            return sum_slots(outputs.view(plan.tokens, plan.top_k, x.shape[1]))
        finally:
            for w, start, end in pending.plan.spans:
                self.outstanding[w] -= end - start

    def _send(self, span: tuple[int, int, int], pending: Pending):
        worker, start, end = span
        channel = self._channels.get((worker, pending.lane))
        if channel is not None:
            try:
                if channel.shared:
                    batch = self._batches[pending.lane]
                    if pending.outputs is None:
                        batch.write(pending.x)  # the plan is in it already (`reserve` in submit)
                        pending.outputs = batch.outputs
                    channel.send_shared(pending.layer, batch, start, end)
                else:
                    r = pending.plan.request(span)
                    channel.send(pending.layer, pending.x, r.expert_ids.view(-1), r.weights.view(-1), rows=r.rows)
                return channel
            except DataPlaneError:
                self._drop(worker)
        return self._ray_call(pending.plan.request(span), pending.layer, pending.x)

    def _receive(self, span: tuple[int, int, int], handle, pending: Pending) -> torch.Tensor | None:
        """A worker's outputs `[n, d]` by whatever road is still open; None when they are already in
        the shared output slots."""
        worker, start, end = span
        if isinstance(handle, PoolChannel):
            try:
                out = handle.recv()
                self.load.record_request(worker, end - start, handle.last_compute_s)
                return out
            except DataPlaneError:  # resend this request the Ray way
                self._drop(worker)
                handle = self._ray_call(pending.plan.request(span), pending.layer, pending.x)
        self.load.record_request(worker, end - start)
        try:
            return decode(ray.get(handle), pending.x.dtype)
        except (RayActorError, ActorUnavailableError):
            return self._recover(pending.plan.request(span), pending)

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
                    return decode(ray.get(self._ray_call(r, pending.layer, x, worker=w)), x.dtype)
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

    def _ray_call(self, r: WorkerRequest, layer: int, x: torch.Tensor, worker: int | None = None):
        """The request (its rows of x) as a plain Ray actor call, to its worker or to `worker` (another replica)."""
        target = self.workers[r.worker if worker is None else worker]
        return target.compute.remote(layer, encode(x.index_select(0, r.rows)), encode(r.expert_ids), encode(r.weights))

    def _drop(self, worker: int) -> None:
        """Stop using a worker's data plane (it failed); Ray calls serve it from now on."""
        self.fallbacks += 1
        for lane in range(LANES):
            channel = self._channels.pop((worker, lane), None)
            if channel is not None:
                channel.close()

    def _close_channels(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def close(self) -> None:
        self._close_channels()
        for batch in self._batches:
            batch.close()
