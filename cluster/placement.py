"""The placement policy: which experts each worker should hold, from measured load (the routing
table itself is `router.table`)."""

from __future__ import annotations

from router.table import PlacementError, RoutingTable


def balanced_placement(
    load: list[float],
    num_workers: int,
    slots_per_worker: int,
    version: int,
    pairs: dict[tuple[int, int], float] | None = None,
) -> RoutingTable:
    """Replicas and placement that minimise the most loaded worker (DeepSeek's EPLB greedy, extended).

    `load[e]`: measured tokens of expert e (summed over layers); each worker holds at most
    `slots_per_worker` experts (its memory budget). First every expert gets one replica and the
    spare slots go, one at a time, to the expert with the highest load per replica. Then replicas,
    heaviest first, go to the least loaded worker that has room and does not hold that expert yet.
    Among workers within 1% of that load, the one holding experts most often chosen together with
    this one (`pairs[(a, b)]`: tokens routed to both) wins, so more tokens find both their experts in
    one pool and save a hop, at no cost in balance.
    """
    E = len(load)
    if num_workers * slots_per_worker < E:
        raise PlacementError(
            f"slots_per_worker={slots_per_worker} x {num_workers} workers cannot hold {E} experts"
        )
    if slots_per_worker > E:
        slots_per_worker = E
    replicas = [1] * E
    for _ in range(num_workers * slots_per_worker - E):
        e = max(range(E), key=lambda e: (load[e] / replicas[e], -e))
        if replicas[e] >= num_workers:
            break
        replicas[e] += 1
    items = sorted(
        ((load[e] / replicas[e], e) for e in range(E) for _ in range(replicas[e])),
        key=lambda t: (-t[0], t[1]),
    )
    held: list[set[int]] = [set() for _ in range(num_workers)]
    worker_load = [0.0] * num_workers
    pairs = pairs or {}
    for share, e in items:
        free = [w for w in range(num_workers) if len(held[w]) < slots_per_worker and e not in held[w]]
        best = min(worker_load[w] for w in free)
        near = [w for w in free if worker_load[w] <= best * 1.01 + 1e-9]
        w = max(
            near,
            key=lambda w: (sum(pairs.get((min(e, o), max(e, o)), 0.0) for o in held[w]), -worker_load[w], -w),
        )
        held[w].add(e)
        worker_load[w] += share
    return RoutingTable(version, tuple(tuple(sorted(h)) for h in held), E)
