"""The scaling policy as a pure function: bounds and hysteresis."""

from __future__ import annotations

import pytest

from cluster.autoscale import ScalingPolicy


def test_scales_up_after_sustained_load_and_down_slowly():
    p = ScalingPolicy(min_workers=1, max_workers=4, pairs_per_s_per_worker=100, up_after=2, down_after=3)
    assert p.decide(1, 350) == 1  # one window above: wait
    assert p.decide(1, 350) == 4  # sustained: jump to what is needed
    assert p.decide(4, 10_000) == 4  # bounded by max_workers
    assert [p.decide(4, 0) for _ in range(3)] == [4, 4, 3]  # spare capacity: one step after 3 windows
    assert p.decide(3, 250) == 3 and p.decide(3, 0) == 3  # a busy window resets the count


def test_a_single_spike_does_not_scale():
    p = ScalingPolicy(min_workers=2, max_workers=6, pairs_per_s_per_worker=100, up_after=3, down_after=3)
    assert [p.decide(2, r) for r in (900, 0, 900, 0)] == [2, 2, 2, 2]


def test_bounds_are_validated():
    with pytest.raises(ValueError, match="min_workers"):
        ScalingPolicy(min_workers=3, max_workers=2)
