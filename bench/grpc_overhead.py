"""gRPC front-end overhead: our grpc.aio server in the gateway vs Ray Serve's gRPC proxy.

Both serve the same trivial RPC (`Tokenize` of a short text with the same tokenizer), measured side by
side in one run on one Ray cluster, so the difference is the front end alone.
Usage: python -m bench.grpc_overhead [--calls 300] [--port 50077]
"""

from __future__ import annotations

import argparse
import json
import time

import grpc
from ray import serve

from bench import percentiles
from cluster.ray_cluster import connect
from gateway.backends import local_backend
from gateway.server import GatewayServer, ServerOptions
from gateway.tokenizer import ByteTokenizer
from model.checkpoint import demo_checkpoint
from model.config import YuanConfig
from protos import serving_pb2 as pb
from protos import serving_pb2_grpc as pb_grpc


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ProxiedTokenize:
    """The same `Tokenize` behind Serve's gRPC proxy (methods are named as the RPCs)."""

    def __init__(self, model_dir: str) -> None:
        self.tokenizer = ByteTokenizer(YuanConfig.from_file(f"{model_dir}/config.json"))

    def Tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        return pb.TokenizeResponse(token_ids=self.tokenizer.encode(request.text))


def time_calls(stub, calls: int, metadata=None) -> dict[str, float]:
    req = pb.TokenizeRequest(text="Hello, Yuan 2.0-M32!")
    for _ in range(20):
        stub.Tokenize(req, metadata=metadata)
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        stub.Tokenize(req, metadata=metadata)
        samples.append(time.perf_counter() - t0)
    return {f"{k}_ms": v for k, v in percentiles(samples).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--port", type=int, default=50077, help="Serve gRPC proxy port")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    model_dir = str(demo_checkpoint())
    connect(num_cpus=8)
    server = GatewayServer(lambda: local_backend(model_dir), ServerOptions(port=0))
    port = server.start()
    server.wait_ready()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        ours = time_calls(pb_grpc.YuanServingStub(ch), args.calls)
    server.stop(grace_s=0)
    serve.start(
        proxy_location="HeadOnly",
        http_options={"port": 0},
        grpc_options={
            "port": args.port,
            "grpc_servicer_functions": ["protos.serving_pb2_grpc.add_YuanServingServicer_to_server"],
        },
    )
    try:
        serve.run(ProxiedTokenize.bind(model_dir), name="tok", route_prefix="/tok")
        with grpc.insecure_channel(f"127.0.0.1:{args.port}") as ch:
            proxy = time_calls(pb_grpc.YuanServingStub(ch), args.calls, metadata=[("application", "tok")])
    finally:
        serve.shutdown()
    result = {
        "grpc_aio_in_gateway": ours,
        "serve_grpc_proxy": proxy,
        "proxy_over_ours_p50": proxy["p50_ms"] / ours["p50_ms"],
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"unary Tokenize, {args.calls} calls, p50 / p99 ms")
    print(f"  grpc.aio server in the gateway   {ours['p50_ms']:7.2f} / {ours['p99_ms']:7.2f}")
    print(f"  Ray Serve gRPC proxy             {proxy['p50_ms']:7.2f} / {proxy['p99_ms']:7.2f}")
    print(f"  proxy / ours (p50)               {result['proxy_over_ours_p50']:7.1f}x")


if __name__ == "__main__":
    main()
