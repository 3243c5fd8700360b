"""Autoscaling expert pools: the number of pool workers follows measured load between bounds.

`ScalingPolicy.decide` is pure (unit-tested): demand is the routed (token, expert) pairs per second
over the last window (summed over every gateway) divided by what one worker should carry; the target
moves up after `up_after` consecutive windows above the current size, down after `down_after`
windows below it (hysteresis), always within [min_workers, max_workers]. The controller applies a
decision (`Controller.scale_to`) with the same three-phase move as rebalancing: new workers start and
load their experts off the critical path, every gateway switches tables at a step boundary, and
workers left out are stopped only after every live gateway acknowledged the switch. No request
fails in either direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


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
            raise ValueError(
                f"need 1 <= min_workers ({self.min_workers}) <= max_workers ({self.max_workers})"
            )

    def decide(self, current: int, pairs_per_s: float) -> int:
        """The worker count to move to, given the current count and the load of the last window."""
        need = min(
            self.max_workers, max(self.min_workers, math.ceil(pairs_per_s / self.pairs_per_s_per_worker))
        )
        self._above = self._above + 1 if need > current else 0
        self._below = self._below + 1 if need < current else 0
        if self._above >= self.up_after:
            self._above = 0
            return need
        if self._below >= self.down_after:
            self._below = 0
            return max(need, current - 1)  # step down one at a time
        return current
