"""The serving benchmark runs and its numbers are sane (never timed asserts)."""

from __future__ import annotations

import pytest

from bench.serving import plot, run, table

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_bench_runs_side_by_side_and_reports_sane_numbers(ray_cluster, tmp_path):
    out = run(
        ["tiny"],
        pools=[1],
        concurrency=[1, 3],
        prompt_len=4,
        max_tokens=5,
        dispatch_pools=2,
        dispatch_iters=20,
        skew=4.0,
    )
    res = out["results"]["tiny"]
    assert set(res) == {"in-process", "1 pools", "1 pools+overlap"}
    for by_c in res.values():
        for c, r in by_c.items():
            assert r["tokens"] == c * 5, "every stream gets all its tokens"
            assert r["tokens_per_s"] > 0 and r["ttft_ms"]["p50"] > 0
            assert r["ttft_ms"]["p99"] >= r["ttft_ms"]["p50"] and r["tpot_ms"]["p99"] >= r["tpot_ms"]["p50"]
            assert 0 < r["decode_tpot_ms"]["p50"] <= r["decode_tpot_ms"]["p99"], (
                "steps after all first tokens"
            )
            b = r["breakdown_ms_per_step"]
            assert 0 < b["expert_calls"] < b["total"]
            assert b["pool_compute_summed"] > 0 and b["transport_and_waiting"] >= 0
    assert set(out["throughput_ratio"]["tiny"]) == {1, 3}
    assert out["bandwidth_gbs"] > 0 and out["matmul_gflops"] > 0 and set(out["roofline"]["tiny"]) == {1, 3}
    for c, fraction in out["roofline"]["tiny"].items():
        f = res["in-process"][c]["roofline"]
        assert f["fraction"] == fraction > 0 and 1 <= f["experts_touched_per_layer"] <= 32
        assert f["bytes_per_step"] > f["experts_touched_per_layer"] * 3 * 64 * 48 * 4  # tiny: d 64, F 48
        assert f["flops_per_step"] > c * 2 * 3 * 2 * 3 * 64 * 48  # at least its experts: 3 layers, top 2
        assert f["serial_bound_tokens_per_s"] < min(f["bound_tokens_per_s"], f["compute_bound_tokens_per_s"])
        assert f["fraction_of_serial"] > f["fraction"]
    assert "roofline" in table(out)
    rt = out["dispatch_round_trip_ms"]
    assert rt["pools"] == 2 and rt["tokens"] == 64 and 0 < rt["p50"] <= rt["p99"]
    assert "distributed / in-process" in table(out)
    lb = out["load_balance"]
    assert lb["before"] >= 1.0 and lb["after"] >= 1.0, "max/mean is at least 1 by definition"
    assert out["balance_run"]["throughput"]["after"] > 0
    png = tmp_path / "bench.png"
    plot(out, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
