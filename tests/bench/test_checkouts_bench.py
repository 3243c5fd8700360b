"""bench.checkouts runs each side in processes of its own with that checkout's code (numbers are
never asserted as speeds): here this checkout against itself on the tiny preset, which must give
the same tokens in every process, and a checkout that cannot run is named."""

from __future__ import annotations

import pytest

from bench import checkouts


def test_this_checkout_against_itself_gives_the_same_tokens_and_both_sides_times():
    this = str(checkouts.Path(checkouts.__file__).resolve().parent.parent)
    res = checkouts.compare(
        this, [1, 3], rounds=1, alternations=1, threads=1, max_tokens=4, preset_name="tiny"
    )
    assert set(res) == {1, 3}
    for b, r in res.items():
        assert r["same_tokens"], f"{b} streams: two processes of one checkout disagree"
        assert r["this_ms"] > 0 and r["other_ms"] > 0
        assert r["this_over_other"] == pytest.approx(r["other_ms"] / r["this_ms"])


def test_a_checkout_without_the_code_is_named(tmp_path):
    with pytest.raises(RuntimeError, match=str(tmp_path)):
        checkouts.compare(
            str(tmp_path), [1], rounds=1, alternations=1, threads=1, max_tokens=2, preset_name="tiny"
        )
