"""`yuan-serve client`: a gRPC client that streams an answer to the terminal.

With `--json` it prints one object with the same contract as `yuan-serve generate --json`
(`token_ids`, `text`, `finish_reason`, `timing`). gRPC errors print `error: CODE: details` and exit
with status 2 for INVALID_ARGUMENT, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli import args as cli_args
from protos import serving_pb2 as pb
from protos import serving_pb2_grpc as pb_grpc

FINISH_NAMES = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_EOD: "eod",
    pb.FINISH_REASON_CANCELLED: "cancelled",
}


def channel(target: str, tls_ca: str | None = None) -> grpc.Channel:
    if tls_ca:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()))
    return grpc.insecure_channel(target)


def wait_serving(ch: grpc.Channel, timeout_s: float) -> None:
    """Poll standard health until SERVING; raises TimeoutError."""
    stub = health_pb2_grpc.HealthStub(ch)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if (
                stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                == health_pb2.HealthCheckResponse.SERVING
            ):
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"server not SERVING after {timeout_s:.0f}s")
        time.sleep(0.5)


def request_from_args(args: argparse.Namespace) -> pb.GenerateRequest:
    req = pb.GenerateRequest(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop=args.stop or [],
    )
    if args.token_ids is not None:
        req.token_ids.extend(cli_args.token_ids(args.token_ids))
    else:
        req.text = args.prompt
    if args.seed is not None:
        req.seed = args.seed
    if args.stop_token_ids:
        req.stop_token_ids.extend(cli_args.token_ids(args.stop_token_ids, "--stop-token-ids"))
    return req


def cmd_client(args: argparse.Namespace) -> None:
    if (args.prompt is None) == (args.token_ids is None):
        raise SystemExit("error: give a prompt or --token-ids (one of them)")
    ch = channel(args.target, args.tls_ca)
    if args.wait_ready:
        wait_serving(ch, args.wait_ready)
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else None
    stub = pb_grpc.YuanServingStub(ch)
    ids: list[int] = []
    chunks: list[str] = []
    last = None
    t0 = time.perf_counter()
    try:
        for msg in stub.GenerateStream(request_from_args(args), timeout=args.timeout, metadata=metadata):
            if msg.HasField("token_id"):
                ids.append(msg.token_id)
            chunks.append(msg.text)
            if not args.json:
                print(msg.text, end="", flush=True)
            last = msg
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        sys.exit(2 if e.code() == grpc.StatusCode.INVALID_ARGUMENT else 1)
    wall = time.perf_counter() - t0
    if args.json:
        t = last.timings
        print(
            json.dumps(
                {
                    "token_ids": ids,
                    "text": "".join(chunks),
                    "finish_reason": FINISH_NAMES[last.finish_reason],
                    "timing": {
                        "queue_ms": round(t.queue_ms, 3),
                        "ttft_ms": round(t.ttft_ms, 3),
                        "per_token_ms": round(t.per_token_ms, 3),
                        "wall_s": round(wall, 4),
                    },
                }
            )
        )
    else:
        print()


def add_parser(sub) -> None:
    s = sub.add_parser("client", help="ask a running server (streams the answer)")
    s.add_argument("prompt", nargs="?", help="prompt text")
    s.add_argument("--target", default="127.0.0.1:50051")
    s.add_argument("--token-ids", help="comma-separated prompt ids instead of text")
    cli_args.add_sampling_args(s)
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    s.add_argument("--token", default=None, help="bearer token")
    s.add_argument("--tls-ca", default=None, help="PEM of the CA (or self-signed cert) to trust; enables TLS")
    s.add_argument("--timeout", type=float, default=120.0, help="deadline of the call in seconds")
    s.add_argument("--wait-ready", type=float, default=0.0, help="first wait this long for health SERVING")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_client)
