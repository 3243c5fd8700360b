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


APP = "yuan"


def wait_serving(gateway, timeout_s: float, stop: threading.Event) -> None:
    """Ask the gateway replica through Ray until it serves; raises its start-up error or TimeoutError.
    Through Ray, not gRPC: readiness does not depend on TLS certificate names or the bind address."""
    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        try:
            status = gateway.status.remote().result(timeout_s=5)
        except Exception:  # the replica is not up yet  # noqa: BLE001
            status = None
        if status and status["error"]:
            raise RuntimeError(f"gateway failed to start: {status['error']}")
        if status and status["serving"]:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"server not SERVING after {timeout_s:.0f}s")
        stop.wait(0.5)


def cmd_up(args: argparse.Namespace) -> None:
    from ray import serve

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
        gateway = serve.get_deployment_handle("GatewayDeployment", app_name=APP)
        wait_serving(gateway, args.start_timeout, stop)
        if not stop.is_set():
            print(f"yuan-serve: serving on {args.host}:{args.port} ({args.pools} pools x {args.replicas} replicas), "
                  f"ready in {time.perf_counter() - t0:.1f}s; Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            pass
        print("yuan-serve: draining and shutting down", file=sys.stderr, flush=True)
        try:  # NOT_SERVING and refusing new calls now, not when Serve gets to the replica's shutdown
            gateway.drain.remote().result(timeout_s=10)
        except Exception as e:  # the replica is gone already: nothing to drain
            print(f"yuan-serve: drain: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    finally:
        try:
            serve.delete(APP)
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
