"""The Ray Serve application: one gateway deployment that starts its expert pools and serves gRPC.

`deploy.yaml` imports `build_app` by path (`serve run deploy.yaml`, `serve deploy deploy.yaml`), and
`yuan-serve up` calls the same builder, so both run exactly this. Arguments are validated
(`AppArgs`, unknown keys refused) before anything starts. The gateway's gRPC server is a plain
`grpc.aio` server inside the replica, not Serve's gRPC proxy (docs/GRPC.md says why); Serve
supplies lifecycle: health checks that restart a broken replica, and a graceful `__del__` drain.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application

from cluster.deployment import DeploymentConfig
from gateway.engine import EngineLimits
from gateway.server import GatewayServer, ServerOptions
from model.checkpoint import demo_checkpoint


class AppArgs(BaseModel):
    """Arguments of the yuan-serve application (the `args:` block of deploy.yaml)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Checkpoint directory; empty: the demo checkpoint, created once.")
    pools: int = Field(4, ge=1, le=32, description="Expert pools (each hosts a block of experts of every layer).")
    replicas: int = Field(1, ge=1, le=8, description="Replicas of every pool.")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="Override the checkpoint dtype.")
    transport: Literal["dataplane", "ray"] = Field("dataplane", description="Gateway <-> pool bytes: the data "
                                                   "plane (shared memory / TCP) or plain Ray calls.")
    host: str = Field("127.0.0.1", description="gRPC bind address; loopback by default.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port.")
    token: str | None = Field(None, description="Bearer token required on every call except health.")
    tls_cert: str | None = Field(None, description="PEM certificate path (with tls_key) for TLS.")
    tls_key: str | None = Field(None, description="PEM private key path (with tls_cert).")
    grace_s: float = Field(10.0, ge=0, description="Drain: seconds in-flight requests get to finish.")
    micro_batches: Literal[1, 2] = Field(1, description="2: decode in two halves, one's attention overlapping "
                                         "the other's expert step.")
    rebalance_every_s: float | None = Field(None, gt=0, description="Re-place expert replicas from measured "
                                            "load this often; empty: never.")
    slots_per_pool: int | None = Field(None, ge=1, description="Experts one pool may hold (its memory budget); "
                                       "default: its share + 4.")
    autoscale_min_pools: int | None = Field(None, ge=1, description="With autoscale_max_pools: pool count follows load.")
    autoscale_max_pools: int | None = Field(None, ge=1, description="Upper bound of the pool count.")
    pairs_per_s_per_pool: float = Field(2000.0, gt=0, description="Load one pool should carry (routed pairs/s).")
    metrics_per_layer: bool = Field(False, description="Prometheus expert load per layer too (more series).")
    max_running: int = Field(64, ge=1, description="Sequences decoding together.")
    max_queue: int = Field(256, ge=1, description="Requests waiting for a slot; more get RESOURCE_EXHAUSTED.")
    max_tokens: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    max_prompt_len: int | None = Field(None, ge=1, description="Longest prompt in tokens; default: context - 1.")
    default_max_tokens: int = Field(16, ge=1, description="max_tokens of a request that gives none (clamped to "
                                    "the room its prompt leaves in the context).")
    max_request_id_len: int = Field(128, ge=1, description="Characters of a client-chosen request id.")
    max_stop_strings: int = Field(16, ge=0, description="Stop strings per request.")
    max_stop_len: int = Field(256, ge=1, description="Characters of one stop string.")
    max_stop_token_ids: int = Field(64, ge=0, description="Stop token ids per request.")

    @model_validator(mode="after")
    def _tls_pair(self) -> AppArgs:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key: give both or neither")
        if (self.autoscale_min_pools is None) != (self.autoscale_max_pools is None):
            raise ValueError("autoscale_min_pools and autoscale_max_pools: give both or neither")
        if self.autoscale_min_pools is not None and self.autoscale_min_pools > self.autoscale_max_pools:
            raise ValueError("autoscale_min_pools must be <= autoscale_max_pools")
        return self

    def control_config(self):
        from cluster.autoscale import ScalingPolicy
        from cluster.controller import ControlConfig

        policy = None
        if self.autoscale_min_pools is not None:
            policy = ScalingPolicy(self.autoscale_min_pools, self.autoscale_max_pools, self.pairs_per_s_per_pool)
        return ControlConfig(rebalance_every_s=self.rebalance_every_s, slots_per_pool=self.slots_per_pool,
                             autoscale=policy, metrics_per_layer=self.metrics_per_layer)

    def deployment_config(self) -> DeploymentConfig:
        limits = EngineLimits(max_running=self.max_running, max_queue=self.max_queue, max_tokens=self.max_tokens,
                              max_prompt_len=self.max_prompt_len, default_max_tokens=self.default_max_tokens,
                              max_request_id_len=self.max_request_id_len, max_stop_strings=self.max_stop_strings,
                              max_stop_len=self.max_stop_len, max_stop_token_ids=self.max_stop_token_ids)
        return DeploymentConfig(self.model or str(demo_checkpoint()), pools=self.pools, replicas=self.replicas,
                                gateways=0, dtype=self.dtype, limits=limits, address="auto",
                                transport=self.transport, micro_batches=self.micro_batches)

    def server_options(self) -> ServerOptions:
        return ServerOptions(host=self.host, port=self.port, token=self.token, tls_cert=self.tls_cert,
                             tls_key=self.tls_key, grace_s=self.grace_s)


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


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 1}, health_check_period_s=5,
                  graceful_shutdown_timeout_s=60)
class GatewayDeployment:
    def __init__(self, args: AppArgs) -> None:
        from gateway.backends import ray_backend

        bind_serve_internals_to_node_ip()
        cfg, control = args.deployment_config(), args.control_config()
        self.server = GatewayServer(lambda: ray_backend(cfg, control), args.server_options())
        self.port = self.server.start()

    def check_health(self) -> None:
        """Raises so Serve restarts a replica whose server or backend died."""
        if not self.server.alive:
            raise RuntimeError(f"gateway server is down: {self.server.error}")

    async def address(self) -> int:
        return self.port

    def status(self) -> dict:
        """Readiness through Ray (no TLS names involved): serving, or the start-up error."""
        error = self.server.error
        return {"serving": self.server.serving, "error": None if error is None else f"{type(error).__name__}: {error}"}

    def drain(self) -> None:
        """Health NOT_SERVING and new calls refused from now on; in-flight calls go on."""
        self.server.drain()

    def __del__(self) -> None:
        self.server.stop()


DRAIN_MARGIN_S = 30.0  # Serve's graceful shutdown outlasts the drain's grace period by this much


def build_app(args: dict) -> Application:
    """The application `deploy.yaml` and `yuan-serve up` deploy; raises on invalid arguments."""
    app_args = AppArgs(**args)
    return GatewayDeployment.options(graceful_shutdown_timeout_s=app_args.grace_s + DRAIN_MARGIN_S).bind(app_args)
