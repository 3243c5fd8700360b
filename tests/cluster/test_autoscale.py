"""Autoscaling on a real Ray cluster: load up -> pools added, load gone -> pools removed, and no
request fails or changes its tokens in either transition."""

from __future__ import annotations

import asyncio

import pytest
import ray

from cluster.autoscale import Autoscaler, ScalingPolicy
from cluster.deployment import Deployment, DeploymentConfig
from cluster.rebalance import Rebalancer
from gateway.engine import Engine, local_engine
from gateway.pool_dispatcher import PoolDispatcher
from gateway.sampling import SamplingParams
from gateway.service import Gateway
from model.checkpoint import load_model

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_pools_follow_load_up_and_down_without_failed_requests(ray_cluster, fixture_dir, golden):
    long = golden["cases"][5]["prompt_ids"]
    prompts = [c["prompt_ids"] for c in golden["cases"]] + [long[i * 11: i * 11 + 4 + i] for i in range(9)]
    n = 24
    ref = local_engine(str(fixture_dir))
    expected = [ref.generate([p], SamplingParams(max_tokens=n, ignore_eod=True))[0].output_ids for p in prompts]
    d = Deployment(DeploymentConfig(str(fixture_dir), pools=1, gateways=0)).start_pools()
    model, _ = load_model(str(fixture_dir))
    disp = PoolDispatcher(d.table, d.workers, num_layers=model.cfg.num_layers)
    gw = Gateway(Engine(model, disp))
    policy = ScalingPolicy(min_workers=1, max_workers=3, pairs_per_s_per_worker=1.0, up_after=1, down_after=2)
    auto = Autoscaler(d, Rebalancer(gw, slots_per_worker=16), policy)
    try:
        async def generate(tag: str):
            params = SamplingParams(max_tokens=n, ignore_eod=True)
            runs = await asyncio.gather(*(gw.generate(f"{tag}{i}", p, params) for i, p in enumerate(prompts)))
            return [[e.token_id for e in ev if e.token_id >= 0] for ev in runs]

        async def main():
            sizes = []
            load = asyncio.ensure_future(generate("up"))
            while not load.done():
                sizes.append(await auto.tick())
                await asyncio.sleep(0.1)
            up = await load
            peak = max(sizes)
            for _ in range(8):  # no load: scale back down, one step at a time
                await asyncio.sleep(0.05)
                sizes.append(await auto.tick())
            again = await generate("after")
            return up, again, peak, sizes

        up, again, peak, sizes = asyncio.run(main())
        assert up == expected and again == expected, "no request failed or changed in either transition"
        assert peak == 3, f"load should add pools up to the bound (sizes {sizes})"
        assert sizes[-1] == 1, f"no load should remove pools down to the bound (sizes {sizes})"
        assert len(d.workers) == 1 and len(disp.table.workers) == 1
        assert any(h["to"] > h["from"] for h in auto.history) and any(h["to"] < h["from"] for h in auto.history)
        alive = ray.get([w.info.remote() for w in d.workers])
        assert alive[0]["experts"] == list(range(32))
        print("scaling actions:", auto.history)
    finally:
        gw.close()
        disp.close()
        d.shutdown()
