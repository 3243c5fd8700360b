"""The gateway's side of the expert step: plan, send to the pools, await all, combine.

Per layer one request goes to every worker that has work, all in flight at once. Each worker is
reached by its transport: the data plane (`gateway/channel.py` to `experts/dataplane.py`) by
default, where pools on this Ray node compute their span of a batch and plan written once to shared
memory, straight into the pairs' output slots, and pools on other nodes get their rows over TCP; or
plain Ray actor calls, which stay as the fallback: a worker whose data plane fails is served by Ray
calls (`fallbacks` counts them). Once every reply is in, each token's slots are added (`sum_slots`).
`submit`/`wait` split a layer's call so two micro-batches can overlap; each micro-batch (`lane`)
has its own connections. The routing table can be swapped between steps (`set_table`) without
touching this path; workers are known by their keys (name@pid), so a restarted pool is reconnected.

Every wait is bounded. A data-plane reply has a deadline from the worker's recent round trips
(`ReplyDeadline`: a multiple of their p99, per pair, with a floor). Past it, when other workers hold
every expert of the span, the span is computed by one of them (a Ray call) and the slow worker is
*suspect*: its connections close, planning leaves it out while others hold its experts, the lane's
shared region is renewed (a late write from it lands in the old one), until the next table (the
controller's health probes decide whether it stays out). With no other holder the request waits for
it, up to `recovery_timeout_s`. A worker that
died is recovered the same way: another holder, or the worker once Ray has restarted it, or the
holders of the controller's latest table (`fetch_table`); `faults` counts such events so the gateway
can flag the requests they delayed.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from gateway.channel import PoolChannel, SharedBatch
from model.experts import scatter_rows, sum_slots
from router.dataplane import DataPlaneError, DataPlaneTimeout
from router.load import LoadTracker
from router.plan import DispatchPlan, DispatchTable, WorkerRequest, plan_dispatch
from router.table import RoutingTable
from router.wire import decode, encode

TRANSPORTS = ("dataplane", "ray")
LANES = 2
_RAY_FAULTS = (RayActorError, ActorUnavailableError, GetTimeoutError, RayTaskError)


class ReplyDeadline:
    """How long one worker's reply may take: `multiple` x the p99 of its recent round trips (per
    pair, times the pairs asked, or whole, whichever is larger), never under `floor_s`; `cold_s`
    until `min_samples` round trips are known."""

    def __init__(
        self,
        floor_s: float = 0.05,
        multiple: float = 20.0,
        cold_s: float = 2.0,
        window: int = 256,
        min_samples: int = 16,
    ) -> None:
        self.floor_s, self.multiple, self.cold_s, self.min_samples = floor_s, multiple, cold_s, min_samples
        self._whole: deque[float] = deque(maxlen=window)
        self._per_pair: deque[float] = deque(maxlen=window)
        self._p99 = (0.0, 0.0)
        self._since = 0

    def record(self, seconds: float, pairs: int) -> None:
        self._whole.append(seconds)
        self._per_pair.append(seconds / max(1, pairs))
        self._since += 1
        if self._since >= 32 or len(self._whole) == self.min_samples:  # a quantile every 32 samples
            self._since = 0
            self._p99 = (float(np.quantile(self._whole, 0.99)), float(np.quantile(self._per_pair, 0.99)))

    def seconds(self, pairs: int) -> float:
        if len(self._whole) < self.min_samples:
            return self.cold_s
        whole, per_pair = self._p99
        return max(self.floor_s, self.multiple * max(whole, per_pair * pairs))


@dataclass
class Pending:
    """One layer's requests in flight."""

    layer: int
    lane: int
    x: torch.Tensor
    plan: DispatchPlan
    handles: list  # per span of the plan: the PoolChannel it went to, or an ObjectRef (Ray)
    outputs: torch.Tensor | None = None  # the output slots `[T*A, d]`: the lane's shared batch once written
    sent_at: float = 0.0
    device: torch.device = torch.device("cpu")  # where the caller's tensors live (the result goes back there)


