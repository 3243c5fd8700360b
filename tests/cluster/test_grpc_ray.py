"""The gRPC server over real expert pools on Ray: tokens, concurrency, cancellation, deadlines."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from conftest import settled_stats as settled

from cluster.controller import ControlConfig, stop_controller
from cluster.gateway_host import attach_backend
from cluster.pools import PoolConfig
from gateway.engine import local_engine
from gateway.sampling import SamplingParams
from gateway.server import GatewayServer, ServerOptions
from protos import serving_pb2 as pb
from protos import serving_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def attached_server(app: str, pools: PoolConfig, control: ControlConfig = ControlConfig()) -> GatewayServer:
    """A gRPC server in this process whose gateway is attached to `app`'s controller and pools."""
    srv = GatewayServer(lambda: attach_backend(app, pools, control), ServerOptions(port=0))
    srv.start()
    srv.wait_ready(180)
    return srv


@pytest.fixture(scope="module")
def server(ray_cluster, fixture_dir):
    srv = attached_server("grpc-ray", PoolConfig(str(fixture_dir), pools=4))
    yield f"127.0.0.1:{srv.port}"
    srv.stop(grace_s=0)
    stop_controller("grpc-ray")


@pytest.fixture(scope="module")
def reference(fixture_dir):
    engine = local_engine(str(fixture_dir))
    return lambda prompt, n: (
        engine.generate([prompt], SamplingParams(max_tokens=n, ignore_eod=True))[0].output_ids
    )


def test_unary_and_stream_equal_golden(server, golden):
    with grpc.insecure_channel(server) as ch:
        stub = pb_grpc.YuanServingStub(ch)
        info = stub.ModelInfo(pb.ModelInfoRequest())
        assert info.pools == 4 and len(info.workers) == 4 and info.routing_table_version == 1
        for case in golden["cases"]:
            req = pb.GenerateRequest(token_ids=case["prompt_ids"], max_tokens=16, ignore_eod=True)
            assert list(stub.Generate(req, timeout=60).token_ids) == case["generated_ids"]
            assert [m.token_id for m in stub.GenerateStream(req, timeout=60)] == case["generated_ids"]


def test_32_concurrent_streams_all_finish_right(server, golden):
    cases = [golden["cases"][i % len(golden["cases"])] for i in range(32)]

    async def main():
        async with grpc.aio.insecure_channel(server) as ch:
            stub = pb_grpc.YuanServingStub(ch)

            async def one(i, case):
                req = pb.GenerateRequest(
                    token_ids=case["prompt_ids"], max_tokens=16, ignore_eod=True, request_id=f"c32-{i}"
                )
                return [m.token_id async for m in stub.GenerateStream(req, timeout=120)]

            return await asyncio.gather(*(one(i, c) for i, c in enumerate(cases)))

    results = asyncio.run(main())
    assert results == [c["generated_ids"] for c in cases]


def test_cancel_mid_stream_frees_state_and_others_continue(server, golden, reference):
    prompts = [c["prompt_ids"] for c in golden["cases"][:4]]
    n = 120
    with grpc.insecure_channel(server) as ch:
        stub = pb_grpc.YuanServingStub(ch)
        before = settled(stub)
        streams = [
            stub.GenerateStream(pb.GenerateRequest(token_ids=p, max_tokens=n, ignore_eod=True), timeout=120)
            for p in prompts
        ]
        got = [[next(s).token_id for _ in range(3)] for s in streams]
        streams[1].cancel()
        deadline = time.monotonic() + 5
        while stub.Stats(pb.StatsRequest()).running != 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        during = stub.Stats(pb.StatsRequest())
        assert during.running == 3 and during.kv_blocks_used > 0, (
            "the cancelled stream leaves the batch at once"
        )
        for i in (0, 2, 3):
            got[i] += [m.token_id for m in streams[i]]
            assert got[i] == reference(prompts[i], n), f"stream {i} harmed by the cancellation"
        after = settled(stub)
        assert after.running == before.running == 0
        assert after.kv_blocks_used == before.kv_blocks_used == 0


def test_deadline_cancels_the_request_in_the_engine(server):
    with grpc.insecure_channel(server) as ch:
        stub = pb_grpc.YuanServingStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(
                pb.GenerateRequest(token_ids=[1, 2, 3], max_tokens=900, ignore_eod=True), timeout=0.5
            )
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stats = settled(stub)
        assert stats.running == 0 and stats.kv_blocks_used == 0


def test_stats_cli_plots_one_cell_per_layer_and_expert(server, golden, tmp_path):
    import subprocess
    import sys

    from cli.stats import fetch

    with grpc.insecure_channel(server) as ch:
        case = golden["cases"][3]
        pb_grpc.YuanServingStub(ch).Generate(
            pb.GenerateRequest(token_ids=case["prompt_ids"], max_tokens=4), timeout=60
        )
    stats = fetch(server)
    assert stats.num_layers == 3 and stats.num_experts == 32
    assert len(stats.expert_tokens) == 3 * 32 and sum(stats.expert_tokens) > 0
    assert set(stats.worker_pairs) == {0, 1, 2, 3} and stats.routing_table_version == 1
    png = tmp_path / "load.png"
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "stats", "--target", server, "--plot", str(png)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "max/mean" in out.stdout
    assert f"gateway {stats.gateway}:" in out.stdout and "all 1 gateways: running" in out.stdout

    import matplotlib.image

    assert matplotlib.image.imread(str(png)).shape[0] > 100


def test_the_controller_rebalances_from_served_load(ray_cluster, fixture_dir, golden):
    control = ControlConfig(probe_every_s=0.2, rebalance_every_s=0.5, slots_per_pool=10)
    srv = attached_server("grpc-rebalance", PoolConfig(str(fixture_dir), pools=4), control)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.YuanServingStub(ch)
            deadline = time.monotonic() + 30
            while stub.Stats(pb.StatsRequest()).routing_table_version < 2 and time.monotonic() < deadline:
                for case in golden["cases"][:3]:  # load to rebalance by; tokens stay exact throughout
                    req = pb.GenerateRequest(token_ids=case["prompt_ids"], max_tokens=16, ignore_eod=True)
                    assert list(stub.Generate(req, timeout=60).token_ids) == case["generated_ids"]
            assert stub.Stats(pb.StatsRequest()).routing_table_version >= 2, "the controller rebalanced"
            info = stub.ModelInfo(pb.ModelInfoRequest())
            assert info.routing_table_version >= 2, "ModelInfo shows the live routing table"
            assert info.pools == 4 and info.replicas >= 2
            assert any(len([w for w in info.workers if e in w.experts]) > 1 for e in range(32)), (
                "hot experts replicated"
            )
    finally:
        srv.stop(grace_s=0)
        stop_controller("grpc-rebalance")


def test_stats_report_pool_compute_time_and_queue_delay(server, golden):
    with grpc.insecure_channel(server) as ch:
        stub = pb_grpc.YuanServingStub(ch)
        before = stub.Stats(pb.StatsRequest())
        case = golden["cases"][4]
        stub.Generate(pb.GenerateRequest(token_ids=case["prompt_ids"], max_tokens=8), timeout=60)
        after = stub.Stats(pb.StatsRequest())
    assert after.admitted == before.admitted + 1 and after.queue_delay_s >= before.queue_delay_s
    assert set(after.worker_compute_s) == {0, 1, 2, 3}
    assert sum(after.worker_compute_s.values()) > sum(before.worker_compute_s.values())
