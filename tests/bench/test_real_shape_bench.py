"""bench.real_shape measures what it says (numbers are never asserted as speeds): here on the tiny
preset's shapes, one layer, so that it runs in seconds."""

from __future__ import annotations

import pytest

from bench import real_shape
from model import skinny

pytestmark = pytest.mark.skipif(not skinny.available(), reason="model._skinny not built or no AVX2/FMA")


def test_both_dtypes_both_sides_and_the_bound_in_process_and_served(tmp_path):
    res = real_shape.run(
        1, ["bfloat16", "float32"], [1, 2], rounds=1, max_tokens=3, ckpt=str(tmp_path / "ckpt"), pools=2,
        preset_name="tiny",
    )  # fmt: skip
    assert res["bandwidth_gbs"] > 0 and res["matmul_gflops"] > 0
    for dtype in ("bfloat16", "float32"):
        by_streams = res["results"][dtype]
        assert set(by_streams) == {1, 2}
        for b, r in by_streams.items():
            assert r["C_ms"] > 0 and r["torch_ms"] > 0
            assert r["C_over_torch"] == pytest.approx(r["torch_ms"] / r["C_ms"])
            assert 1 <= r["experts_touched_per_layer"] <= 2 * b  # top-2 of 32 experts, b tokens
            assert r["bound_ms"] > 0 and r["C_fraction"] == pytest.approx(r["bound_ms"] / r["C_ms"])
            assert r["serial_bound_ms"] > r["bound_ms"]
        served = res["served"][dtype]
        assert set(served) == {1, 2}
        for b, r in served.items():
            assert r["gateway_1_threads_ms"] > 0
            assert r["gateway_1_threads_over_in_process"] == pytest.approx(
                by_streams[b]["C_ms"] / r["gateway_1_threads_ms"]
            )
