"""Backends a `GatewayServer` can serve: the in-process reference engine, or expert pools on Ray.

Both produce the same `Engine` class; only the dispatcher differs. The Ray backend runs the
gateway in the calling process (a Serve replica, or the `up` command) and the pools as actors.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from gateway.engine import Engine, EngineLimits, local_engine
from gateway.pool_dispatcher import PoolDispatcher
from gateway.server import Backend
from gateway.tokenizer import load_tokenizer
from model.checkpoint import load_model


def _info(engine: Engine, pools: int, replicas: int, version: int, workers: list[list[int]]) -> dict:
    lim = engine.limits
    return {"config": asdict(engine.model.cfg), "pools": pools, "replicas": replicas,
            "routing_table_version": version, "workers": workers,
            "transport": getattr(engine.dispatcher, "transport", "local"),
            "limits": {"max_prompt_len": lim.max_prompt_len, "max_tokens": lim.max_tokens,
                       "max_queue": lim.max_queue, "max_running": lim.max_running}}


def local_backend(model_dir: str, limits: EngineLimits = EngineLimits(), dtype: str | None = None) -> Backend:
    engine = local_engine(model_dir, dtype, limits)
    n = engine.model.cfg.num_experts
    return Backend(engine, load_tokenizer(Path(model_dir), engine.model.cfg),
                   _info(engine, 1, 1, 0, [list(range(n))]))


def ray_backend(cfg, control=None) -> Backend:
    """Start the expert pools of a `cluster.deployment.DeploymentConfig` and a gateway engine here;
    `control` (a `cluster.controller.ControlConfig`) adds metrics, rebalancing and autoscaling."""
    from cluster.controller import control_loop
    from cluster.deployment import Deployment

    deployment = Deployment(cfg).start_pools()
    try:
        model, _ = load_model(cfg.model_dir, cfg.dtype)
        dispatcher = PoolDispatcher(deployment.table, deployment.workers, cfg.transport, model.cfg.num_layers)
        dispatcher.replace_worker = deployment.replace_worker
        engine = Engine(model, dispatcher, cfg.limits, micro_batches=cfg.micro_batches)
        info = _info(engine, cfg.pools, cfg.replicas, deployment.table.version,
                     [list(w) for w in deployment.table.workers])
        run_control = (lambda gateway: control_loop(gateway, deployment, control)) if control else None

        def close() -> None:  # the dispatcher's shared regions, then the pools
            try:
                dispatcher.close()
            finally:
                deployment.shutdown()

        return Backend(engine, load_tokenizer(Path(cfg.model_dir), model.cfg), info, close, run_control)
    except BaseException:
        deployment.shutdown()
        raise
