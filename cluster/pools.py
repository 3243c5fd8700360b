"""The expert pools of one application, as Ray actors the controller owns: start, find, add, replace,
remove, and stop them.

Pools are named, detached actors (`yuan-<app>-pool-<n>` in the `yuan-serve` namespace), each in its
own detached placement group, so their life depends on no gateway and no controller process: a
restarted controller finds them by name and asks each what it holds (`PoolSet.adopt`). Pools ask for
a GPU each when the cluster has enough, CPUs otherwise; `pool_resources` can pin them to nodes that
offer a custom resource. Ray restarts a dead pool process up to `pool_max_restarts` times. Every wait
has a deadline.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.pool_config import PoolConfig
from cluster.ray_cluster import connect
from experts.actor import ExpertPoolActor
from model.config import YuanConfig
from router.table import RoutingTable, plan_pools

NAMESPACE = "yuan-serve"


class DeploymentError(RuntimeError):
    """Placement or start-up did not finish in time (the message says what was waiting)."""


@dataclass
class Worker:
    """One pool worker (a replica): its actor, its name and what it held when last asked."""

    handle: object
    name: str
    experts: tuple[int, ...]
    pid: int = 0
    node_id: str = ""


def gpu_share(users: int) -> float:
    """GPUs per process of `users` (pool workers plus gateways): none on a cluster without GPUs,
    else an even share, at most one each (Ray places fractional users on the same device)."""
    total = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    return min(1.0, total / users) if total > 0 else 0.0


class PoolSet:
    def __init__(self, cfg: PoolConfig, app: str | None = None) -> None:
        self.cfg = cfg
        self.app = app or f"anon-{uuid.uuid4().hex[:8]}"
        self.model_cfg = YuanConfig.from_file(f"{cfg.model_dir}/config.json")
        self.workers: list[Worker] = []
        self._groups: dict[str, object] = {}  # worker name -> its placement group
        self._next = 0
        self.started_cluster = False

    @property
    def handles(self) -> list:
        return [w.handle for w in self.workers]

    @property
    def table(self) -> RoutingTable:
        """The workers' placement as they hold it now (version 1: for a dispatcher run by hand)."""
        return RoutingTable(1, tuple(w.experts for w in self.workers), self.model_cfg.num_experts)

    # ---- names ---------------------------------------------------------------------------------
    @property
    def prefix(self) -> str:
        return f"yuan-{self.app}-pool-"

    def _new_name(self) -> str:
        name = f"{self.prefix}{self._next}"
        self._next += 1
        return name

    # ---- start or adopt ------------------------------------------------------------------------
    def start(self) -> RoutingTable:
        """Connect to Ray and start the planned pools; returns the first routing table."""
        cfg = self.cfg
        table = plan_pools(self.model_cfg.num_experts, cfg.pools, cfg.replicas)
        self.started_cluster = connect(
            cfg.address, num_cpus=None if cfg.address else max(8, len(table.workers) + 4)
        )
        try:
            gpus = gpu_share(len(table.workers) + cfg.gateways)
            cpus = self._cpus_per_worker(len(table.workers), cfg.gateway_cpus)
            R = cfg.replicas
            pending = []
            for p in range(cfg.pools):  # one group per pool: its replicas SPREAD over nodes
                names = [self._new_name() for _ in range(R)]
                group = self._group([self._bundle(cpus, gpus)] * R, "SPREAD", names[0])
                for r, name in enumerate(names):
                    self._groups[name] = group
                    pending.append(
                        (
                            name,
                            self._spawn(name, group, r, list(table.workers[p * R + r]), cpus, gpus),
                            table.workers[p * R + r],
                        )
                    )
            self._wait(
                [g.ready() for g in {id(g): g for g in self._groups.values()}.values()],
                "placement groups for the expert pools",
            )
            infos = self._wait([h.info.remote() for _, h, _ in pending], "expert pools to load their experts")
            self.workers = [
                Worker(h, name, tuple(experts), info["pid"], info["node_id"])
                for (name, h, experts), info in zip(pending, infos)
            ]
        except BaseException:
            self.shutdown()
            raise
        return RoutingTable(1, tuple(w.experts for w in self.workers), self.model_cfg.num_experts)

    def adopt(self) -> RoutingTable | None:
        """Find this application's live pools by name (a restarted controller); returns the table
        they hold (version: the highest any of them was told, plus one), or None if there are none."""
        names = sorted(
            (
                a["name"]
                for a in ray.util.list_named_actors(all_namespaces=True)
                if a.get("namespace") == NAMESPACE and a["name"].startswith(self.prefix)
            ),
            key=lambda n: int(n[len(self.prefix) :]),
        )
        found = []
        for name in names:
            try:
                handle = ray.get_actor(name, namespace=NAMESPACE)
                found.append((name, handle, ray.get(handle.info.remote(), timeout=self.cfg.start_timeout_s)))
            except Exception:  # a pool that is gone for good  # noqa: BLE001
                continue
        if not found:
            return None
        self.workers = [
            Worker(h, name, tuple(info["experts"]), info["pid"], info["node_id"]) for name, h, info in found
        ]
        for name, _, _ in found:
            try:
                self._groups[name] = ray.util.get_placement_group(name)
            except ValueError:
                pass
        self._next = 1 + max(int(n[len(self.prefix) :]) for n in names)
        version = 1 + max(info.get("table_version", 0) for _, _, info in found)
        return RoutingTable(version, tuple(w.experts for w in self.workers), self.model_cfg.num_experts)

    # ---- change ----------------------------------------------------------------------------------
    def add_worker(self, expert_ids: list[int] | None = None) -> Worker:
        """Start one more pool worker (its own placement group); returns it once ready."""
        gpus = gpu_share(len(self.workers) + 1 + self.cfg.gateways)
        cpus = self._cpus_per_worker(len(self.workers) + 1, self.cfg.gateway_cpus)
        name = self._new_name()
        group = self._group([self._bundle(cpus, gpus)], "PACK", name)
        self._groups[name] = group
        self._wait([group.ready()], "a placement group for a new pool")
        handle = self._spawn(name, group, 0, list(expert_ids or []), cpus, gpus)
        info = self._wait([handle.info.remote()], "a new pool to start")[0]
        worker = Worker(handle, name, tuple(expert_ids or []), info["pid"], info["node_id"])
        self.workers.append(worker)
        return worker

    def remove_worker(self, worker: Worker) -> None:
        """Stop a worker that no routing table uses any more, and free its placement group."""
        self.workers = [w for w in self.workers if w.name != worker.name]
        ray.kill(worker.handle, no_restart=True)
        group = self._groups.pop(worker.name, None)
        if group is not None and group not in self._groups.values():
            remove_placement_group(group)

    def shutdown(self) -> None:
        """Kill every pool and placement group of this set; stop the cluster if this started it."""
        for w in self.workers:
            ray.kill(w.handle, no_restart=True)
        for group in {id(g): g for g in self._groups.values()}.values():
            remove_placement_group(group)
        self.workers, self._groups = [], {}
        if self.started_cluster:
            ray.shutdown()
            self.started_cluster = False

    # ---- helpers -----------------------------------------------------------------------------------
    def _bundle(self, cpus: float, gpus: float) -> dict:
        return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **self.cfg.pool_resources}

    def _group(self, bundles: list[dict], strategy: str, name: str):
        return placement_group(bundles, strategy=strategy, name=name, lifetime="detached")

    def _spawn(self, name: str, group, bundle: int, expert_ids: list[int], cpus: float, gpus: float):
        """One pool worker in a placement group's bundle: named, detached (it outlives whoever started
        it), restarted by Ray up to `pool_max_restarts` times."""
        cfg = self.cfg
        return ExpertPoolActor.options(
            name=name,
            namespace=NAMESPACE,
            lifetime="detached",
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle),
            num_cpus=cpus,
            num_gpus=gpus,
            max_restarts=cfg.pool_max_restarts,
            resources={k: v for k, v in cfg.pool_resources.items()},
        ).remote(
            cfg.model_dir,
            expert_ids,
            cfg.dtype,
            "cuda" if gpus else "cpu",
            num_threads=cfg.pool_threads,
            max_tokens_per_request=self.max_tokens_per_step(),
            batch_invariant=cfg.limits.batch_invariant,
        )

    def max_tokens_per_step(self) -> int:
        """The most tokens a gateway's step can send a pool: its step budget (decodes and prompt
        chunks together); the pools' data plane refuses more."""
        return self.cfg.limits.max_num_batched_tokens

    @staticmethod
    def _cpus_per_worker(workers: int, gateway_cpus: float = 1.0) -> float:
        """A whole CPU per pool worker when the cluster has them; on a small cluster (`serve run` on a
        2-core box) a share of what is left after a gateway's CPUs, so every pool still fits."""
        total = ray.cluster_resources().get("CPU", 1.0)
        if total >= workers + gateway_cpus:
            return 1.0
        return max(0.01, round((total - gateway_cpus) / workers, 2))

    def _wait(self, refs: list, what: str) -> list:
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.cfg.start_timeout_s)
        if pending:
            raise DeploymentError(
                f"timed out after {self.cfg.start_timeout_s:.0f}s waiting for {what} "
                f"({len(pending)} of {len(refs)} not ready)"
            )
        return ray.get(refs)
