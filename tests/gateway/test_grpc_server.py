"""The gRPC server (real grpc.aio server on 127.0.0.1, real client) over the in-process backend:
lifecycle, health, reflection, status codes, limits, auth and TLS."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from procnet import self_signed
from conftest import settled_stats as settled
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.backends import local_backend
from gateway.engine import EngineLimits
from gateway.server import GatewayServer, ServerOptions
from protos import serving_pb2 as pb
from protos import serving_pb2_grpc as pb_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class Running:
    """A started server and a channel to it; always stopped at the end."""

    def __init__(self, factory, **options) -> None:
        self.server = GatewayServer(factory, ServerOptions(port=0, **options))
        self.port = self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.YuanServingStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace_s=0)


@pytest.fixture(scope="module")
def srv(fixture_dir):
    running = Running(lambda: local_backend(str(fixture_dir), EngineLimits(max_tokens=64)))
    running.server.wait_ready(60)
    yield running
    running.close()


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_unary_and_stream_match_golden(srv, golden):
    for case in golden["cases"]:
        req = pb.GenerateRequest(token_ids=case["prompt_ids"], max_tokens=16, ignore_eod=True)
        res = srv.stub.Generate(req, timeout=30)
        assert list(res.token_ids) == case["generated_ids"]
        assert res.finish_reason == pb.FINISH_REASON_LENGTH
        assert res.usage.prompt_tokens == len(case["prompt_ids"]) and res.usage.completion_tokens == 16
        assert res.timings.ttft_ms > 0
        msgs = list(srv.stub.GenerateStream(req, timeout=30))
        assert [m.token_id for m in msgs] == case["generated_ids"]
        assert [m.index for m in msgs] == list(range(16))
        assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH and msgs[-1].usage.completion_tokens == 16


def test_stop_strings_and_text(srv, fixture_dir):
    tokens = srv.stub.Tokenize(pb.TokenizeRequest(text="ab")).token_ids
    assert list(tokens) == [97, 98]
    free = srv.stub.Generate(
        pb.GenerateRequest(text="hello", max_tokens=12, temperature=1.0, seed=5, ignore_eod=True)
    )
    text = free.text
    assert len(text) >= 3, "need some text to cut"
    stop = text[1:3]
    cut = srv.stub.Generate(
        pb.GenerateRequest(text="hello", max_tokens=12, temperature=1.0, seed=5, ignore_eod=True, stop=[stop])
    )
    assert cut.finish_reason == pb.FINISH_REASON_STOP
    assert cut.text == text[: text.index(stop)] and stop not in cut.text


def test_model_info_and_stats(srv):
    info = srv.stub.ModelInfo(pb.ModelInfoRequest())
    assert info.num_experts == 32 and info.top_k == 2 and len(info.workers) == 1
    assert settled(srv.stub).kv_blocks_used == 0


def test_reflection_lists_the_service(srv):
    stub = reflection_pb2_grpc.ServerReflectionStub(srv.channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"yuan.serving.v1.YuanServing", "grpc.health.v1.Health"} <= names


def test_health_goes_not_serving_to_serving_and_unavailable_until_ready(fixture_dir):
    gate = threading.Event()

    def slow_backend():
        gate.wait(30)
        return local_backend(str(fixture_dir))

    running = Running(slow_backend)
    try:
        assert running.status() == NOT_SERVING
        assert running.status("yuan.serving.v1.YuanServing") == NOT_SERVING
        code, details = code_of(lambda: running.stub.Generate(pb.GenerateRequest(token_ids=[1]), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE and "starting" in details
        gate.set()
        running.server.wait_ready(60)
        assert running.status() == SERVING
    finally:
        gate.set()
        running.close()


def test_drain_says_not_serving_refuses_new_and_lets_in_flight_finish(fixture_dir, golden):
    running = Running(lambda: local_backend(str(fixture_dir)), grace_s=30)
    running.server.wait_ready(60)
    long = running.stub.GenerateStream(
        pb.GenerateRequest(token_ids=[5, 6, 7], max_tokens=600, ignore_eod=True)
    )
    first = next(long)
    stopper = threading.Thread(target=running.server.stop)
    stopper.start()
    deadline = time.monotonic() + 10
    while running.status() != NOT_SERVING and time.monotonic() < deadline:
        time.sleep(0.02)
    assert running.status() == NOT_SERVING
    code, details = code_of(lambda: running.stub.Generate(pb.GenerateRequest(token_ids=[1]), timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE and "draining" in details
    time.sleep(3)  # a slow reader: what was generated before and during the drain still arrives
    rest = list(long)
    assert first.index == 0 and len(rest) == 599 and rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    stopper.join(30)
    assert not stopper.is_alive()
    running.channel.close()


def test_queue_full_is_resource_exhausted_and_others_finish(fixture_dir):
    """One request runs (max_running 1) and one waits (max_queue 1): the next is refused with
    RESOURCE_EXHAUSTED, and the two accepted ones both finish. Ordered by what the server reports,
    not by timing: the first is running once its first token is out, the second queued once Stats
    says so; the first's 600 tokens (~0.6 s) outlast the refused call."""
    running = Running(lambda: local_backend(str(fixture_dir), EngineLimits(max_running=1, max_queue=1)))
    try:
        running.server.wait_ready(60)
        req = pb.GenerateRequest(token_ids=[3, 4], max_tokens=600, ignore_eod=True)
        first = running.stub.GenerateStream(req, timeout=60)
        assert next(first).index == 0  # running
        second = running.stub.Generate.future(req, timeout=60)
        deadline = time.monotonic() + 30
        while running.stub.Stats(pb.StatsRequest(), timeout=5).waiting < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.002)
        code, details = code_of(lambda: running.stub.Generate(req, timeout=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        rest = list(first)
        assert len(rest) == 599 and rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert len(second.result().token_ids) == 600
    finally:
        running.close()


def test_bearer_token_is_required_except_for_health(fixture_dir):
    running = Running(lambda: local_backend(str(fixture_dir)), token="s3cret")
    try:
        running.server.wait_ready(60)
        assert running.status() == SERVING  # health needs no token
        req = pb.GenerateRequest(token_ids=[1, 2], max_tokens=2)
        two = [("authorization", "Bearer wrong"), ("authorization", "Bearer s3cret")]
        for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", "s3cret")], two):
            code, _ = code_of(lambda: running.stub.Generate(req, metadata=metadata, timeout=10))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            code, _ = code_of(lambda: list(running.stub.GenerateStream(req, metadata=metadata, timeout=10)))
            assert code == grpc.StatusCode.UNAUTHENTICATED
        ok = running.stub.Generate(req, metadata=[("authorization", "Bearer s3cret")], timeout=10)
        assert len(ok.token_ids) == 2
    finally:
        running.close()


def test_tls(fixture_dir, tmp_path):
    pytest.importorskip("cryptography")
    cert, key = self_signed(tmp_path, "localhost")
    server = GatewayServer(
        lambda: local_backend(str(fixture_dir)),
        ServerOptions(port=0, tls_cert=str(cert), tls_key=str(key)),
    )
    port = server.start()
    try:
        server.wait_ready(60)
        creds = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(f"localhost:{port}", creds) as ch:
            res = pb_grpc.YuanServingStub(ch).Generate(
                pb.GenerateRequest(token_ids=[1, 2], max_tokens=2), timeout=10
            )
            assert len(res.token_ids) == 2
        with grpc.insecure_channel(f"localhost:{port}") as ch:
            code, _ = code_of(
                lambda: pb_grpc.YuanServingStub(ch).Generate(pb.GenerateRequest(token_ids=[1]), timeout=5)
            )
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace_s=0)


def test_drain_is_immediate_and_the_grace_period_ends_streams_with_their_final_message(fixture_dir):
    running = Running(lambda: local_backend(str(fixture_dir), EngineLimits(max_tokens=1000)), grace_s=1)
    running.server.wait_ready(60)
    req = pb.GenerateRequest(token_ids=[5, 6, 7], max_tokens=1000, ignore_eod=True)
    streams = [running.stub.GenerateStream(req) for _ in range(3)]
    unary = running.stub.Generate.future(req)
    firsts = [next(s) for s in streams]
    running.server.drain()  # returns once health says so
    assert running.status() == NOT_SERVING
    code, details = code_of(lambda: running.stub.Generate(pb.GenerateRequest(token_ids=[1]), timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE and "draining" in details
    stopper = threading.Thread(target=running.server.stop)
    stopper.start()
    for first, stream in zip(firsts, streams):
        msgs = [first] + list(stream)  # no RpcError: the stream ends with its final message
        assert msgs[-1].finish_reason == pb.FINISH_REASON_CANCELLED
        assert 1 < len(msgs) < 1000 and msgs[-1].usage.completion_tokens == len(msgs) - 1 + msgs[-1].HasField(
            "token_id"
        )
    res = unary.result(timeout=30)
    assert res.finish_reason == pb.FINISH_REASON_CANCELLED and 0 < len(res.token_ids) < 1000
    stopper.join(30)
    assert not stopper.is_alive()
    running.channel.close()
