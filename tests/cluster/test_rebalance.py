"""Rebalancing by the controller on a real Ray cluster, from the load a gateway reports: measured
balance against the no-replication baseline of the same run, and an online rebalance in the middle
of generations that changes none of their tokens."""

from __future__ import annotations

import asyncio

import pytest
import ray
import torch

from cluster.controller import ControlConfig
from cluster.gateway_host import report_loop
from gateway.engine import local_engine
from gateway.sampling import SamplingParams
from gateway.service import Gateway
from gateway.servicer import ServingState
from model.checkpoint import write_random_checkpoint
from model.config import preset
from router.load import window, worker_balance

pytestmark = [pytest.mark.ray, pytest.mark.slow]


async def generate_all(gw: Gateway, prompts: list[list[int]], n: int, tag: str) -> list[list[int]]:
    params = SamplingParams(max_tokens=n, ignore_eod=True)
    runs = await asyncio.gather(*(gw.generate(f"{tag}{i}", p, params) for i, p in enumerate(prompts)))
    return [[e.token_id for e in events if e.token_id >= 0] for events in runs]


def reporting(gw: Gateway, controller) -> asyncio.Task:
    """The gateway's report loop, as a served gateway runs it."""
    return asyncio.ensure_future(report_loop(gw, ServingState(), controller, "test-gateway", every_s=0.1))


def test_rebalancing_a_skewed_load_brings_pools_within_ten_percent(cluster_app, tmp_path):
    ckpt = write_random_checkpoint(preset("tiny"), tmp_path / "skewed", seed=3, router_skew=4.0)
    app = cluster_app(ControlConfig(slots_per_pool=12), pools=4)
    app.pools.model_dir = str(ckpt)
    gw = Gateway(app.attach().engine)
    disp, controller = gw.engine.dispatcher, app.controller
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (12,), generator=g).tolist() for _ in range(16)]
    try:

        async def main():
            reports = reporting(gw, controller)
            start, since = disp.load.snapshot(), await controller.load_snapshot.remote()
            first = await generate_all(gw, prompts, 12, "a")
            before = window(start, disp.load.snapshot())
            await asyncio.sleep(0.3)  # the last reports carry the load
            status = await controller.rebalance.remote(since)
            mid = disp.load.snapshot()
            second = await generate_all(gw, prompts, 12, "b")
            after = window(mid, disp.load.snapshot())
            reports.cancel()
            return first, second, before, after, status

        first, second, before, after, status = asyncio.run(main())
        base, balanced = worker_balance(before["worker_pairs"], 4), worker_balance(after["worker_pairs"], 4)
        assert base > 1.10, f"the workload should be skewed to begin with (max/mean {base:.2f})"
        assert balanced <= 1.10, f"after rebalancing max/mean is {balanced:.2f} (baseline {base:.2f})"
        assert status["version"] == 2 and disp.table.version == 2
        infos = ray.get([w.info.remote() for w in disp.workers])
        assert [i["experts"] for i in infos] == [list(e) for e in disp.table.workers], (
            "pools shrank to the new table"
        )
    finally:
        gw.close()


def test_rebalance_in_the_middle_of_16_generations_changes_no_token(cluster_app, fixture_dir, golden):
    ref = local_engine(str(fixture_dir))
    long = golden["cases"][5]["prompt_ids"]
    prompts = [c["prompt_ids"] for c in golden["cases"]] + [long[i * 7 : i * 7 + 5 + i] for i in range(9)]
    n = 80  # long enough that generations are still running when the new table lands (step ~15 here)
    expected = [
        ref.generate([p], SamplingParams(max_tokens=n, ignore_eod=True))[0].output_ids for p in prompts
    ]
    app = cluster_app(ControlConfig(slots_per_pool=10), pools=4)
    gw = Gateway(app.attach().engine)
    try:

        async def main():
            reports = reporting(gw, app.controller)
            task = asyncio.ensure_future(generate_all(gw, prompts, n, "r"))
            while gw.engine.steps < 6:  # well into decoding, and load reported
                await asyncio.sleep(0.005)
            status = asyncio.ensure_future(app.controller.rebalance.remote())
            while gw.engine.dispatcher.table.version < 2 and not task.done():
                await asyncio.sleep(0.002)
            steps_at_switch = gw.engine.steps
            tokens, status = await task, await status
            reports.cancel()
            return tokens, status, steps_at_switch

        tokens, status, at = asyncio.run(main())
        assert at < gw.engine.steps, "the switch happened while generations were still running"
        assert tokens == expected
        table = gw.engine.dispatcher.table
        assert status["version"] == table.version == 2 and any(len(table.replicas(e)) > 1 for e in range(32))
    finally:
        gw.close()
