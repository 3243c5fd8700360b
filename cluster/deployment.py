"""Bring up (and tear down) a serving deployment on Ray: expert pools, then gateways.

Pools are placed from a `RoutingTable`; each pool's replicas sit in one placement group with the
SPREAD strategy, so on a multi-node cluster they land on different nodes. Pools ask for a GPU
each when the cluster has enough, CPUs otherwise. Every wait has a deadline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.placement import RoutingTable, plan_pools
from cluster.ray_cluster import connect
from experts.actor import ExpertPoolActor
from gateway.actor import GatewayActor
from gateway.engine import EngineLimits
from model.config import YuanConfig


class DeploymentError(RuntimeError):
    """Placement or start-up did not finish in time (the message says what was waiting)."""


@dataclass
class DeploymentConfig:
    model_dir: str
    pools: int = 4
    replicas: int = 1
    gateways: int = 1
    dtype: str | None = None
    limits: EngineLimits = field(default_factory=EngineLimits)
    address: str | None = None  # None: embedded local cluster
    transport: str = "dataplane"  # gateway <-> pool bytes: "dataplane" or "ray" (docs/TRANSPORT.md)
    micro_batches: int = 1  # 2: decode in two halves, one's attention overlapping the other's experts
    pool_max_restarts: int = 5  # Ray restarts a dead pool process this many times
    start_timeout_s: float = 180.0


class Deployment:
    def __init__(self, cfg: DeploymentConfig) -> None:
        self.cfg = cfg
        self.model_cfg = YuanConfig.from_file(f"{cfg.model_dir}/config.json")
        self.table: RoutingTable = plan_pools(self.model_cfg.num_experts, cfg.pools, cfg.replicas)
        self.workers: list = []
        self.gateways: list = []
        self._groups: list = []
        self.started_cluster = False

    def start(self) -> Deployment:
        """Pools, then `cfg.gateways` gateway actors sharing them."""
        cfg = self.cfg
        self.start_pools()
        try:
            self.gateways = [GatewayActor.options(num_cpus=1).remote(
                cfg.model_dir, self.table, self.workers, cfg.limits, cfg.dtype, cfg.transport, cfg.micro_batches)
                for _ in range(cfg.gateways)]
            self._wait([g.ready.remote() for g in self.gateways], "gateways to load the model")
        except BaseException:
            self.shutdown()
            raise
        return self

    def start_pools(self) -> Deployment:
        """Connect to Ray and start the expert pools only (a gateway in this process uses them)."""
        cfg = self.cfg
        self.started_cluster = connect(cfg.address, num_cpus=None if cfg.address else
                                       max(8, len(self.table.workers) + cfg.gateways + 2))
        try:
            self._start_pools()
        except BaseException:
            self.shutdown()
            raise
        return self

    def _start_pools(self) -> None:
        cfg = self.cfg
        gpus = ray.cluster_resources().get("GPU", 0) >= len(self.table.workers)
        cpus = self._cpus_per_worker(len(self.table.workers))
        bundle = {"CPU": cpus, "GPU": 1} if gpus else {"CPU": cpus}
        R = cfg.replicas
        for p in range(cfg.pools):
            group = placement_group([bundle] * R, strategy="SPREAD")
            self._groups.append(group)
            for r in range(R):
                self.workers.append(self._spawn(group, r, list(self.table.workers[p * R + r]), cpus, gpus))
        self._wait([g.ready() for g in self._groups], "placement groups for the expert pools")
        self.pool_info = self._wait([w.info.remote() for w in self.workers], "expert pools to load their experts")

    def add_worker(self, expert_ids: list[int] | None = None):
        """Start one more expert-pool worker (its own placement group); returns its handle once ready."""
        gpus = ray.cluster_resources().get("GPU", 0) > len(self.workers)
        cpus = self._cpus_per_worker(len(self.workers) + 1)
        group = placement_group([{"CPU": cpus, "GPU": 1} if gpus else {"CPU": cpus}])
        self._groups.append(group)
        self._wait([group.ready()], "a placement group for a new pool")
        worker = self._spawn(group, 0, list(expert_ids or []), cpus, gpus)
        self._wait([worker.info.remote()], "a new pool to start")
        self.workers.append(worker)
        return worker

    def _spawn(self, group, bundle: int, expert_ids: list[int], cpus: float, gpus: bool):
        """One pool worker in a placement group's bundle; Ray restarts it up to `pool_max_restarts`."""
        cfg = self.cfg
        return ExpertPoolActor.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle),
            num_cpus=cpus, num_gpus=1 if gpus else 0, max_restarts=cfg.pool_max_restarts,
        ).remote(cfg.model_dir, expert_ids, cfg.dtype, "cuda" if gpus else "cpu",
                 max_tokens_per_request=self.max_tokens_per_step())

    def max_tokens_per_step(self) -> int:
        """The most tokens a gateway's step can send a pool: a prefill budget, one prompt longer than
        it (admitted alone), or every running sequence's decode; the pools' data plane refuses more."""
        lim = self.cfg.limits
        return max(lim.max_prefill_tokens, lim.max_running, lim.max_prompt_len or self.model_cfg.max_position_embeddings)

    def replace_worker(self, old, expert_ids: list[int]):
        """A new worker holding `expert_ids` in place of a failing one (which is stopped)."""
        new = self.add_worker(expert_ids)
        self.remove_worker(old)
        return new

    def remove_worker(self, worker) -> None:
        """Stop a worker that no routing table uses any more."""
        self.workers = [w for w in self.workers if w is not worker]
        ray.kill(worker)

    @staticmethod
    def _cpus_per_worker(workers: int) -> float:
        """A whole CPU per pool worker when the cluster has them; on a small cluster (`serve run` on a
        2-core box) a share of what is left after one CPU for a gateway, so every pool still fits."""
        total = ray.cluster_resources().get("CPU", 1.0)
        return 1.0 if total >= workers + 1 else max(0.01, round((total - 1) / workers, 2))

    def _wait(self, refs: list, what: str) -> list:
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.cfg.start_timeout_s)
        if pending:
            raise DeploymentError(f"timed out after {self.cfg.start_timeout_s:.0f}s waiting for {what} "
                                  f"({len(pending)} of {len(refs)} not ready)")
        return ray.get(refs)

    def shutdown(self) -> None:
        """Kill every actor and placement group this deployment created; stop the cluster if it started it.
        Gateways first get a few seconds to free their shared regions (what they leave is swept at the
        next start)."""
        if self.gateways:
            ray.wait([g.close.remote() for g in self.gateways], num_returns=len(self.gateways), timeout=5)
        for actor in self.gateways + self.workers:
            ray.kill(actor)
        for group in self._groups:
            remove_placement_group(group)
        self.gateways, self.workers, self._groups = [], [], []
        if self.started_cluster:
            ray.shutdown()
            self.started_cluster = False
