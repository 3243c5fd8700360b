"""`yuan-serve up`: start (or join) a Ray cluster, deploy the Serve application, serve until Ctrl-C.

Deploys exactly what `deploy.yaml` deploys (`cluster.serve_app.build_app`), waits for gRPC health
SERVING, then blocks. SIGINT/SIGTERM drain the gateway (in-flight requests get `--grace-s`), remove
the application and its pools, and stop the cluster if this command started it.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time


APP = "yuan"


def wait_serving(gateway, gateways: int, timeout_s: float, stop: threading.Event) -> None:
    """Ready once the controller hears from every gateway and every expert has a live holder (a
    gateway reports only once its backend is up); a replica's start-up error is raised. Through Ray,
    not gRPC: readiness does not depend on TLS certificate names or the bind address."""
    import ray

    from cluster.controller import controller_name
    from cluster.pools import NAMESPACE

    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        try:
            status = gateway.status.remote().result(timeout_s=5)
        except Exception:  # no replica is up yet  # noqa: BLE001
            status = None
        if status and status["error"]:
            raise RuntimeError(f"gateway failed to start: {status['error']}")
        try:
            controller = ray.get_actor(controller_name(APP), namespace=NAMESPACE)
            cluster = ray.get(controller.status.remote(), timeout=5)
            if len(cluster["gateways"]) >= gateways and not cluster["uncovered"]:
                return
        except Exception:  # the first replica has not started the controller yet  # noqa: BLE001
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"server not SERVING after {timeout_s:.0f}s")
        stop.wait(0.5)


def drain(gateway, gateways: int) -> None:
    """NOT_SERVING and refusing new calls on every replica now, not when Serve gets to each one's
    shutdown (a call reaches one replica: ask until as many distinct ones said so, within 10 s)."""
    drained: set = set()
    deadline = time.monotonic() + 10
    while len(drained) < gateways and time.monotonic() < deadline:
        try:
            drained.add(gateway.drain.remote().result(timeout_s=5))
        except Exception as e:  # the replica is gone already: nothing to drain  # noqa: BLE001
            print(f"yuan-serve: drain: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return


def cmd_up(args: argparse.Namespace) -> None:
    from ray import serve

    from cli.config_flags import given
    from cluster.controller import stop_controller
    from cluster.ray_cluster import connect
    from cluster.serve_app import AppArgs, build_app

    app_args = AppArgs(**given(args, AppArgs))  # validates before anything starts
    app = build_app(app_args.model_dump())
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    t0 = time.perf_counter()
    a = app_args
    cpus = max(8, a.pools * a.replicas + math.ceil(a.gateways * a.gateway_cpus) + 3)
    started = connect(args.address, num_cpus=None if args.address else cpus)
    try:
        serve.start(proxy_location="Disabled")
        serve.run(app, name=APP, route_prefix=None, blocking=False)
        gateway = serve.get_deployment_handle("GatewayDeployment", app_name=APP)
        wait_serving(gateway, a.gateways, args.start_timeout, stop)
        if not stop.is_set():
            print(
                f"yuan-serve: serving on {a.host}:{a.port} ({a.gateways} gateways, {a.pools} pools x "
                f"{a.replicas} replicas), ready in {time.perf_counter() - t0:.1f}s; Ctrl-C to stop",
                flush=True,
            )
        while not stop.wait(0.5):
            pass
        print("yuan-serve: draining and shutting down", file=sys.stderr, flush=True)
        drain(gateway, a.gateways)
    finally:
        try:
            serve.delete(APP)
            stop_controller(APP)
            serve.shutdown()
        finally:
            if started:
                import ray

                ray.shutdown()


def add_parser(sub) -> None:
    from cli.config_flags import add_flags
    from cluster.app_args import AppArgs

    s = sub.add_parser("up", help="start the cluster and serve over gRPC until Ctrl-C")
    s.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    s.add_argument("--start-timeout", type=float, default=300.0)
    add_flags(s, AppArgs)  # every field of the application's config, as deploy.yaml has them
    s.set_defaults(func=cmd_up)
