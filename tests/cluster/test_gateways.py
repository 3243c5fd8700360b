"""Many gateways through Ray Serve (deploy.yaml's application with `gateways: 2`), sharing one
controller and 4 pools x 2 replicas, on one gRPC port: golden requests on separate connections are
token-exact and both gateways serve them; a gateway killed by pid mid-stream ends only its own
streams, comes back and serves, and no pool process was restarted; rebalancing and resizing the
pools while both gateways serve fail nothing."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
from procnet import free_port
import ray

from cluster.controller import controller_name, stop_controller
from cluster.pools import NAMESPACE
from cluster.serve_app import build_app
from protos import serving_pb2 as pb
from protos import serving_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.ray, pytest.mark.slow]
APP = "gateways-test"


@pytest.fixture(scope="module")
def served(ray_cluster, fixture_dir):
    from ray import serve

    port = free_port()
    serve.start(proxy_location="Disabled")
    serve.run(
        build_app(
            {
                "model": str(fixture_dir),
                "pools": 4,
                "replicas": 2,
                "gateways": 2,
                "port": port,
                "grace_s": 1,
                "http_port": 0,
            }
        ),
        name=APP,
        route_prefix=None,
    )
    controller = ray.get_actor(controller_name(APP), namespace=NAMESPACE)
    deadline = time.monotonic() + 120
    while len(ray.get(controller.status.remote())["gateways"]) < 2:
        assert time.monotonic() < deadline, "both gateways report to the controller"
        time.sleep(0.2)
    yield f"127.0.0.1:{port}", controller
    serve.delete(APP)
    stop_controller(APP)


def connection(target: str) -> grpc.Channel:
    """A channel with its own TCP connection (not shared through grpc's global subchannel pool), so
    the kernel picks a gateway for it."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def served_by(call) -> str | None:
    return dict(call.trailing_metadata() or ()).get("yuan-gateway")


def test_golden_requests_on_separate_connections_are_exact_and_both_gateways_serve(served, golden):
    target, controller = served
    seen, results, lock = set(), [], threading.Lock()

    def one(i: int) -> None:
        case = golden["cases"][i % len(golden["cases"])]
        try:
            with connection(target) as ch:
                res, call = pb_grpc.YuanServingStub(ch).Generate.with_call(
                    pb.GenerateRequest(token_ids=case["prompt_ids"], max_tokens=16, ignore_eod=True),
                    timeout=120,
                )
            got = list(res.token_ids)
        except grpc.RpcError as e:
            got, call = f"{e.code()}: {e.details()}", e
        with lock:
            results.append((got, case["generated_ids"]))
            seen.add(served_by(call))

    for wave in range(4):  # 16 concurrent connections a wave, until both gateways have served
        threads = [threading.Thread(target=one, args=(16 * wave + i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        if len(seen) == 2:
            break
    wrong = [got for got, want in results if got != want]
    assert not wrong and len(results) >= 16, wrong[:4]
    assert seen == set(ray.get(controller.status.remote())["gateways"]), f"both gateways served: {seen}"
    with connection(target) as ch:
        info = pb_grpc.YuanServingStub(ch).ModelInfo(pb.ModelInfoRequest())
        # Other gateways' rows are their last report to the controller (every 0.25 s): wait, with a
        # deadline, until the last admissions have been reported.
        deadline = time.monotonic() + 10
        while True:
            stats = pb_grpc.YuanServingStub(ch).Stats(pb.StatsRequest())
            if sum(g.admitted for g in stats.gateways) >= len(results) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert {g.gateway for g in info.gateways} == seen and info.gateway in seen
    assert {g.gateway for g in stats.gateways} == seen and sum(g.admitted for g in stats.gateways) >= len(
        results
    )


def gateway_pids(count: int) -> dict[str, int]:
    """Gateway id -> pid of each replica (a handle call reaches one replica: ask until all answered)."""
    from ray import serve

    handle = serve.get_deployment_handle("GatewayDeployment", app_name=APP)
    found: dict[str, int] = {}
    for _ in range(200):
        status = handle.status.remote().result(timeout_s=10)
        if status["serving"]:
            found[status["gateway"]] = status["pid"]
        if len(found) >= count:
            return found
    raise AssertionError(f"found only {found}")


def test_a_killed_gateway_ends_only_its_streams_and_comes_back_without_touching_a_pool(served, golden):
    target, controller = served
    pools_before = {w["name"]: w["pid"] for w in ray.get(controller.status.remote())["workers"]}
    pids = gateway_pids(2)
    channels = {}
    for _ in range(64):  # a connection to each gateway
        ch = connection(target)
        _, call = pb_grpc.YuanServingStub(ch).Tokenize.with_call(pb.TokenizeRequest(text="a"), timeout=30)
        gid = served_by(call)
        if gid in channels:
            ch.close()
        else:
            channels[gid] = ch
        if len(channels) == 2:
            break
    victim, survivor = list(channels)
    long = pb.GenerateRequest(token_ids=[5, 6, 7], max_tokens=400, ignore_eod=True)
    doomed = [pb_grpc.YuanServingStub(channels[victim]).GenerateStream(long, timeout=120) for _ in range(4)]
    case = golden["cases"][3]
    exact = [
        pb_grpc.YuanServingStub(channels[survivor]).GenerateStream(
            pb.GenerateRequest(token_ids=case["prompt_ids"], max_tokens=16, ignore_eod=True), timeout=120
        )
        for _ in range(4)
    ]
    for stream in doomed:
        next(stream)
    firsts = [next(s) for s in exact]
    os.kill(pids[victim], signal.SIGKILL)
    for stream in doomed:
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    for first, stream in zip(firsts, exact):
        assert [first.token_id] + [m.token_id for m in stream] == case["generated_ids"]
    t0 = time.monotonic()
    deadline = t0 + 120  # Serve starts a new replica, which attaches to the controller
    while True:
        gateways = set(ray.get(controller.status.remote())["gateways"])
        if len(gateways - {victim}) == 2:
            break
        assert time.monotonic() < deadline, "the killed gateway came back"
        time.sleep(0.2)
    print(f"gateway back and reporting {time.monotonic() - t0:.1f}s after SIGKILL (pools kept)")
    new = (gateways - {victim, survivor}).pop()
    for _ in range(64):  # the new gateway serves
        with connection(target) as ch:
            res, call = pb_grpc.YuanServingStub(ch).Generate.with_call(
                pb.GenerateRequest(token_ids=case["prompt_ids"], max_tokens=16, ignore_eod=True), timeout=120
            )
        assert list(res.token_ids) == case["generated_ids"]
        if served_by(call) == new:
            break
    else:
        raise AssertionError("no connection reached the new gateway")
    for ch in channels.values():
        ch.close()
    assert {w["name"]: w["pid"] for w in ray.get(controller.status.remote())["workers"]} == pools_before, (
        "no pool process was restarted"
    )


def test_rebalance_and_resize_while_two_gateways_serve_fail_nothing(served, golden):
    target, controller = served
    cases = golden["cases"]
    failures, done, stop = [], [0], threading.Event()

    def client(i: int) -> None:
        with connection(target) as ch:
            stub = pb_grpc.YuanServingStub(ch)
            while not stop.is_set():
                case = cases[i % len(cases)]
                try:
                    res = stub.Generate(
                        pb.GenerateRequest(token_ids=case["prompt_ids"], max_tokens=16, ignore_eod=True),
                        timeout=120,
                    )
                    if list(res.token_ids) != case["generated_ids"]:
                        failures.append(f"client {i}: tokens differ")
                except grpc.RpcError as e:
                    failures.append(f"client {i}: {e.code()} {e.details()}")
                done[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)  # load for the controller to go by
        v0 = ray.get(controller.status.remote())["version"]
        moved = ray.get(controller.rebalance.remote(), timeout=120)
        grown = ray.get(controller.scale_to.remote(10), timeout=180)
        shrunk = ray.get(controller.scale_to.remote(8), timeout=180)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(180)
    assert not failures, failures[:5]
    assert done[0] >= 16
    assert moved["version"] > v0 and len(grown["workers"]) == 10 and len(shrunk["workers"]) == 8
    assert all(
        g["version"] == shrunk["version"] for g in ray.get(controller.status.remote())["gateways"].values()
    )
