"""What a pool set is asked to be: a plain dataclass with no Ray or torch imports (the command line and
`cluster/app_args.py` read its defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.limits import EngineLimits


@dataclass
class PoolConfig:
    model_dir: str
    pools: int = 4
    replicas: int = 1
    dtype: str | None = None
    limits: EngineLimits = field(default_factory=EngineLimits)  # bounds what a pool's data plane accepts
    address: str | None = None  # None: embedded local cluster
    transport: str = "dataplane"  # gateway <-> pool bytes: "dataplane" or "ray" (docs/TRANSPORT.md)
    micro_batches: int = 1  # 2: decode in two halves, one's attention overlapping the other's experts
    pool_max_restarts: int = 5  # Ray restarts a dead pool process this many times
    pool_resources: dict[str, float] = field(default_factory=dict)  # custom resources each pool needs
    start_timeout_s: float = 180.0
    gateways: int = 1  # gateways that share the cluster's GPUs with the pools (`gpu_share`)
    pool_threads: int = 1  # torch threads of each pool worker (its CPU share stays as placed)
    gateway_threads: int | None = None  # torch threads of a gateway's engine; None: its CPUs (Ray's default)
    gateway_cpus: float = 1.0  # CPUs Ray reserves for each gateway replica (pools share what is left)
