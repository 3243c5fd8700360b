"""`yuan-serve stats`: the live load of a running server, as text and optionally as a PNG.

The plot has a heatmap with one cell per (layer, expert): tokens routed so far, and bars of the
(token, expert) pairs each pool worker computed, so hot experts and unbalanced pools stand out.
"""

from __future__ import annotations

import argparse
import json

import grpc

from cli.client import channel
from protos import serving_pb2 as pb
from protos import serving_pb2_grpc as pb_grpc


def fetch(target: str, token: str | None = None, tls_ca: str | None = None) -> pb.StatsResponse:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with channel(target, tls_ca) as ch:
        return pb_grpc.YuanServingStub(ch).Stats(pb.StatsRequest(), metadata=metadata, timeout=10)


def plot(stats: pb.StatsResponse, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    L, E = stats.num_layers, stats.num_experts
    grid = np.array(stats.expert_tokens, dtype=float).reshape(L, E) if L and E else np.zeros((1, 1))
    workers = sorted(stats.worker_pairs)
    fig, (heat, bars) = plt.subplots(
        1, 2, figsize=(13, 3 + 0.25 * max(L, 1)), gridspec_kw={"width_ratios": [3, 1]}
    )
    im = heat.imshow(grid, aspect="auto", cmap="viridis")
    heat.set(
        title=f"tokens routed per (layer, expert), routing table v{stats.routing_table_version}",
        xlabel="expert",
        ylabel="layer",
    )
    heat.set_yticks(range(grid.shape[0]))
    heat.set_xticks(range(0, grid.shape[1], max(1, grid.shape[1] // 16)))
    fig.colorbar(im, ax=heat)
    bars.bar([str(w) for w in workers], [stats.worker_pairs[w] for w in workers])
    bars.set(title="pairs computed per pool worker", xlabel="worker")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def cmd_stats(args: argparse.Namespace) -> None:
    from router.load import max_over_mean  # torch: only for this command, not for every one

    try:
        stats = fetch(args.target, args.token, args.tls_ca)
    except grpc.RpcError as e:
        raise SystemExit(f"error: {e.code().name}: {e.details()}") from None
    if args.plot:
        plot(stats, args.plot)
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(stats)))
        return
    print(
        f"gateway {stats.gateway}: running {stats.running}, waiting {stats.waiting}, KV blocks "
        f"{stats.kv_blocks_used}/{stats.kv_blocks_total}, prefix-cache hits {stats.prefix_cache_hits}/"
        f"{stats.prefix_cache_queries} tokens, preemptions {stats.preemptions}, steps {stats.steps}, "
        f"routing table v{stats.routing_table_version}"
    )
    if stats.gateways:
        total = f"running {stats.running_total}, waiting {stats.waiting_total}"
        print(f"all {len(stats.gateways)} gateways: {total}")
        for g in stats.gateways:
            print(
                f"  {g.gateway}: running {g.running}, waiting {g.waiting}, steps {g.steps}, "
                f"admitted {g.admitted}, table v{g.routing_table_version}"
            )
    if stats.num_experts:
        per_expert = [
            sum(stats.expert_tokens[layer * stats.num_experts + e] for layer in range(stats.num_layers))
            for e in range(stats.num_experts)
        ]
        print(
            f"expert load max/mean {max_over_mean(per_expert):.2f}; hottest "
            + ", ".join(
                f"{e}:{per_expert[e]}"
                for e in sorted(range(len(per_expert)), key=lambda e: -per_expert[e])[:5]
            )
        )
    if stats.worker_pairs:
        loads = [stats.worker_pairs[w] for w in sorted(stats.worker_pairs)]
        print(f"pool worker pairs {loads} (max/mean {max_over_mean(loads):.2f})")
    if args.plot:
        print(f"wrote {args.plot}")


def add_parser(sub) -> None:
    s = sub.add_parser("stats", help="live load of a running server (text, JSON or a PNG heatmap)")
    s.add_argument("--target", default="127.0.0.1:50051")
    s.add_argument("--plot", default=None, help="write a PNG: layer x expert heatmap and per-pool bars")
    s.add_argument("--token", default=None)
    s.add_argument("--tls-ca", default=None)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stats)
