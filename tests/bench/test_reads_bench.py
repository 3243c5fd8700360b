"""bench.reads measures each side and compares their outputs (speeds are never asserted)."""

from __future__ import annotations

from bench import reads


def test_reads_reports_each_side_and_pools_and_threads_give_the_bits_of_one_thread(ray_cluster):
    res = reads.measure("tiny", rows=8, threads=[1, 2], pool_counts=[2], reps=4, settle_s=0.0)
    assert res["reread"]["memory_gbs"] > 0 and set(res["reread"]["again_gbs"]) == {8, 16, 32}
    assert set(res["banks"]) == {1, 2} and set(res["pools"]) == {2}
    for r in [*res["banks"].values(), *res["pools"].values()]:
        assert r["best_gbs"] >= r["median_gbs"] > 0 and r["ms"] > 0
        assert r["max_abs_diff"] == 0.0  # the same bits on any thread count and through pools


def test_routed_steps_name_distinct_experts_per_row_and_cycle_the_layers():
    cfg = reads.preset("tiny")
    steps = reads.routed_steps(cfg, rows=5, reps=7)
    assert [layer for layer, *_ in steps] == [i % cfg.num_layers for i in range(7)]
    for _, x, ids, w in steps:
        assert x.shape == (5, cfg.hidden_size) and ids.shape == w.shape == (5, cfg.top_k)
        assert all(len(set(row.tolist())) == cfg.top_k for row in ids)
        assert int(ids.min()) >= 0 and int(ids.max()) < cfg.num_experts
