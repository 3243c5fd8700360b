"""`yuan-serve up`: start (or join) a Ray cluster, deploy the Serve application, serve until Ctrl-C.

Deploys exactly what `deploy.yaml` deploys (`cluster.serve_app.build_app`), waits for gRPC health
SERVING, then blocks. SIGINT/SIGTERM drain the gateway (in-flight requests get `--grace-s`), remove
the application and its pools, and stop the cluster if this command started it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time


def cmd_up(args: argparse.Namespace) -> None:
    from ray import serve

    from cli.client import channel, wait_serving
    from cluster.ray_cluster import connect
    from cluster.serve_app import build_app

    app_args = {k: v for k, v in {
        "model": args.model, "pools": args.pools, "transport": args.transport, "micro_batches": args.micro_batches, "replicas": args.replicas, "host": args.host, "port": args.port,
        "token": args.token, "tls_cert": args.tls_cert, "tls_key": args.tls_key, "grace_s": args.grace_s,
        "max_running": args.max_running, "max_queue": args.max_queue, "max_tokens": args.max_tokens,
        "max_prompt_len": args.max_prompt_len, "rebalance_every_s": args.rebalance_every,
        "autoscale_min_pools": args.autoscale[0] if args.autoscale else None,
        "autoscale_max_pools": args.autoscale[1] if args.autoscale else None}.items() if v is not None}
    app = build_app(app_args)  # validates before anything starts
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    t0 = time.perf_counter()
    started = connect(args.address, num_cpus=None if args.address else max(8, args.pools * args.replicas + 4))
    try:
        serve.start(proxy_location="Disabled")
        serve.run(app, name="yuan", route_prefix=None, blocking=False)
        if args.tls_cert:
            ch = channel(f"localhost:{args.port}", args.tls_cert)
        else:
            ch = channel(f"{args.host}:{args.port}")
        wait_serving(ch, args.start_timeout)
        print(f"yuan-serve: serving on {args.host}:{args.port} ({args.pools} pools x {args.replicas} replicas), "
              f"ready in {time.perf_counter() - t0:.1f}s; Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            pass
        print("yuan-serve: draining and shutting down", file=sys.stderr, flush=True)
    finally:
        try:
            serve.delete("yuan")
            serve.shutdown()
        finally:
            if started:
                import ray

                ray.shutdown()


def add_parser(sub) -> None:
    s = sub.add_parser("up", help="start the cluster and serve over gRPC until Ctrl-C")
    s.add_argument("--model", default=None, help="checkpoint directory (default: the demo checkpoint)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--pools", type=int, default=4)
    s.add_argument("--replicas", type=int, default=1)
    s.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    s.add_argument("--transport", choices=["dataplane", "ray"], default=None,
                   help="gateway <-> pool bytes (default: dataplane)")
    s.add_argument("--token", default=None, help="require this bearer token on every call but health")
    s.add_argument("--micro-batches", type=int, choices=[1, 2], default=None,
                   help="2: overlap one half-batch's attention with the other's experts")
    s.add_argument("--tls-cert", default=None)
    s.add_argument("--tls-key", default=None)
    s.add_argument("--grace-s", type=float, default=None)
    s.add_argument("--max-running", type=int, default=None)
    s.add_argument("--max-queue", type=int, default=None)
    s.add_argument("--max-tokens", type=int, default=None)
    s.add_argument("--max-prompt-len", type=int, default=None)
    s.add_argument("--rebalance-every", type=float, default=None, metavar="S",
                   help="re-place expert replicas from measured load every S seconds")
    s.add_argument("--autoscale", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="let the pool count follow load between MIN and MAX")
    s.add_argument("--start-timeout", type=float, default=300.0)
    s.set_defaults(func=cmd_up)
