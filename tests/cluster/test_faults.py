"""Pool faults on a real Ray cluster: a pool process killed by pid in the middle of 16 streams."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from cluster.deployment import Deployment, DeploymentConfig
from gateway.engine import Engine, local_engine
from gateway.pool_dispatcher import PoolDispatcher
from gateway.sampling import SamplingParams
from gateway.service import Gateway
from model.checkpoint import load_model

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.parametrize("replicas", [1, 2], ids=["restart-only-copy", "resend-to-replica"])
def test_killing_a_pool_mid_stream_loses_no_request(ray_cluster, fixture_dir, golden, replicas):
    long = golden["cases"][5]["prompt_ids"]
    prompts = [c["prompt_ids"] for c in golden["cases"]] + [long[i * 9: i * 9 + 6 + i] for i in range(9)]
    n = 20
    ref = local_engine(str(fixture_dir))
    expected = [ref.generate([p], SamplingParams(max_tokens=n, ignore_eod=True))[0].output_ids for p in prompts]
    d = Deployment(DeploymentConfig(str(fixture_dir), pools=2, replicas=replicas, gateways=0)).start_pools()
    model, _ = load_model(str(fixture_dir))
    disp = PoolDispatcher(d.table, d.workers, num_layers=model.cfg.num_layers)
    gw = Gateway(Engine(model, disp))
    victim = d.pool_info[0]["pid"]
    try:
        async def one(i: int):
            events = [e async for e in gw.stream(f"f{i}", prompts[i], SamplingParams(max_tokens=n, ignore_eod=True))]
            return [e.token_id for e in events if e.token_id >= 0], any(e.fault for e in events)

        async def main():
            tasks = [asyncio.ensure_future(one(i)) for i in range(16)]
            while gw.engine.steps < 4:
                await asyncio.sleep(0.005)
            os.kill(victim, signal.SIGKILL)
            return await asyncio.gather(*tasks)

        results = asyncio.run(main())
        assert [tokens for tokens, _ in results] == expected, "every stream finishes with the reference tokens"
        assert disp.faults >= 1
        assert any(flagged for _, flagged in results), "delayed requests are flagged"
    finally:
        gw.close()
        disp.close()
        d.shutdown()
