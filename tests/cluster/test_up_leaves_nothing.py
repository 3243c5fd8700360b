"""`yuan-serve up` on an embedded cluster, as a user runs it (a real process, stopped with SIGINT by
its pid), with TLS whose certificate names another host and a bearer token: it gets ready (readiness
does not dial by name); while it serves, no process it started listens on anything but loopback;
SIGINT drains at once (health NOT_SERVING while a long stream still runs) and the grace period ends
that stream with its final CANCELLED message; once it has stopped, none of its processes is left,
and nothing new is left in the temp dir or /dev/shm."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import threading

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from procnet import descendants, free_port, listening, loopback, self_signed
from protos import serving_pb2 as pb
from protos import serving_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.ray, pytest.mark.slow]
# Ray keeps each session's logs under <temp>/ray/session_* by design (operators read them); that
# one folder is Ray's, made by any Ray process, and is not counted as left behind.
RAY_TEMP_ROOT = "ray"


def entries(path: str) -> set[str]:
    return set(os.listdir(path)) - {RAY_TEMP_ROOT}


def test_up_listens_on_loopback_only_drains_and_leaves_nothing_behind(fixture_dir, golden, tmp_path):
    pytest.importorskip("cryptography")
    cert, key = self_signed(tmp_path, "gateway.yuan.internal")  # not localhost, not 127.0.0.1
    tmp, shm = tempfile.gettempdir(), "/dev/shm"
    before_tmp, before_shm = entries(tmp), entries(shm)
    port, http_port = free_port(), free_port()
    cmd = [
        sys.executable,
        "-u",
        "-m",
        "cli.main",
        "up",
        "--model",
        str(fixture_dir),
        "--pools",
        "2",
        "--port",
        str(port),
        "--grace-s",
        "1",  # well under the time 1000 tokens take here (3+ s), so the long stream is cancelled
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--token",
        "t0ken",
        "--max-tokens",
        "1000",
        "--http-port",
        str(http_port),
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    seen: set[int] = set()
    interrupted = False
    try:
        deadline = time.monotonic() + 120
        lines = []
        for line in proc.stdout:  # up prints its ready line once health is SERVING
            lines.append(line)
            if "serving on" in line or time.monotonic() > deadline:
                break
        assert any("serving on" in line for line in lines), "".join(lines[-40:])
        channel = grpc.secure_channel(
            f"127.0.0.1:{port}",
            grpc.ssl_channel_credentials(cert.read_bytes()),
            options=[("grpc.ssl_target_name_override", "gateway.yuan.internal")],
        )
        stub, auth = pb_grpc.YuanServingStub(channel), [("authorization", "Bearer t0ken")]
        case = golden["cases"][0]
        res = stub.Generate(
            pb.GenerateRequest(token_ids=case["prompt_ids"], max_tokens=16, ignore_eod=True),
            metadata=auth,
            timeout=60,
        )
        assert list(res.token_ids) == case["generated_ids"]
        # The OpenAI-compatible API on its own port, TLS too (the name check is the gRPC part's).
        models = httpx.get(
            f"https://127.0.0.1:{http_port}/v1/models",
            headers={"Authorization": "Bearer t0ken"},
            verify=False,
            timeout=30,
        )
        assert models.status_code == 200 and models.json()["data"][0]["id"] == fixture_dir.name
        seen = descendants(proc.pid)
        assert len(seen) > 5, "up, Ray's GCS, raylet, workers, pools and the gateway"
        wide = [
            (pid, addr, Path(f"/proc/{pid}/cmdline").read_bytes()[:80])
            for pid, addr in listening(seen)
            if not loopback(addr)
        ]
        assert not wide, wide
        long = stub.GenerateStream(
            pb.GenerateRequest(token_ids=[5, 6, 7], max_tokens=1000, ignore_eod=True),
            metadata=auth,
            timeout=120,
        )
        first = next(long)
        rest: list = []
        reader = threading.Thread(target=lambda: rest.extend(long))
        reader.start()
        os.kill(proc.pid, signal.SIGINT)
        interrupted = True
        health = health_pb2_grpc.HealthStub(channel)
        status = None
        while reader.is_alive():  # the drain is visible while the stream still runs
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.05)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING and reader.is_alive()
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(pb.GenerateRequest(token_ids=[1], max_tokens=1), metadata=auth, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        reader.join(60)
        msgs = [first] + rest
        assert msgs[-1].finish_reason == pb.FINISH_REASON_CANCELLED and 1 < len(msgs) < 1000
        channel.close()
    finally:
        if not interrupted:
            os.kill(proc.pid, signal.SIGINT)
        try:
            rest = proc.communicate(timeout=120)[0]
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            rest = proc.communicate()[0]
    assert proc.returncode == 0, rest[-3000:]
    deadline = time.monotonic() + 30  # Ray's processes exit after the driver's shutdown
    while any(Path(f"/proc/{p}").exists() and _not_zombie(p) for p in seen) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in seen if Path(f"/proc/{p}").exists() and _not_zombie(p)]
    assert entries(tmp) - before_tmp == set()
    assert entries(shm) - before_shm == set()


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
