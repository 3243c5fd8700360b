"""Bad input over raw gRPC (real grpc.aio server on 127.0.0.1, raw bytes through identity
serializers): every case gets its status code and a message that starts with the field it names,
and a good request still succeeds after each one."""

from __future__ import annotations

import grpc
import pytest

from gateway.backends import local_backend
from gateway.engine import EngineLimits
from gateway.server import GatewayServer, ServerOptions
from protos import serving_pb2 as pb

LIMITS = EngineLimits(
    max_tokens=64, max_request_id_len=32, max_stop_strings=4, max_stop_len=8, max_stop_token_ids=4
)
CONTEXT = 1024  # the golden fixture's max_position_embeddings
G = pb.GenerateRequest
INVALID, INTERNAL = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL


def raw(msg) -> bytes:
    return msg.SerializeToString()


def text_field(data: bytes) -> bytes:
    """A GenerateRequest/TokenizeRequest whose field 1 (text) carries these bytes as they are."""
    return bytes([0x0A, len(data)]) + data


# (name, method, request bytes, status, message prefix)
CASES = [
    ("empty prompt", "Generate", raw(G()), INVALID, "prompt"),
    ("both prompts", "Generate", raw(G(text="a", token_ids=[1])), INVALID, "prompt"),
    ("id out of vocabulary", "Generate", raw(G(token_ids=[1, 1000])), INVALID, "token_ids"),
    ("negative id", "Generate", raw(G(token_ids=[-1])), INVALID, "token_ids"),
    ("prompt over max_prompt_len", "Generate", raw(G(token_ids=[1] * CONTEXT)), INVALID, "prompt"),
    ("max_tokens 0", "Generate", raw(G(token_ids=[1], max_tokens=0)), INVALID, "max_tokens"),
    ("max_tokens negative", "Generate", raw(G(token_ids=[1], max_tokens=-5)), INVALID, "max_tokens"),
    ("max_tokens over the limit", "Generate", raw(G(token_ids=[1], max_tokens=65)), INVALID, "max_tokens"),
    (
        "prompt + max_tokens over the context",
        "Generate",
        raw(G(token_ids=[1] * (CONTEXT - 1), max_tokens=16)),
        INVALID,
        "max_tokens",
    ),
    ("temperature negative", "Generate", raw(G(token_ids=[1], temperature=-0.5)), INVALID, "temperature"),
    ("temperature NaN", "Generate", raw(G(token_ids=[1], temperature=float("nan"))), INVALID, "temperature"),
    ("temperature inf", "Generate", raw(G(token_ids=[1], temperature=float("inf"))), INVALID, "temperature"),
    ("top_p 0", "GenerateStream", raw(G(token_ids=[1], top_p=0.0, temperature=1)), INVALID, "top_p"),
    ("top_p over 1", "Generate", raw(G(token_ids=[1], top_p=1.5)), INVALID, "top_p"),
    ("top_p NaN", "Generate", raw(G(token_ids=[1], top_p=float("nan"))), INVALID, "top_p"),
    ("top_k negative", "Generate", raw(G(token_ids=[1], top_k=-1)), INVALID, "top_k"),
    (
        "stop id out of vocabulary",
        "Generate",
        raw(G(token_ids=[1], stop_token_ids=[5000])),
        INVALID,
        "stop_token_ids",
    ),
    (
        "too many stop ids",
        "Generate",
        raw(G(token_ids=[1], stop_token_ids=[1] * 200_000)),
        INVALID,
        "stop_token_ids",
    ),
    ("empty stop string", "Generate", raw(G(token_ids=[1], stop=[""])), INVALID, "stop"),
    ("too many stop strings", "Generate", raw(G(token_ids=[1], stop=["a"] * 16)), INVALID, "stop"),
    ("stop string too long", "GenerateStream", raw(G(token_ids=[1], stop=["x" * 200_000])), INVALID, "stop"),
    (
        "request_id too long",
        "GenerateStream",
        raw(G(token_ids=[1], request_id="r" * 1_000_000)),
        INVALID,
        "request_id",
    ),
    (
        "unknown field",
        "Generate",
        raw(G(token_ids=[1, 2], max_tokens=2)) + bytes([0xF8, 0x06, 0x01]),
        INVALID,
        "request: unknown field number(s) [111]",
    ),
    (
        "garbage bytes",
        "Generate",
        b"\xff\xff\xff\xff\x0f garbage",
        INVALID,
        "request: malformed yuan.serving.v1.GenerateRequest",
    ),
    (
        "garbage bytes, stream",
        "GenerateStream",
        b"\x0a\xff\x01",
        INVALID,
        "request: malformed yuan.serving.v1.GenerateRequest",
    ),
    (
        "invalid UTF-8 text",
        "Generate",
        text_field(b"\xc3\x28 hi"),
        INVALID,
        "request: malformed yuan.serving.v1.GenerateRequest",
    ),
    (
        "invalid UTF-8, stream",
        "GenerateStream",
        text_field(b"ok \xff"),
        INVALID,
        "request: malformed yuan.serving.v1.GenerateRequest",
    ),
    (
        "Tokenize garbage",
        "Tokenize",
        b"\x0a\x05ab",
        INVALID,
        "request: malformed yuan.serving.v1.TokenizeRequest",
    ),
    (
        "Tokenize invalid UTF-8",
        "Tokenize",
        text_field(b"\xed\xa0\x80"),
        INVALID,
        "request: malformed yuan.serving.v1.TokenizeRequest",
    ),
    (
        "ModelInfo garbage",
        "ModelInfo",
        b"\x08",
        INVALID,
        "request: malformed yuan.serving.v1.ModelInfoRequest",
    ),
    ("Stats unknown field", "Stats", bytes([0x08, 0x01]), INVALID, "request: unknown field number(s) [1]"),
]
STREAMING = {"GenerateStream"}


