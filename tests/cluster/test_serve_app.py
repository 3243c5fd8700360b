"""deploy.yaml's application on Ray Serve, and its validated arguments."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from cluster.serve_app import AppArgs, build_app
from protos import serving_pb2 as pb
from protos import serving_pb2_grpc as pb_grpc

DEPLOY = Path(__file__).resolve().parents[2] / "deploy.yaml"


def deploy_args() -> dict:
    app = yaml.safe_load(DEPLOY.read_text())["applications"][0]
    assert app["import_path"] == "cluster.serve_app:build_app"
    return app["args"]


def test_deploy_yaml_args_validate_and_bad_ones_are_named():
    AppArgs(**deploy_args())
    with pytest.raises(ValidationError, match="poolz"):
        build_app({**deploy_args(), "poolz": 3})
    with pytest.raises(ValidationError, match="pools"):
        build_app({**deploy_args(), "pools": 0})
    with pytest.raises(ValidationError, match="tls_cert and tls_key"):
        build_app({**deploy_args(), "tls_cert": "/x.pem"})
    with pytest.raises(ValidationError, match="block_size"):
        build_app({**deploy_args(), "block_size": 0})


def test_engine_and_placement_args_reach_the_engine_and_the_pools():
    given = {"num_kv_blocks": 40, "pool_threads": 2, "gateway_threads": 3, "gateway_cpus": 2.5}
    args = AppArgs(
        **{**deploy_args(), **given},
    ).model_copy(update={"max_num_batched_tokens": 32, "prefix_caching": False, "batch_invariant": True})
    pc = args.pool_config()
    lim = pc.limits
    assert (lim.max_num_batched_tokens, lim.block_size, lim.num_kv_blocks) == (32, 16, 40)
    assert (lim.prefix_caching, lim.batch_invariant, lim.kv_cache_gb) == (False, True, 2.0)
    assert (pc.pool_threads, pc.gateway_threads, pc.gateways, pc.gateway_cpus) == (2, 3, 1, 2.5)


def test_the_gateway_deployment_reserves_gateway_cpus():
    """Ray gives an actor's torch as many threads as the CPUs it reserves (OMP_NUM_THREADS), so this
    is the gateway's thread count too unless gateway_threads says otherwise."""
    assert build_app(deploy_args())._bound_deployment.ray_actor_options == {"num_cpus": 1.0}
    app = build_app({**deploy_args(), "gateway_cpus": 4})
    assert app._bound_deployment.ray_actor_options == {"num_cpus": 4.0}
    with pytest.raises(ValidationError, match="gateway_cpus"):
        build_app({**deploy_args(), "gateway_cpus": 0})


@pytest.mark.ray
@pytest.mark.slow
def test_serve_runs_deploy_yaml_app(ray_cluster, fixture_dir, golden):
    from ray import serve

    from cluster.controller import stop_controller

    serve.start(proxy_location="Disabled")
    try:
        serve.run(
            build_app({**deploy_args(), "model": str(fixture_dir), "port": 0, "http_port": 0, "pools": 2}),
            name="yuan",
            route_prefix=None,
        )
        port = serve.get_app_handle("yuan").address.remote().result()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            from cli.client import wait_serving

            wait_serving(ch, 120)
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            case = golden["cases"][4]
            res = pb_grpc.YuanServingStub(ch).Generate(
                pb.GenerateRequest(token_ids=case["prompt_ids"], max_tokens=16, ignore_eod=True), timeout=60
            )
            assert list(res.token_ids) == case["generated_ids"]
    finally:
        serve.delete("yuan")
        stop_controller("yuan")


@pytest.mark.ray
def test_pools_fit_a_cluster_with_fewer_cpus_than_pools(ray_cluster):
    """`serve run deploy.yaml` on a 2-core box starts Ray with 2 CPUs: pools then take a share each."""
    from cluster.pools import PoolSet

    total = ray_cluster.cluster_resources()["CPU"]
    assert PoolSet._cpus_per_worker(int(total) - 1) == 1.0
    share = PoolSet._cpus_per_worker(int(total) * 3)
    assert 0 < share < 1 and share * int(total) * 3 <= total - 1 + 1e-9
    # a gateway that reserves more CPUs leaves the pools less
    assert PoolSet._cpus_per_worker(int(total) - 1, gateway_cpus=2) < 1.0
    wide = PoolSet._cpus_per_worker(int(total) * 3, gateway_cpus=1.5)
    assert 0 < wide < share and wide * int(total) * 3 <= total - 1.5 + 1e-9
