"""Autoscaling by the controller on a real Ray cluster: load up -> pools added, load gone -> pools
removed, and no request fails or changes its tokens in either transition."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray

from cluster.autoscale import ScalingPolicy
from cluster.controller import ControlConfig
from cluster.gateway_host import report_loop
from gateway.engine import local_engine
from gateway.sampling import SamplingParams
from gateway.service import Gateway
from gateway.servicer import ServingState

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_pools_follow_load_up_and_down_without_failed_requests(cluster_app, fixture_dir, golden):
    long = golden["cases"][5]["prompt_ids"]
    prompts = [c["prompt_ids"] for c in golden["cases"]] + [long[i * 11 : i * 11 + 4 + i] for i in range(9)]
    n = 24
    ref = local_engine(str(fixture_dir))
    expected = [
        ref.generate([p], SamplingParams(max_tokens=n, ignore_eod=True))[0].output_ids for p in prompts
    ]
    policy = ScalingPolicy(min_workers=1, max_workers=3, pairs_per_s_per_worker=1.0, up_after=1, down_after=2)
    app = cluster_app(
        ControlConfig(probe_every_s=0.1, autoscale=policy, autoscale_every_s=0.3, slots_per_pool=16), pools=1
    )
    gw = Gateway(app.attach().engine)
    controller = app.controller
    try:

        async def generate(tag: str):
            params = SamplingParams(max_tokens=n, ignore_eod=True)
            runs = await asyncio.gather(*(gw.generate(f"{tag}{i}", p, params) for i, p in enumerate(prompts)))
            return [[e.token_id for e in ev if e.token_id >= 0] for ev in runs]

        async def workers() -> int:
            return len((await controller.status.remote())["workers"])

        async def main():
            reports = asyncio.ensure_future(
                report_loop(gw, ServingState(), controller, "test-gateway", every_s=0.1)
            )
            sizes = []
            while len(sizes) < 200 and (not sizes or max(sizes) < 3):  # load until the controller scaled up
                load = asyncio.ensure_future(generate(f"up{len(sizes)}"))
                while not load.done():
                    sizes.append(await workers())
                    await asyncio.sleep(0.1)
                up = await load
            peak = max(sizes)
            deadline = time.monotonic() + 60
            while await workers() > 1 and time.monotonic() < deadline:  # no load: back down, one at a time
                await asyncio.sleep(0.2)
            sizes.append(await workers())
            again = await generate("after")
            reports.cancel()
            return up, again, peak, sizes

        up, again, peak, sizes = asyncio.run(main())
        assert up == expected and again == expected, "no request failed or changed in either transition"
        assert peak == 3, f"load should add pools up to the bound (sizes {sizes})"
        assert sizes[-1] == 1, f"no load should remove pools down to the bound (sizes {sizes})"
        assert len(gw.engine.dispatcher.table.workers) == 1
        history = ray.get(controller.status.remote())["history"]
        scales = [h for h in history if h["kind"] == "scale"]
        assert any(h["to"] > h["from"] for h in scales) and any(h["to"] < h["from"] for h in scales)
        alive = ray.get([w.info.remote() for w in gw.engine.dispatcher.workers])
        assert alive[0]["experts"] == list(range(32))
    finally:
        gw.close()
