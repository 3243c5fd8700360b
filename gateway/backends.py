"""Backends a `GatewayServer` can serve. This module has the in-process reference engine; the
gateway that attaches to an application's controller and its expert pools is
`cluster.gateway_host.attach_backend`. Both produce the same `Engine` class; only the dispatcher
differs.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from gateway.chat import load_chat_template
from gateway.engine import Engine, EngineLimits, local_engine
from gateway.server import Backend
from gateway.tokenizer import load_tokenizer


def engine_info(engine: Engine, pools: int, replicas: int, version: int, workers: list[list[int]]) -> dict:
    lim = engine.limits
    return {
        "config": asdict(engine.model.cfg),
        "pools": pools,
        "replicas": replicas,
        "routing_table_version": version,
        "workers": workers,
        "transport": getattr(engine.dispatcher, "transport", "local"),
        "limits": {
            "max_prompt_len": lim.max_prompt_len,
            "max_tokens": lim.max_tokens,
            "max_queue": lim.max_queue,
            "max_running": lim.max_running,
        },
    }


def local_backend(model_dir: str, limits: EngineLimits = EngineLimits(), dtype: str | None = None) -> Backend:
    engine = local_engine(model_dir, dtype, limits)
    n = engine.model.cfg.num_experts
    info = engine_info(engine, 1, 1, 0, [list(range(n))]) | checkpoint_info(model_dir)
    return Backend(engine, load_tokenizer(Path(model_dir), engine.model.cfg), info)


def checkpoint_info(model_dir: str) -> dict:
    """What the front ends need of the checkpoint: the model's name and its chat template."""
    return {"model": Path(model_dir).name, "chat_template": load_chat_template(model_dir)}
