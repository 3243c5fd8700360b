"""bench.front measures both sides (numbers are never asserted as speeds)."""

from __future__ import annotations

import threading

from bench import front


def test_front_reports_the_plain_loop_and_the_gateway_and_leaves_no_engine_thread():
    before = {t.name for t in threading.enumerate()}
    res = front.measure("tiny", [1, 3], rounds=1, tokens=8)
    assert set(res) == {1, 3}
    for r in res.values():
        assert r["plain_ms"] > 0 and r["gateway_ms"] > 0
        assert r["front_ms"] == r["gateway_ms"] - r["plain_ms"]
    assert "engine-step" not in {t.name for t in threading.enumerate()} - before, "close() ends it"
