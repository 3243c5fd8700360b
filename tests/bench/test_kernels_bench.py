"""bench.kernels measures what it says (numbers are never asserted as speeds)."""

from __future__ import annotations

import pytest

from bench import kernels
from model import skinny
from model.attention_router import AttentionRouter
from model.norm import RMSNorm

pytestmark = pytest.mark.skipif(not skinny.available(), reason="model._skinny not built or no AVX2/FMA")


def test_matmul_reports_both_sides_for_every_shape_and_row_count():
    res = kernels.matmul([1, 3], rounds=1, calls=2, mbytes=4)
    assert set(res) == set(kernels.SHAPES)
    for by_rows in res.values():
        assert set(by_rows) == {1, 3}
        for r in by_rows.values():
            assert r["skinny_us"] > 0 and r["torch_us"] > 0
            assert r["speedup"] == pytest.approx(r["torch_us"] / r["skinny_us"])


def test_breakdown_times_every_piece_and_puts_the_methods_back():
    before = (RMSNorm.forward, AttentionRouter.forward)
    step = skinny.DECODE_STEP
    res = kernels.breakdown([2], max_tokens=3, preset_name="tiny")
    assert (RMSNorm.forward, AttentionRouter.forward) == before, "the clock wrappers are removed"
    pieces = res[2]  # in-process decode steps: the layers in one C call, nothing per layer
    one = pieces["a step in one C call (embedding to logits, experts inside)"]
    assert pieces["step"] >= one > 0
    assert pieces["decode layers in C calls (expert step inside)"] == 0.0
    res = kernels.breakdown([2], max_tokens=3, preset_name="tiny", whole=False)
    assert skinny.DECODE_STEP == step, "the switch is put back"
    pieces = res[2]
    assert pieces["step"] > 0 and pieces["expert step"] > 0
    assert pieces["norms, torch"] == 0.0  # decode steps whose layers run in C take the final norm in C
    layers = pieces["decode layers in C calls (expert step inside)"]
    assert pieces["step"] >= layers >= pieces["expert step"] > 0  # decode steps: the C layers
