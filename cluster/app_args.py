"""The application's config: `EngineArgs` (the engine's cache and scheduling settings) and `AppArgs`
(the `args:` block of deploy.yaml), one pydantic field per flag with its description. Light on
purpose: the command line builds its flags from these for every command, so this module imports
neither Ray nor torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.pool_config import PoolConfig
from gateway.limits import EngineLimits
from gateway.options import ServerOptions


def _default(cls, name: str):
    """A dataclass field's default: the one place it is written."""
    return cls.__dataclass_fields__[name].default


class EngineArgs(BaseModel):
    """The engine's cache and scheduling settings: `generate` and `up` take them as flags,
    deploy.yaml as args."""

    model_config = ConfigDict(extra="forbid")

    max_num_batched_tokens: int = Field(
        _default(EngineLimits, "max_num_batched_tokens"),
        ge=1,
        description="Tokens one step computes: every running decode, then chunks of waiting prompts "
        "(chunked prefill); it also bounds what a pool accepts per step.",
    )
    block_size: int = Field(
        _default(EngineLimits, "block_size"), ge=1, le=1024, description="Positions per KV cache block."
    )
    kv_cache_gb: float = Field(
        _default(EngineLimits, "kv_cache_gb"),
        gt=0,
        description="Paged KV + LF cache size in GB (1e9 bytes), allocated once per gateway; pages "
        "are touched as blocks are first used.",
    )
    num_kv_blocks: int | None = Field(
        None, ge=2, description="The cache size in blocks instead of kv_cache_gb (block 0 included)."
    )
    prefix_caching: bool = Field(
        _default(EngineLimits, "prefix_caching"),
        description="Share the cached blocks of a common prompt prefix between requests.",
    )
    batch_invariant: bool = Field(
        _default(EngineLimits, "batch_invariant"),
        description="Greedy output identical to the solo run whatever else is in the batch and "
        "however prompts are chunked (slower; docs/PERFORMANCE.md).",
    )

    def limits(self, **more) -> EngineLimits:
        """EngineLimits with every field this config has, by name (the rest: `more`, or defaults)."""
        fields = type(self).model_fields
        return EngineLimits(
            **{f: getattr(self, f) for f in EngineLimits.__dataclass_fields__ if f in fields}, **more
        )


