"""Dispatch microbenchmark: gateway -> P expert pools -> gateway for T tokens x hidden d, per transport.

The real `PoolDispatcher` and pool actors on a one-layer checkpoint with hidden 2048 and 8-wide
experts, two ways: `echo` pools (an `ExpertPool` that returns its input, so the time is planning
plus transport) and `experts` pools (the real expert math, whose per-expert torch calls dominate
at this size). Every transport is measured on the same pools in one run, side by side.
Usage: python -m bench.dispatch [--tokens 64] [--pools 1 2 4] [--iters 300] [--inline-kib 1024] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import ray
import torch

from bench import percentiles, wait_for_quiet
from cluster.pools import PoolConfig, PoolSet
from router.table import plan_pools
from cluster.ray_cluster import connect
from experts.pool import ExpertPool
from gateway.compiled_dispatcher import CompiledGraphDispatcher
from gateway.pool_dispatcher import TRANSPORTS, PoolDispatcher
from model.checkpoint import write_random_checkpoint
from model.config import YuanConfig

TRANSPORT_CFG = YuanConfig(
    vocab_size=320,
    hidden_size=2048,
    num_layers=1,
    num_heads=16,
    num_experts=32,
    top_k=2,
    ffn_hidden_size=8,
    max_position_embeddings=64,
    eod_token_id=256,
    sep_token_id=258,
    pad_token_id=256,
)


# Round trips before timing, in seconds: a serving gateway's path is hot all the time, and 20 calls
# did not get it there. 4 pools, echo, seven alternating runs each: p99 1.5-4.1 ms with 20 calls,
# 0.84-1.34 ms with 2 s; p50 0.48-0.95 and 0.44-0.61 ms.
WARM_UP_S = 2.0


def round_trips(disp: PoolDispatcher, tokens: int, iters: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, TRANSPORT_CFG.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(32, generator=g)[:2] for _ in range(tokens)])
    w = torch.rand(tokens, 2, generator=g)
    warm_until, n = time.perf_counter() + WARM_UP_S, 0
    while n < 20 or time.perf_counter() < warm_until:  # steady state, as a serving gateway runs
        disp.experts(0, x, ids, w)
        n += 1
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        disp.experts(0, x, ids, w)
        times.append(time.perf_counter() - t0)
    return percentiles(times)


class EchoPool(ExpertPool):
    """Returns its input rows instead of computing experts: the dispatch path without the math."""

    def compute_pairs(self, layer, batch, start, end):  # the data plane's call
        rows, slots = batch.index[0, start:end], batch.index[1, start:end]
        batch.out_bits[slots] = batch.x_bits[rows]  # each pair gets its token row, in its slot

    def compute(self, layer, x, expert_ids, weights):  # the Ray-call path's
        return x.copy()


def measure(
    model_dir: str, pools: int, tokens: int, iters: int, compute: str, compiled: bool = False
) -> dict[str, dict[str, float]]:
    if compute == "experts":
        ps = PoolSet(PoolConfig(model_dir, pools=pools))
        ps.start()
        table, workers, stop = ps.table, ps.handles, ps.shutdown
    else:
        table = plan_pools(TRANSPORT_CFG.num_experts, pools)
        workers = [ray.remote(EchoPool).options(num_cpus=1).remote(model_dir, list(e)) for e in table.workers]
        ray.get([w.info.remote() for w in workers])

        def stop():
            for w in workers:
                ray.kill(w)

    wait_for_quiet()  # new actors make Ray start replacement workers, which compete for the cores
    try:
        out = {}
        for transport in TRANSPORTS:
            disp = PoolDispatcher(table, workers, transport)
            out[transport] = round_trips(disp, tokens, iters)
            disp.close()
        if compiled:
            disp = CompiledGraphDispatcher(table, workers)
            out["compiled"] = round_trips(disp, tokens, iters)
            disp.close()
        return out
    finally:
        stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--pools", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument(
        "--inline-kib", type=int, default=1024, help="Ray's inline object limit (its default: 100)"
    )
    p.add_argument("--compute", nargs="+", choices=["echo", "experts"], default=["echo", "experts"])
    p.add_argument("--compiled", action="store_true", help="also measure a Ray Compiled Graph transport")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    connect(num_cpus=16, inline_object_bytes=args.inline_kib * 1024)
    torch.set_num_threads(1)  # as the gateway actor runs; more threads spin and starve the pools
    with tempfile.TemporaryDirectory() as tmp:
        write_random_checkpoint(TRANSPORT_CFG, tmp + "/ckpt", seed=0)
        rows = {
            c: {P: measure(tmp + "/ckpt", P, args.tokens, args.iters, c, args.compiled) for P in args.pools}
            for c in args.compute
        }
    ray.shutdown()
    if args.json:
        print(
            json.dumps(
                {
                    "tokens": args.tokens,
                    "hidden": TRANSPORT_CFG.hidden_size,
                    "inline_kib": args.inline_kib,
                    "pools": rows,
                }
            )
        )
        return
    print(
        f"per-layer dispatch round trip, {args.tokens} tokens x {TRANSPORT_CFG.hidden_size} float32, "
        f"Ray inline limit {args.inline_kib} KiB, {args.iters} iterations"
    )
    print(f"{'pools':>8} {'compute':>8} {'transport':>10} {'p50 ms':>8} {'p99 ms':>8}   ray/this p50")
    for c, by_pools in rows.items():
        for P, r in by_pools.items():
            for t in r:
                ratio = f"{r['ray']['p50'] / r[t]['p50']:8.1f}x" if t != "ray" else ""
                print(f"{P:>8} {c:>8} {t:>10} {r[t]['p50']:8.3f} {r[t]['p99']:8.3f}   {ratio}")


if __name__ == "__main__":
    main()
