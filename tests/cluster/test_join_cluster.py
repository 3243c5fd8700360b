"""Joining an existing Ray cluster by address: a separately started head node, the CLI joins it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from procnet import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_generate_joins_an_existing_cluster_by_address(fixture_dir, golden):
    ray_cli = Path(sys.executable).with_name("ray")
    port, temp = free_port(), tempfile.mkdtemp(prefix="yj", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [
            str(ray_cli),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=8",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # the head's GCS port answers once it is up
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and head.poll() is None, "ray head did not start"
                time.sleep(0.3)
        case = golden["cases"][2]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "cli.main",
                "generate",
                "--address",
                f"127.0.0.1:{port}",
                "--model",
                str(fixture_dir),
                "--token-ids",
                ",".join(map(str, case["prompt_ids"])),
                "--max-tokens",
                "16",
                "--pools",
                "2",
                "--json",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout.strip().splitlines()[-1])["token_ids"] == case["generated_ids"]
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # the whole head node, and nothing else on the machine
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)