@pytest.fixture(scope="module")
def server(fixture_dir):
    srv = GatewayServer(lambda: local_backend(str(fixture_dir), LIMITS), ServerOptions(port=0))
    port = srv.start()
    srv.wait_ready(60)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 8 << 20)])
    yield channel
    channel.close()
    srv.stop(grace_s=0)


def call_raw(channel, method: str, data: bytes):
    """Send bytes as they are; returns the raw reply bytes (a list of them for a stream)."""
    path = f"/yuan.serving.v1.YuanServing/{method}"
    if method in STREAMING:
        return list(
            channel.unary_stream(path, request_serializer=None, response_deserializer=None)(data, timeout=20)
        )
    return channel.unary_unary(path, request_serializer=None, response_deserializer=None)(data, timeout=20)


def test_every_bad_input_gets_its_status_and_field_and_the_server_keeps_serving(server, golden):
    case = golden["cases"][1]
    good = raw(G(token_ids=case["prompt_ids"], max_tokens=16, ignore_eod=True))
    failures = []
    for name, method, data, code, prefix in CASES:
        try:
            call_raw(server, method, data)
            failures.append(f"{name}: accepted")
        except grpc.RpcError as e:
            if e.code() != code or not e.details().startswith(prefix):
                failures.append(f"{name}: {e.code()} {e.details()!r}, wanted {code} {prefix!r}")
        res = pb.GenerateResponse.FromString(call_raw(server, "Generate", good))
        if list(res.token_ids) != case["generated_ids"]:
            failures.append(f"after {name}: the good request got {list(res.token_ids)}")
    assert not failures, "\n".join(failures)


def test_values_at_the_limits_are_accepted(server):
    """The proto's whole uint64 seed range, limits met exactly, and a prompt that leaves room for
    fewer tokens than the default when max_tokens is not given (it is clamped, not refused)."""
    ok = [
        G(token_ids=[1], max_tokens=2, temperature=1.0, seed=2**64 - 1),
        G(token_ids=[1], max_tokens=2, temperature=1.0, seed=2**63),
        G(token_ids=[1], max_tokens=2, stop=["x" * 8] * 4, stop_token_ids=[1, 2, 3, 4], request_id="r" * 32),
        G(token_ids=[1] * (CONTEXT - 16), max_tokens=16, ignore_eod=True),
    ]
    for req in ok:
        res = pb.GenerateResponse.FromString(call_raw(server, "Generate", raw(req)))
        assert len(res.token_ids) >= 1
    clamped = pb.GenerateResponse.FromString(
        call_raw(server, "Generate", raw(G(token_ids=[1] * (CONTEXT - 3), ignore_eod=True)))
    )
    assert len(clamped.token_ids) == 3 and clamped.finish_reason == pb.FINISH_REASON_LENGTH


def test_context_refusal_says_both_numbers(server):
    with pytest.raises(grpc.RpcError) as err:
        call_raw(server, "Generate", raw(G(token_ids=[1] * (CONTEXT - 1), max_tokens=16)))
    assert err.value.code() == INVALID
    assert str(CONTEXT - 1) in err.value.details() and "16" in err.value.details()
    assert str(CONTEXT) in err.value.details()


def test_a_seed_travels_as_uint64(server):
    """Two seeds that differ only above bit 63 are different seeds (not folded, not refused)."""
    a, b = (
        G(token_ids=[5, 6], max_tokens=12, temperature=1.5, seed=s, ignore_eod=True) for s in (7, 7 + 2**63)
    )
    ra, rb = (pb.GenerateResponse.FromString(call_raw(server, "Generate", raw(r))) for r in (a, b))
    again = pb.GenerateResponse.FromString(call_raw(server, "Generate", raw(b)))
    assert list(rb.token_ids) == list(again.token_ids)
    assert list(ra.token_ids) != list(rb.token_ids)
