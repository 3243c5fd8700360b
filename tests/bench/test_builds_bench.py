"""bench.builds runs the installed C build and another one alternately in one process (numbers are
never asserted as speeds)."""

from __future__ import annotations

import shutil

import pytest

from bench import builds
from model import skinny


@pytest.mark.skipif(skinny._skinny is None, reason="model._skinny is not built here")
def test_builds_compares_two_builds_and_puts_the_installed_one_back(tmp_path):
    other = tmp_path / "copy.so"
    shutil.copy(skinny._skinny.__file__, other)  # another file: loaded as a module of its own
    installed = skinny._skinny
    res = builds.compare(str(other), [1, 3], rounds=1, threads=1, max_tokens=6, preset_name="tiny")
    assert skinny._skinny is installed
    assert set(res) == {1, 3}
    for r in res.values():
        assert r["installed_ms"] > 0 and r["other_ms"] > 0
        assert r["same_tokens"], "the same code gives the same tokens"


def test_builds_refuses_a_path_that_is_not_a_module(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a module")
    with pytest.raises((ValueError, ImportError)):
        builds.load_build(str(bad))
