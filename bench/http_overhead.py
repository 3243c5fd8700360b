"""The OpenAI-compatible HTTP front against gRPC, on one gateway, side by side in one run.

Per-request overhead: the same unary request (a 4-token prompt, 1 greedy token) through gRPC
`Generate` and HTTP `/v1/completions`, alternated in blocks, p50 and p99. Streaming: time per output
token (TPOT, mean gap between a stream's tokens after its first) with 1 and 32 concurrent streams of
64 tokens, through `GenerateStream` and through SSE. And the alternative front end, Ray Serve's HTTP
proxy: a trivial JSON endpoint behind it against the same trivial endpoint (`/v1/models`) served by
the gateway itself, so the difference is the proxy alone.
Usage: python -m bench.http_overhead [--calls 200] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import time

import grpc
import httpx

from bench import percentiles
from gateway.backends import local_backend
from gateway.engine import EngineLimits
from gateway.server import GatewayServer, ServerOptions
from model.checkpoint import demo_checkpoint
from protos import serving_pb2 as pb
from protos import serving_pb2_grpc as pb_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unary(stub, http: httpx.Client, model: str, calls: int, blocks: int = 4) -> dict:
    req = pb.GenerateRequest(token_ids=[5, 6, 7, 8], max_tokens=1)
    body = {"model": model, "prompt": [5, 6, 7, 8], "max_tokens": 1, "temperature": 0}
    for _ in range(20):
        stub.Generate(req)
        http.post("/v1/completions", json=body)
    times: dict[str, list[float]] = {"grpc": [], "http": []}
    for _ in range(blocks):  # alternated blocks: the box's drift hits both
        for name in ("grpc", "http"):
            for _ in range(calls // blocks):
                t0 = time.perf_counter()
                stub.Generate(req) if name == "grpc" else http.post(
                    "/v1/completions", json=body
                ).raise_for_status()
                times[name].append(time.perf_counter() - t0)
    return {name: percentiles(t) for name, t in times.items()}


async def tpot_grpc(target: str, streams: int, tokens: int) -> float:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.YuanServingStub(ch)

        async def one(i: int) -> list[float]:
            req = pb.GenerateRequest(token_ids=[5 + i % 50, 6, 7], max_tokens=tokens, ignore_eod=True)
            return [time.perf_counter() async for _ in stub.GenerateStream(req)]

        return _tpot(await asyncio.gather(*(one(i) for i in range(streams))))


async def tpot_http(base: str, model: str, streams: int, tokens: int) -> float:
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:

        async def one(i: int) -> list[float]:
            body = {
                "model": model,
                "prompt": [5 + i % 50, 6, 7],
                "max_tokens": tokens,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
            }
            stamps = []
            async with http.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        stamps.append(time.perf_counter())
            return stamps

        return _tpot(await asyncio.gather(*(one(i) for i in range(streams))))


def _tpot(stamps: list[list[float]]) -> float:
    """Median over streams of the mean gap between tokens after the first, in ms."""
    return statistics.median((s[-1] - s[0]) / (len(s) - 1) * 1e3 for s in stamps if len(s) > 1)


def serve_proxy(calls: int) -> dict:
    """A trivial JSON endpoint through Ray Serve's HTTP proxy (the other way to front the gateways)."""
    from ray import serve

    from cluster.ray_cluster import connect

    connect(num_cpus=8)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Models:
        async def __call__(self, request) -> dict:
            return {"object": "list", "data": [{"id": "yuan", "object": "model"}]}

    serve.run(Models.bind(), name="proxy-bench", route_prefix="/v1/models")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(20):
                http.get("/v1/models").raise_for_status()
            samples = []
            for _ in range(calls):
                t0 = time.perf_counter()
                http.get("/v1/models").raise_for_status()
                samples.append(time.perf_counter() - t0)
        return percentiles(samples)
    finally:
        serve.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    model_dir = str(demo_checkpoint())
    server = GatewayServer(
        lambda: local_backend(model_dir, EngineLimits(max_running=64)),
        ServerOptions(port=0, http_port=free_port()),
    )
    server.start()
    server.wait_ready(120)
    target, base = f"127.0.0.1:{server.port}", f"http://127.0.0.1:{server.http_port}"
    model = server.state.info["model"]
    out: dict = {}
    try:
        with grpc.insecure_channel(target) as ch, httpx.Client(base_url=base) as http:
            out["unary_ms"] = unary(pb_grpc.YuanServingStub(ch), http, model, args.calls)
            samples = []
            for _ in range(args.calls):
                t0 = time.perf_counter()
                http.get("/v1/models").raise_for_status()
                samples.append(time.perf_counter() - t0)
            out["models_direct_ms"] = percentiles(samples)
        out["tpot_ms"] = {}
        for streams in (1, 32):
            out["tpot_ms"][streams] = {
                "grpc": asyncio.run(tpot_grpc(target, streams, args.tokens)),
                "http": asyncio.run(tpot_http(base, model, streams, args.tokens)),
            }
    finally:
        server.stop(grace_s=0)
    out["models_serve_proxy_ms"] = serve_proxy(args.calls)
    if args.json:
        print(json.dumps(out))
        return
    u = out["unary_ms"]
    print("| path | unary p50 ms | unary p99 ms | TPOT x1 ms | TPOT x32 ms |")
    print("| --- | --- | --- | --- | --- |")
    for name in ("grpc", "http"):
        print(
            f"| {name} | {u[name]['p50']:.2f} | {u[name]['p99']:.2f} | {out['tpot_ms'][1][name]:.2f} | "
            f"{out['tpot_ms'][32][name]:.2f} |"
        )
    d, s = out["models_direct_ms"], out["models_serve_proxy_ms"]
    print(
        f"GET /v1/models: served by the gateway p50 {d['p50']:.2f} / p99 {d['p99']:.2f} ms; "
        f"through Ray Serve's HTTP proxy p50 {s['p50']:.2f} / p99 {s['p99']:.2f} ms"
    )


if __name__ == "__main__":
    main()
