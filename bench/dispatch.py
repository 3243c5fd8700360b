"""Dispatch microbenchmark: gateway -> P expert pools -> gateway for T tokens x hidden d, per transport.

Real `ExpertPool` actors and the real `RayDispatcher`, on a one-layer checkpoint with hidden 2048
and 8-wide experts, so expert compute is negligible and the time is the transport's.
Usage: python -m bench.dispatch [--tokens 64] [--pools 1 2 4] [--iters 200] [--inline-kib 1024]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import ray
import torch

from cluster.deployment import Deployment, DeploymentConfig
from cluster.ray_cluster import connect
from gateway.ray_dispatcher import RayDispatcher
from model.checkpoint import write_random_checkpoint
from model.config import YuanConfig

TRANSPORT_CFG = YuanConfig(vocab_size=320, hidden_size=2048, num_layers=1, num_heads=16, num_experts=32,
                           top_k=2, ffn_hidden_size=8, max_position_embeddings=64, eod_token_id=256,
                           sep_token_id=258, pad_token_id=256)


def percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"p50": s[len(s) // 2] * 1e3, "p99": s[min(len(s) - 1, int(len(s) * 0.99))] * 1e3}


def measure(model_dir: str, pools: int, tokens: int, iters: int) -> dict[str, float]:
    d = Deployment(DeploymentConfig(model_dir, pools=pools, gateways=0)).start()
    try:
        disp = RayDispatcher(d.table, d.workers)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, TRANSPORT_CFG.hidden_size, generator=g)
        ids = torch.stack([torch.randperm(32, generator=g)[:2] for _ in range(tokens)])
        w = torch.rand(tokens, 2, generator=g)
        for _ in range(10):
            disp.experts(0, x, ids, w)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            disp.experts(0, x, ids, w)
            times.append(time.perf_counter() - t0)
        empty = []
        for _ in range(iters):
            t0 = time.perf_counter()
            ray.get(d.workers[0].info.remote())
            empty.append(time.perf_counter() - t0)
        return {**percentiles(times), "empty_call_p50": percentiles(empty)["p50"]}
    finally:
        d.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--pools", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--inline-kib", type=int, default=1024, help="Ray's inline object limit (its default: 100)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    connect(num_cpus=16, inline_object_bytes=args.inline_kib * 1024)
    with tempfile.TemporaryDirectory() as tmp:
        write_random_checkpoint(TRANSPORT_CFG, tmp + "/ckpt", seed=0)
        rows = {P: measure(tmp + "/ckpt", P, args.tokens, args.iters) for P in args.pools}
    ray.shutdown()
    if args.json:
        print(json.dumps({"tokens": args.tokens, "inline_kib": args.inline_kib, "pools": rows}))
        return
    print(f"plain Ray actor calls, {args.tokens} tokens x {TRANSPORT_CFG.hidden_size} float32, "
          f"inline limit {args.inline_kib} KiB")
    print(f"{'pools':>5} {'p50 ms':>8} {'p99 ms':>8} {'empty call p50 ms':>18}")
    for P, r in rows.items():
        print(f"{P:>5} {r['p50']:8.2f} {r['p99']:8.2f} {r['empty_call_p50']:18.2f}")


if __name__ == "__main__":
    main()