class AppArgs(EngineArgs):
    """Arguments of the yuan-serve application (the `args:` block of deploy.yaml)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="Checkpoint directory; empty: the demo checkpoint, created once."
    )
    pools: int = Field(
        _default(PoolConfig, "pools"),
        ge=1,
        le=32,
        description="Expert pools (each hosts a block of experts of every layer).",
    )
    replicas: int = Field(_default(PoolConfig, "replicas"), ge=1, le=8, description="Replicas of every pool.")
    gateways: int = Field(
        1,
        ge=1,
        le=64,
        description="Gateway replicas (attention, cache, scheduler) sharing "
        "the pools; on one node they share the gRPC port (SO_REUSEPORT).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Override the checkpoint dtype."
    )
    transport: Literal["dataplane", "ray"] = Field(
        _default(PoolConfig, "transport"),
        description="Gateway <-> pool bytes: the data plane (shared memory / TCP) or plain Ray calls.",
    )
    host: str = Field(_default(ServerOptions, "host"), description="gRPC bind address; loopback by default.")
    port: int = Field(_default(ServerOptions, "port"), ge=0, le=65535, description="gRPC port.")
    http_port: int = Field(
        8000,
        ge=0,
        le=65535,
        description="OpenAI-compatible HTTP API and /metrics on this port of host; 0: off.",
    )
    served_model_name: str | None = Field(
        None, description="The model name HTTP clients give; empty: the checkpoint folder's name."
    )
    token: str | None = Field(None, description="Bearer token required on every call except health.")
    tls_cert: str | None = Field(None, description="PEM certificate path (with tls_key) for TLS.")
    tls_key: str | None = Field(None, description="PEM private key path (with tls_cert).")
    grace_s: float = Field(
        _default(ServerOptions, "grace_s"),
        ge=0,
        description="Drain: seconds in-flight requests get to finish.",
    )
    pool_threads: int = Field(
        _default(PoolConfig, "pool_threads"),
        ge=1,
        le=256,
        description="torch threads per pool worker (raise it where pools have cores of their own).",
    )
    gateway_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="torch threads of each gateway's engine (LM head, attention); empty: its CPUs "
        "(gateway_cpus: Ray sets OMP_NUM_THREADS to an actor's CPUs).",
    )
    gateway_cpus: float = Field(
        _default(PoolConfig, "gateway_cpus"),
        gt=0,
        le=256,
        description="CPUs Ray reserves for each gateway replica; its torch threads follow (raise it "
        "where the gateway has cores of its own: its LM head is most of a step at the real model's size).",
    )
    micro_batches: Literal[1, 2] = Field(
        _default(PoolConfig, "micro_batches"),
        description="2: decode in two halves, one's attention overlapping the other's expert step.",
    )
    rebalance_every_s: float | None = Field(
        None, gt=0, description="Re-place expert replicas from measured load this often; empty: never."
    )
    slots_per_pool: int | None = Field(
        None, ge=1, description="Experts one pool may hold (its memory budget); default: its share + 4."
    )
    autoscale_min_pools: int | None = Field(
        None, ge=1, description="With autoscale_max_pools: pool count follows load."
    )
    autoscale_max_pools: int | None = Field(None, ge=1, description="Upper bound of the pool count.")
    pairs_per_s_per_pool: float = Field(
        2000.0, gt=0, description="Load one pool should carry (routed pairs/s)."
    )
    metrics_per_layer: bool = Field(False, description="Prometheus expert load per layer too (more series).")
    max_running: int = Field(
        _default(EngineLimits, "max_running"), ge=1, description="Sequences decoding together."
    )
    max_queue: int = Field(
        _default(EngineLimits, "max_queue"),
        ge=1,
        description="Requests waiting for a slot; more get RESOURCE_EXHAUSTED.",
    )
    max_tokens: int = Field(
        _default(EngineLimits, "max_tokens"), ge=1, description="Largest max_tokens a request may ask for."
    )
    max_prompt_len: int | None = Field(
        None, ge=1, description="Longest prompt in tokens; default: context - 1."
    )
    default_max_tokens: int = Field(
        _default(EngineLimits, "default_max_tokens"),
        ge=1,
        description="max_tokens of a request that gives none (clamped to "
        "the room its prompt leaves in the context).",
    )
    max_request_id_len: int = Field(
        _default(EngineLimits, "max_request_id_len"),
        ge=1,
        description="Characters of a client-chosen request id.",
    )
    max_stop_strings: int = Field(
        _default(EngineLimits, "max_stop_strings"), ge=0, description="Stop strings per request."
    )
    max_stop_len: int = Field(
        _default(EngineLimits, "max_stop_len"), ge=1, description="Characters of one stop string."
    )
    max_stop_token_ids: int = Field(
        _default(EngineLimits, "max_stop_token_ids"), ge=0, description="Stop token ids per request."
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> AppArgs:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key: give both or neither")
        if (self.autoscale_min_pools is None) != (self.autoscale_max_pools is None):
            raise ValueError("autoscale_min_pools and autoscale_max_pools: give both or neither")
        if self.autoscale_min_pools is not None and self.autoscale_min_pools > self.autoscale_max_pools:
            raise ValueError("autoscale_min_pools must be <= autoscale_max_pools")
        return self

    def control_config(self, app: str | None = None):
        from cluster.autoscale import ScalingPolicy
        from cluster.controller import ControlConfig

        policy = None
        if self.autoscale_min_pools is not None:
            policy = ScalingPolicy(
                self.autoscale_min_pools, self.autoscale_max_pools, self.pairs_per_s_per_pool
            )
        return ControlConfig(
            rebalance_every_s=self.rebalance_every_s,
            slots_per_pool=self.slots_per_pool,
            autoscale=policy,
            metrics_per_layer=self.metrics_per_layer,
            serve_app=app,
        )

    def pool_config(self) -> PoolConfig:
        from model.checkpoint import demo_checkpoint  # torch: only where a pool set is made

        limits = self.limits()
        return PoolConfig(
            self.model or str(demo_checkpoint()),
            pools=self.pools,
            replicas=self.replicas,
            dtype=self.dtype,
            limits=limits,
            address="auto",
            transport=self.transport,
            micro_batches=self.micro_batches,
            gateways=self.gateways,
            pool_threads=self.pool_threads,
            gateway_threads=self.gateway_threads,
            gateway_cpus=self.gateway_cpus,
        )

    def server_options(self) -> ServerOptions:
        return ServerOptions(
            host=self.host,
            port=self.port,
            token=self.token,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            grace_s=self.grace_s,
            bind_when_ready=True,
            http_port=self.http_port,
            served_model_name=self.served_model_name,
        )
