"""Pool faults on a real Ray cluster: a pool process killed by pid in the middle of 16 streams."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import ray

from cluster.controller import ControlConfig
from gateway.engine import Engine, local_engine
from gateway.pool_dispatcher import PoolDispatcher
from gateway.sampling import SamplingParams
from gateway.service import Gateway
from model.checkpoint import load_model

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.parametrize("replicas", [1, 2], ids=["restart-only-copy", "resend-to-replica"])
def test_killing_a_pool_mid_stream_loses_no_request(pool_set, fixture_dir, golden, replicas):
    long = golden["cases"][5]["prompt_ids"]
    prompts = [c["prompt_ids"] for c in golden["cases"]] + [long[i * 9 : i * 9 + 6 + i] for i in range(9)]
    n = 20
    ref = local_engine(str(fixture_dir))
    expected = [
        ref.generate([p], SamplingParams(max_tokens=n, ignore_eod=True))[0].output_ids for p in prompts
    ]
    ps = pool_set(pools=2, replicas=replicas)
    model, _ = load_model(str(fixture_dir))
    disp = PoolDispatcher(ps.table, ps.handles, num_layers=model.cfg.num_layers)
    gw = Gateway(Engine(model, disp))
    victim = ps.workers[0].pid
    try:

        async def one(i: int):
            events = [
                e async for e in gw.stream(f"f{i}", prompts[i], SamplingParams(max_tokens=n, ignore_eod=True))
            ]
            return [e.token_id for e in events if e.token_id >= 0], any(e.fault for e in events)

        async def main():
            tasks = [asyncio.ensure_future(one(i)) for i in range(16)]
            while gw.engine.steps < 4:
                await asyncio.sleep(0.005)
            os.kill(victim, signal.SIGKILL)
            return await asyncio.gather(*tasks)

        results = asyncio.run(main())
        assert [tokens for tokens, _ in results] == expected, (
            "every stream finishes with the reference tokens"
        )
        assert disp.faults >= 1
        assert any(flagged for _, flagged in results), "delayed requests are flagged"
    finally:
        gw.close()
        disp.close()


def test_a_pool_that_stays_dead_is_replaced_and_the_response_says_so(cluster_app, fixture_dir, golden):
    """No restarts left: the controller replaces the worker with a new one holding its experts, the
    gateway switches to the new table, and the gRPC response that was delayed carries the fault in its
    trailing metadata."""
    import grpc

    from cluster.gateway_host import attach_backend
    from gateway.server import GatewayServer, ServerOptions
    from protos import serving_pb2 as pb
    from protos import serving_pb2_grpc as pb_grpc

    app = cluster_app(
        ControlConfig(probe_every_s=0.2, probe_timeout_s=0.5, replace_after_s=0.5),
        pools=2,
        pool_max_restarts=0,
    )
    backends = []

    def backend():
        backends.append(attach_backend(app.name, app.pools, app.control))
        return backends[0]

    srv = GatewayServer(backend, ServerOptions(port=0))
    port = srv.start()
    try:
        srv.wait_ready(120)
        disp = backends[0].engine.dispatcher
        victim = ray.get(disp.workers[0].info.remote())["pid"]
        case = golden["cases"][5]
        ref = local_engine(str(fixture_dir)).generate(
            [case["prompt_ids"]], SamplingParams(max_tokens=60, ignore_eod=True)
        )
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = pb_grpc.YuanServingStub(ch).GenerateStream(
                pb.GenerateRequest(token_ids=case["prompt_ids"], max_tokens=60, ignore_eod=True), timeout=120
            )
            tokens = [next(call).token_id for _ in range(3)]
            os.kill(victim, signal.SIGKILL)
            tokens += [m.token_id for m in call]
            trailing = dict(call.trailing_metadata())
        assert tokens == ref[0].output_ids
        assert trailing.get("yuan-fault") == "pool-failure-recovered"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = ray.get(app.controller.status.remote())
            if (
                any(h["kind"] == "replace" for h in status["history"])
                and disp.table.version == status["version"]
            ):
                break
            time.sleep(0.2)
        assert [h["kind"] for h in status["history"]] == ["replace"]
        assert ray.get(disp.workers[0].info.remote())["pid"] != victim
        assert len(disp._channels) == 2 * len(disp.workers), (
            "the gateway reaches the new worker by its data plane"
        )
    finally:
        srv.stop(grace_s=0)
