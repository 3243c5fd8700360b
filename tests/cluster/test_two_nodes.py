"""Same node means the same Ray node id: on a two-node cluster simulated on this machine, pools on
the other node are reached over TCP (the inline data plane) and the tokens stay golden."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def test_pools_on_another_node_are_reached_over_tcp_and_are_exact(fixture_dir):
    script = Path(__file__).parent / "scripts" / "two_nodes.py"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, str(script), str(fixture_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tokens"] == result["expected"]
    assert result["gateway_node"] not in result["pool_nodes"], "the pools run on the other node"
    assert result["channels"] == ["tcp"] and result["fallbacks"] == 0
