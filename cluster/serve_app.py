"""The Ray Serve application: `gateways` gateway replicas sharing one controller and its pools.

`deploy.yaml` imports `build_app` by path (`serve run deploy.yaml`, `serve deploy deploy.yaml`), and
`yuan-serve up` calls the same builder, so both run exactly this. Arguments are validated
(`AppArgs`, unknown keys refused) before anything starts. Each replica gets (or, the first one,
starts) the application's controller by name and attaches to it (`cluster.gateway_host`); the
controller owns the pools, so a replica's crash or redeploy costs no pool. Every replica serves gRPC
on the same port: grpc sets SO_REUSEPORT on Linux, so on one node the kernel spreads connections
over them. The gRPC server is a plain `grpc.aio` server inside the replica, not Serve's gRPC proxy
(docs/GRPC.md says why); Serve supplies lifecycle: health checks that restart a broken replica, and
a graceful `__del__` drain. The controller stops the pools by itself once the Serve application is
gone and no gateway reports any more.
"""

from __future__ import annotations

import os

from ray import serve
from ray.serve import Application

from cluster.app_args import AppArgs
from gateway.server import GatewayServer


def bind_serve_internals_to_node_ip() -> None:
    """Ray Serve 2.60 starts each replica's inter-deployment gRPC server on "[::]:0" (all
    interfaces) after the constructor; make it bind the node's own address, as Ray's core servers
    do, so an embedded cluster (node address 127.0.0.1) listens on loopback alone. Called in the
    replica's constructor; it changes only this process, and only that one address."""
    import ray
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    if getattr(original, "yuan_node_ip", False):
        return
    node_ip = ray.util.get_node_ip_address()

    def add_port(server, address: str):
        if address.startswith("[::]:"):
            address = f"{node_ip}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    add_port.yuan_node_ip = True
    replica.add_port_to_grpc_server = add_port


@serve.deployment(
    num_replicas=1, ray_actor_options={"num_cpus": 1}, health_check_period_s=5, graceful_shutdown_timeout_s=60
)
class GatewayDeployment:
    def __init__(self, args: AppArgs) -> None:
        from cluster.gateway_host import attach_backend

        bind_serve_internals_to_node_ip()
        app = serve.get_replica_context().app_name
        pools, control = args.pool_config(), args.control_config(app)
        self.server = GatewayServer(lambda: attach_backend(app, pools, control), args.server_options())
        self.port = self.server.start()

    def check_health(self) -> None:
        """Raises so Serve restarts a replica whose server or backend died."""
        if not self.server.alive:
            raise RuntimeError(f"gateway server is down: {self.server.error}")

    async def address(self) -> int:
        """The gRPC port, once bound (a replica binds when its backend is up)."""
        import asyncio

        while self.server.port is None and self.server.error is None:
            await asyncio.sleep(0.1)
        return self.server.port

    def status(self) -> dict:
        """Readiness through Ray (no TLS names involved): serving, or the start-up error."""
        error = self.server.error
        return {
            "serving": self.server.serving,
            "error": None if error is None else f"{type(error).__name__}: {error}",
            "gateway": self.server.state.gateway_id,
            "pid": os.getpid(),
        }

    def drain(self) -> str:
        """Health NOT_SERVING and new calls refused from now on; in-flight calls go on. Returns this
        gateway's id."""
        self.server.drain()
        return self.server.state.gateway_id

    def __del__(self) -> None:
        self.server.stop()


DRAIN_MARGIN_S = 30.0  # Serve's graceful shutdown outlasts the drain's grace period by this much


def build_app(args: dict) -> Application:
    """The application `deploy.yaml` and `yuan-serve up` deploy; raises on invalid arguments."""
    app_args = AppArgs(**args)
    actor = {"num_cpus": app_args.gateway_cpus}  # Ray gives its torch as many threads (OMP_NUM_THREADS)
    gpus = gateway_gpu_share(app_args)
    if gpus:  # the gateway's model (attention, router, LM head) and its cache go on a GPU
        actor["num_gpus"] = gpus
    return GatewayDeployment.options(
        num_replicas=app_args.gateways,
        graceful_shutdown_timeout_s=app_args.grace_s + DRAIN_MARGIN_S,
        ray_actor_options=actor,
    ).bind(app_args)


def gateway_gpu_share(args: AppArgs) -> float:
    """A gateway's share of the cluster's GPUs: as each pool worker's (`cluster.pools.gpu_share`)."""
    from cluster.pools import gpu_share

    return gpu_share(args.gateways + args.pools * args.replicas)