class PoolDispatcher:
    def __init__(
        self,
        table: RoutingTable,
        workers: list,
        transport: str = "dataplane",
        num_layers: int = 1,
        keys: list[str] | None = None,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.transport = transport
        self.outstanding: dict[int, int] = {}  # pairs in flight per worker
        self.load = LoadTracker(num_layers, table.num_experts)
        self.fallbacks = 0
        self.faults = 0
        self.timeouts = 0  # replies that missed their deadline
        self.recovery_timeout_s = 120.0  # the longest a span waits for a worker that has no other holder
        self.call_timeout_s = 2.0  # one Ray call's deadline (a fallback, recovery, opening a data plane)
        self.fetch_table = None  # () -> {"table", "workers", "keys"}: the controller's current one
        self.keys: list[str] = []
        self._channels: dict[tuple[int, int], PoolChannel] = {}
        self._deadlines: list[ReplyDeadline] = []  # per worker of the table (kept by key across tables)
        self._suspect: set[int] = set()  # workers that missed a deadline, left out until the next table
        self._stale_lanes: set[int] = set()  # lanes whose shared region a suspect worker may still write
        self._local_pools = (
            False  # some channel reaches its pool through the shared batch (kept after a drop)
        )
        self._batches = [SharedBatch() for _ in range(LANES)]  # per lane: the batch pools on this node read
        self._pinned: dict[tuple[int, int], torch.Tensor] = {}  # (lane, argument) -> page-locked staging
        self._node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        self.set_table(table, workers, keys)

    def set_table(self, table: RoutingTable, workers: list, keys: list[str] | None = None) -> None:
        """Switch to a new routing table (call between steps). Connections to workers that stay
        (same key) are kept; new workers get theirs; gone ones are closed."""
        if len(workers) != len(table.workers):
            raise ValueError(
                f"routing table v{table.version} has {len(table.workers)} workers, got {len(workers)} handles"
            )
        keys = list(keys) if keys is not None else [f"handle-{id(h)}" for h in workers]
        old = {k: w for w, k in enumerate(self.keys)}
        kept = {
            (w, lane): self._channels.pop((old[k], lane))
            for w, k in enumerate(keys)
            if k in old
            for lane in range(LANES)
            if (old[k], lane) in self._channels
        }
        self._close_channels()
        self._channels = kept
        self._local_pools = any(c.shared for c in kept.values())
        by_key = dict(zip(self.keys, self._deadlines))  # a worker that stays keeps its round-trip history
        self._deadlines = [by_key.get(k) or ReplyDeadline() for k in keys]
        self.table, self.workers, self.keys = table, list(workers), keys
        self.outstanding = {}  # between steps nothing is in flight; indices now mean this table's workers
        self._replicas = table.replica_lists()
        self._suspect.clear()
        self._plan = DispatchTable(self._replicas)
        self._connect([w for w in range(len(workers)) if (w, 0) not in kept])

    def _connect(self, workers: list[int]) -> None:
        """Open the data plane to these workers, every lane; one that cannot be reached is served
        by Ray calls. Same Ray node id: shared memory; another node: TCP."""
        if self.transport != "dataplane" or not workers:
            return
        refs = [self.workers[w].open_data_plane.remote() for w in workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.call_timeout_s)
        for w, ref in zip(workers, refs):
            if ref not in ready:
                continue  # hung or gone: Ray calls (bounded) until the next table
            try:
                info = ray.get(ref)
            except _RAY_FAULTS:
                continue
            same_node = bool(self._node_id) and info.get("node_id") == self._node_id
            try:
                for lane in range(LANES):
                    self._channels[(w, lane)] = PoolChannel(info["address"], same_node=same_node)
                    self._local_pools |= self._channels[(w, lane)].shared
            except OSError:
                self._drop(w)

    def deadline(self, worker: int) -> ReplyDeadline:
        return self._deadlines[worker]

    def experts(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        return self.wait(self.submit(layer, x, expert_ids, weights))

    def submit(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, lane: int = 0
    ) -> Pending:
        device = x.device
        if device.type != "cpu":  # the data plane moves host memory: stage through pinned buffers
            x, expert_ids, weights = self._stage(lane, x, expert_ids, weights)
        into = None
        if self._local_pools:  # build the plan right in the lane's shared batch
            into = self._batches[lane].reserve(x.shape[0], expert_ids.shape[1], x.shape[1], x.dtype)
        plan = plan_dispatch(expert_ids, weights, self._plan, self.outstanding, into)
        pending = Pending(layer, lane, x, plan, [], sent_at=time.perf_counter(), device=device)
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
            out = sum_slots(outputs.view(plan.tokens, plan.top_k, x.shape[1]))
            return out if pending.device.type == "cpu" else out.to(pending.device, non_blocking=True)
        finally:
            for w, start, end in pending.plan.spans:
                self.outstanding[w] -= end - start
            if pending.lane in self._stale_lanes:  # a suspect may write into it late: use a new region
                self._stale_lanes.discard(pending.lane)
                self._batches[pending.lane].close()

    def _stage(self, lane: int, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Host copies of a GPU gateway's tensors in page-locked buffers (one per lane and argument,
        grown as needed), made by non-blocking copies and one wait. A lane's next submit comes after
        its last wait, so its buffers are free again by then."""
        out = []
        for i, t in enumerate(tensors):
            buf = self._pinned.get((lane, i))
            if buf is None or buf.numel() < t.numel() or buf.dtype != t.dtype:
                buf = torch.empty(max(1, t.numel()), dtype=t.dtype, pin_memory=True)
                self._pinned[(lane, i)] = buf
            host = buf[: t.numel()].view(t.shape)
            host.copy_(t, non_blocking=True)
            out.append(host)
        torch.cuda.current_stream(tensors[0].device).synchronize()
        return out

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
                    channel.send(
                        pending.layer, pending.x, r.expert_ids.view(-1), r.weights.view(-1), rows=r.rows
                    )
                return channel
            except DataPlaneError:
                self._drop(worker)
        return self._ray_call(pending.plan.request(span), pending.layer, pending.x)

    def _receive(self, span: tuple[int, int, int], handle, pending: Pending) -> torch.Tensor | None:
        """A worker's outputs `[n, d]` by whatever road is still open; None when they are already in
        the shared output slots."""
        worker, start, end = span
        r = None
        if isinstance(handle, PoolChannel):
            deadline = self.deadline(worker)
            try:
                handle.set_deadline(
                    max(0.001, deadline.seconds(end - start) - (time.perf_counter() - pending.sent_at))
                )
                out = handle.recv()
                deadline.record(time.perf_counter() - pending.sent_at, end - start)
                self.load.record_request(worker, end - start, handle.last_compute_s)
                return out
            except DataPlaneTimeout:
                self.timeouts += 1
                r = pending.plan.request(span)
                if not self._others_hold(r):  # nobody else can: wait for this one to recover
                    try:
                        handle.set_deadline(self.recovery_timeout_s)
                        out = handle.recv()
                        self.faults += 1
                        self.load.record_request(worker, end - start, handle.last_compute_s)
                        return out
                    except DataPlaneError:
                        self._drop(worker)
                        return self._recover(r, pending)
                self._mark_suspect(worker)
                return self._recover(r, pending)
            except DataPlaneError:  # resend this request the Ray way
                self._drop(worker)
                handle = self._ray_call(pending.plan.request(span), pending.layer, pending.x)
        self.load.record_request(worker, end - start)
        try:
            return decode(ray.get(handle, timeout=self._call_timeout(worker, end - start)), pending.x.dtype)
        except _RAY_FAULTS:
            return self._recover(r or pending.plan.request(span), pending)

    def _call_timeout(self, worker: int, pairs: int) -> float:
        """A Ray call's deadline: `call_timeout_s`, or longer where the worker's round trips say so."""
        return max(self.call_timeout_s, 5 * self.deadline(worker).seconds(pairs))

    def _others_hold(self, r: WorkerRequest) -> bool:
        needed = set(r.expert_ids[r.expert_ids >= 0].tolist())
        return any(
            needed <= set(held)
            for w, held in enumerate(self.table.workers)
            if w != r.worker and w not in self._suspect
        )

    def _mark_suspect(self, worker: int) -> None:
        """Leave a worker that missed its deadline out of planning while others hold its experts."""
        self._drop(worker)
        self._suspect.add(worker)
        self._stale_lanes = set(range(LANES))
        self._plan = DispatchTable(
            [[w for w in holders if w not in self._suspect] or holders for holders in self._replicas]
        )

    def _recover(self, r: WorkerRequest, pending: Pending) -> torch.Tensor:
        """The worker is dead or hung: another worker holding all of the request's experts computes
        it, or the worker once Ray has restarted it, or a holder in the controller's latest table."""
        self.faults += 1
        x, needed = pending.x, set(r.expert_ids[r.expert_ids >= 0].tolist())
        deadline = time.monotonic() + self.recovery_timeout_s
        candidates = self._holders(needed, self.table.workers, self.workers, skip=r.worker)
        candidates.append(self.workers[r.worker])
        while True:
            for target in candidates:
                try:
                    ref = self._ray_call(r, pending.layer, x, target=target)
                    return decode(ray.get(ref, timeout=self._call_timeout(r.worker, r.rows.numel())), x.dtype)
                except _RAY_FAULTS:
                    continue
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"expert pool worker {r.worker} did not come back within "
                    f"{self.recovery_timeout_s:.0f}s and no other worker holds experts {sorted(needed)}"
                )
            time.sleep(0.2)
            fresh = self._fetch()
            if fresh is not None:
                candidates = self._holders(needed, fresh["table"].workers, fresh["workers"]) + candidates

    def _fetch(self) -> dict | None:
        if self.fetch_table is None:
            return None
        try:
            return self.fetch_table()
        except Exception:  # the controller is away too: keep trying what we have  # noqa: BLE001
            return None

    def _holders(self, needed: set[int], held: tuple, handles: list, skip: int = -1) -> list:
        return [
            h
            for w, (experts, h) in enumerate(zip(held, handles))
            if w != skip and needed <= set(experts) and w not in self._suspect
        ]

    def _ray_call(self, r: WorkerRequest, layer: int, x: torch.Tensor, target=None):
        """The request (its rows of x) as a plain Ray actor call, to its worker or to `target`."""
        target = self.workers[r.worker] if target is None else target
        return target.compute.remote(
            layer, encode(x.index_select(0, r.rows)), encode(r.expert_ids), encode(r.weights)
        )

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
