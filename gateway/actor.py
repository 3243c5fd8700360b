"""Ray shell over `Gateway`: holds the non-expert model, reaches expert pools through `PoolDispatcher`.

Several gateway actors may share the same pools (data-parallel attention). Requests arrive as
plain types (ids, a dict of sampling fields) so any client, the gRPC server included, can call it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict

import ray
import torch

from cluster.placement import RoutingTable
from gateway.engine import Engine, EngineLimits
from gateway.pool_dispatcher import PoolDispatcher
from gateway.sampling import SamplingParams
from gateway.service import Gateway
from model.checkpoint import load_model


@ray.remote
class GatewayActor:
    def __init__(self, model_dir: str, table: RoutingTable, workers: list, limits: EngineLimits,
                 dtype: str | None = None, transport: str = "dataplane", micro_batches: int = 1) -> None:
        torch.set_num_threads(1)
        model, _ = load_model(model_dir, dtype)  # no expert weights here
        self.dispatcher = PoolDispatcher(table, workers, transport, model.cfg.num_layers)
        self.gateway = Gateway(Engine(model, self.dispatcher, limits, micro_batches=micro_batches))
        self.params_held = sum(p.numel() for p in model.parameters())

    async def ready(self) -> dict:
        return {"params_held": self.params_held, "routing_table_version": self.dispatcher.table.version}

    async def generate(self, request_id: str, prompt_ids: list[int], params: dict) -> dict:
        """Run to completion; raises `InvalidRequest`/`QueueFull` for a bad or refused request."""
        events = await self.gateway.generate(request_id, prompt_ids, SamplingParams(**params))
        last = events[-1]
        return {"token_ids": [e.token_id for e in events if e.token_id >= 0],
                "finish_reason": last.finish_reason, "error": last.error}

    async def generate_stream(self, request_id: str, prompt_ids: list[int], params: dict) -> AsyncIterator[dict]:
        async for event in self.gateway.stream(request_id, prompt_ids, SamplingParams(**params)):
            yield asdict(event)

    async def cancel(self, request_id: str) -> None:
        self.gateway.cancel(request_id)

    async def stats(self) -> dict:
        return self.gateway.stats()

    def close(self) -> None:
        """Free what this process made outside itself (the dispatcher's shared regions)."""
        self.gateway.close()
        self.dispatcher.close()
