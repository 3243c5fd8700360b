"""bench.engine's measurements on the fixture model, small and short: they run and their numbers
say what they should (the real runs are in docs/PERFORMANCE.md)."""

from __future__ import annotations

from bench.engine import _ratios, baseline_tree, chunking, drop_tree, load, prefix


def test_chunking_and_prefix_measure_what_they_say(fixture_dir):
    model, disp = load(str(fixture_dir))
    r = chunking(model, disp, streams=4, prompt_len=120, every_s=0.2, duration_s=1.0, budget=16)
    assert r["prompts"] >= 2 and 0 < r["tpot_ms"]["p50"] <= r["tpot_ms"]["p99"]
    on = prefix(model, disp, requests=6, system_len=64, suffix_len=4, caching=True)
    off = prefix(model, disp, requests=6, system_len=64, suffix_len=4, caching=False)
    # 6 x 68 tokens over a 256-token step: r0-r3 start in step 1, before any block is cached; r4
    # and r5 start in step 2 and hit the system prompt's 4 blocks.
    assert on["hit_tokens"] == 2 * 64 and off["hit_tokens"] == 0
    assert on["ttft_ms"]["p50"] > 0 and off["ttft_ms"]["p50"] > 0


def test_ratios_pair_adjacent_rounds():
    out = _ratios({"a": [{1: 2.0}, {1: 3.0}, {1: 4.0}], "b": [{1: 1.0}, {1: 3.0}, {1: 2.0}]}, "a", "b", [1])
    assert out[1]["per_round"] == [2.0, 1.0, 2.0] and out[1]["ratio"] == 2.0 and out[1]["a"] == 3.0


def test_the_baseline_checkout_is_removed_after_use():
    path = baseline_tree("HEAD")
    assert (path / "gateway" / "engine.py").exists()
    drop_tree(path)
    assert not path.exists()
