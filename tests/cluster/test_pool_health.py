"""Pool health on a real Ray cluster, with gateways attached to a controller in this process: a pool
stopped with SIGSTOP (hung, not dead), with and without a replica of its experts; a pool killed; the
controller killed. Processes are stopped and killed by pid."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from procnet import listening

from cluster.controller import ControlConfig
from cluster.gateway_host import attach_backend, report_loop
from gateway.engine import local_engine
from gateway.sampling import SamplingParams
from gateway.server import GatewayServer, ServerOptions
from gateway.service import Gateway
from gateway.servicer import ServingState

pytestmark = [pytest.mark.ray, pytest.mark.slow]
FAST = ControlConfig(probe_every_s=0.2, probe_timeout_s=0.5, replace_after_s=600)


def prompts_of(golden: dict, n: int) -> list[list[int]]:
    long = golden["cases"][5]["prompt_ids"]
    pieces = [long[i * 3 : i * 3 + 3 + i % 7] for i in range(n)]
    return ([c["prompt_ids"] for c in golden["cases"]] + pieces)[:n]


def expected_of(fixture_dir, prompts: list[list[int]], n: int) -> list[list[int]]:
    ref = local_engine(str(fixture_dir))
    return [s.output_ids for s in ref.generate(prompts, SamplingParams(max_tokens=n, ignore_eod=True))]


def wait_for(what, check, timeout_s: float = 30.0, every_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"timed out waiting for {what}"
            return value
        time.sleep(every_s)


def worker_status(app, name: str | None = None) -> dict:
    status = ray.get(app.controller.status.remote())
    return status if name is None else next(w for w in status["workers"] if w["name"] == name)


def test_a_hung_pool_with_a_replica_stalls_no_step_past_its_deadline(cluster_app, fixture_dir, golden):
    n, streams = 40, 32
    prompts = prompts_of(golden, streams)
    expected = expected_of(fixture_dir, prompts, n)
    app = cluster_app(FAST, pools=2, replicas=2)
    gw = Gateway(app.attach().engine)
    disp = gw.engine.dispatcher
    victim = ray.get(disp.workers[0].info.remote())
    stopped_at: list[float] = []
    try:

        async def main():
            reports = asyncio.ensure_future(report_loop(gw, ServingState(), app.controller, "g", every_s=0.1))
            params = SamplingParams(max_tokens=n, ignore_eod=True)
            runs = [asyncio.ensure_future(gw.generate(f"s{i}", p, params)) for i, p in enumerate(prompts)]
            while gw.engine.steps < 12:
                await asyncio.sleep(0.002)
            os.kill(victim["pid"], signal.SIGSTOP)
            stopped_at.append(time.perf_counter())
            results = await asyncio.gather(*runs)
            reports.cancel()
            return results

        results = asyncio.run(main())
        assert [[e.token_id for e in r if e.token_id >= 0] for r in results] == expected
        times = sorted({e.at for r in results for e in r})
        gaps = [b - a for a, b in zip(times, times[1:]) if b > stopped_at[0]]
        print(
            f"longest step after SIGSTOP: {max(gaps):.3f}s; deadline then "
            f"{disp.deadline(0).seconds(8):.3f}s; timeouts {disp.timeouts}"
        )
        assert disp.timeouts >= 1, "the stopped pool missed its deadline"
        assert max(gaps) < 3.0, f"a step stalled {max(gaps):.2f}s (not bounded by the reply deadline)"
        wait_for(
            "the controller to mark the pool unhealthy",
            lambda: not worker_status(app, victim_name(app, victim["pid"]))["healthy"],
        )
    finally:
        os.kill(victim["pid"], signal.SIGCONT)
        gw.close()
    wait_for(
        "the pool to be healthy again after SIGCONT",
        lambda: worker_status(app, victim_name(app, victim["pid"]))["healthy"],
    )


def victim_name(app, pid: int) -> str:
    return next(w["name"] for w in worker_status(app)["workers"] if w["pid"] == pid)


def test_a_hung_pool_without_a_replica_is_not_serving_until_it_resumes(cluster_app, fixture_dir, golden):
    app = cluster_app(FAST, pools=2, replicas=1)
    server = GatewayServer(lambda: attach_backend(app.name, app.pools, app.control), ServerOptions(port=0))
    port = server.start()
    server.wait_ready(120)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    state = lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status  # noqa: E731
    serving = health_pb2.HealthCheckResponse.SERVING
    victim = worker_status(app)["workers"][1]
    try:
        wait_for("SERVING", lambda: state() == serving)
        os.kill(victim["pid"], signal.SIGSTOP)
        wait_for("NOT_SERVING while experts have no live holder", lambda: state() != serving)
        status = worker_status(app)
        assert status["uncovered"] == victim["experts"]
    finally:
        os.kill(victim["pid"], signal.SIGCONT)
    try:
        wait_for("SERVING again after SIGCONT", lambda: state() == serving)
        assert worker_status(app)["uncovered"] == []
    finally:
        server.stop(grace_s=0)


def test_a_killed_pool_comes_back_with_its_data_plane_and_no_request_fails(cluster_app, fixture_dir, golden):
    n = 40
    prompts = prompts_of(golden, 16)
    expected = expected_of(fixture_dir, prompts, n)
    app = cluster_app(FAST, pools=2, replicas=1)
    gateways = [Gateway(app.attach().engine) for _ in range(2)]
    before = worker_status(app)["workers"]
    pids = {w["pid"] for w in before}
    listeners = len(listening(pids))
    victim = before[0]
    try:

        async def main():
            reports = [
                asyncio.ensure_future(report_loop(gw, ServingState(), app.controller, f"g{i}", every_s=0.1))
                for i, gw in enumerate(gateways)
            ]
            params = SamplingParams(max_tokens=n, ignore_eod=True)
            runs = [
                asyncio.ensure_future(gw.generate(f"k{i}", p, params))
                for gw in gateways
                for i, p in enumerate(prompts)
            ]
            while gateways[0].engine.steps < 8:
                await asyncio.sleep(0.002)
            os.kill(victim["pid"], signal.SIGKILL)
            results = await asyncio.gather(*runs)
            deadline = time.monotonic() + 60  # every gateway takes the table with the restarted pool
            while time.monotonic() < deadline:
                status = await app.controller.status.remote()
                if all(gw.engine.dispatcher.table.version == status["version"] for gw in gateways) and all(
                    w["pid"] != victim["pid"] for w in status["workers"]
                ):
                    break
                await asyncio.sleep(0.1)
            for r in reports:
                r.cancel()
            return results, status

        results, status = asyncio.run(main())
        assert [[e.token_id for e in r if e.token_id >= 0] for r in results] == expected + expected
        new_pids = {w["pid"] for w in status["workers"]}
        assert victim["pid"] not in new_pids and len(new_pids) == 2
        assert len(listening(new_pids)) == listeners, "as many data-plane listeners as before"
        for gw in gateways:
            disp = gw.engine.dispatcher
            assert len(disp._channels) == 2 * len(disp.workers), "every gateway reconnected its data plane"
    finally:
        for gw in gateways:
            gw.close()


def test_a_killed_controller_costs_no_pool_and_comes_back(cluster_app, fixture_dir, golden):
    app = cluster_app(FAST, pools=2, replicas=1)
    gw = Gateway(app.attach().engine)
    cases = golden["cases"][:4]
    before = worker_status(app)
    try:

        async def main():
            reports = asyncio.ensure_future(report_loop(gw, ServingState(), app.controller, "g", every_s=0.1))
            params = SamplingParams(max_tokens=16, ignore_eod=True)
            await asyncio.sleep(0.3)
            pid = await app.controller.pid.remote()
            os.kill(pid, signal.SIGKILL)
            t_kill = time.monotonic()
            served = await asyncio.gather(
                *[gw.generate(f"c{i}", c["prompt_ids"], params) for i, c in enumerate(cases)]
            )
            deadline = time.monotonic() + 60  # Ray restarts it; it adopts the pools
            while time.monotonic() < deadline:
                try:
                    status = await asyncio.wait_for(app.controller.status.remote(), 2)
                    if status["gateways"] and status["version"] > before["version"]:
                        break
                except Exception:  # noqa: BLE001
                    pass
                await asyncio.sleep(0.2)
            print(f"controller back with the pools adopted {time.monotonic() - t_kill:.1f}s after SIGKILL")
            assert await app.controller.pid.remote() != pid
            moved = await app.controller.rebalance.remote()
            again = await asyncio.gather(
                *[gw.generate(f"d{i}", c["prompt_ids"], params) for i, c in enumerate(cases)]
            )
            reports.cancel()
            return served, status, moved, again

        served, status, moved, again = asyncio.run(main())
        for run in (served, again):
            assert [[e.token_id for e in r if e.token_id >= 0] for r in run] == [
                c["generated_ids"] for c in cases
            ]
        assert [w["pid"] for w in status["workers"]] == [w["pid"] for w in before["workers"]], (
            "no pool restarted"
        )
        assert moved["version"] == status["version"] + 1 == gw.engine.dispatcher.table.version
    finally:
        gw.close()
