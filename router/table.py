"""Where experts live, as data: a versioned routing table from experts to the workers holding them.

A *pool* is a set of experts (of every layer); each pool has R >= 1 *replicas*, and every replica
is one worker (an expert-pool actor). The dispatcher only reads `RoutingTable.replicas(expert)`, so
the controller can give hot experts more replicas or move them by publishing a new table version.
"""

from __future__ import annotations

from dataclasses import dataclass


class PlacementError(ValueError):
    """A placement request cannot be satisfied (the message names the argument)."""


@dataclass(frozen=True)
class RoutingTable:
    version: int
    workers: tuple[tuple[int, ...], ...]  # worker w holds these expert ids, in every layer
    num_experts: int

    def __post_init__(self) -> None:
        held = {e for experts in self.workers for e in experts}
        missing = sorted(set(range(self.num_experts)) - held)
        if missing:
            raise PlacementError(f"routing table v{self.version}: experts {missing} have no worker")

    def replicas(self, expert: int) -> list[int]:
        return [w for w, experts in enumerate(self.workers) if expert in experts]

    def replica_lists(self) -> list[list[int]]:
        """`[expert] -> workers holding it`, the dispatcher's lookup."""
        return [self.replicas(e) for e in range(self.num_experts)]


def plan_pools(num_experts: int, pools: int, replicas: int = 1, version: int = 1) -> RoutingTable:
    """Contiguous blocks of experts onto `pools` pools, each pool on `replicas` workers.

    Workers are numbered pool-major: pool p's replicas are workers p*R .. p*R+R-1.
    """
    if not 1 <= pools <= num_experts:
        raise PlacementError(f"pools must be in [1, {num_experts}], got {pools}")
    if replicas < 1:
        raise PlacementError(f"replicas must be >= 1, got {replicas}")
    bounds = [round(p * num_experts / pools) for p in range(pools + 1)]
    blocks = [tuple(range(bounds[p], bounds[p + 1])) for p in range(pools)]
    return RoutingTable(version, tuple(b for b in blocks for _ in range(replicas)), num_experts)
