"""Gateway + expert pools on a real local Ray cluster against the reference and the golden tokens."""

from __future__ import annotations

import asyncio

import pytest
import ray

from cluster.deployment import Deployment, DeploymentConfig
from gateway.engine import local_engine
from gateway.errors import InvalidRequest
from gateway.sampling import SamplingParams
from model.checkpoint import hf_tensor_shapes
from model.config import YuanConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]
GREEDY16 = {"max_tokens": 16, "ignore_eod": True}


@pytest.fixture
def deploy(ray_cluster, fixture_dir):
    """Start a deployment on the shared cluster and always tear it down."""
    started = []

    def _deploy(**kwargs) -> Deployment:
        d = Deployment(DeploymentConfig(str(fixture_dir), **kwargs)).start()
        started.append(d)
        return d

    yield _deploy
    for d in started:
        d.shutdown()


@pytest.mark.parametrize("pools, replicas", [(1, 1), (2, 1), (4, 1), (8, 1), (4, 2)])
def test_tokens_equal_golden_and_pools_hold_only_their_share(deploy, fixture_dir, golden, pools, replicas):
    d = deploy(pools=pools, replicas=replicas)
    gw = d.gateways[0]
    results = ray.get([gw.generate.remote(f"c{c['index']}", c["prompt_ids"], GREEDY16) for c in golden["cases"]])
    for res, case in zip(results, golden["cases"]):
        assert res["token_ids"] == case["generated_ids"], f"case {case['index']} with {pools}x{replicas} pools"

    cfg = YuanConfig.from_file(fixture_dir / "config.json")
    shapes = hf_tensor_shapes(cfg)
    per_expert_layer = 4 * (2 * cfg.ffn_hidden_size * cfg.hidden_size + cfg.hidden_size * cfg.ffn_hidden_size)
    for info, experts in zip(d.pool_info, d.table.workers):
        assert info["experts"] == list(experts)
        assert info["bytes"] == len(experts) * cfg.num_layers * per_expert_layer
        assert info["tensors_read"] == 2 * cfg.num_layers * len(experts)
    non_expert = sum(p for n, s in shapes.items() if ".experts." not in n for p in [_numel(s)])
    assert ray.get(gw.ready.remote())["params_held"] == non_expert, "the gateway must hold no expert weights"
    sent = ray.get(gw.stats.remote())["tokens_sent"]
    assert set(sent) == set(range(pools * replicas)), "every worker (each replica too) gets work"


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _prompts(golden: dict) -> list[list[int]]:
    """16 prompts of different lengths: the golden ones and pieces of the long one."""
    long = golden["cases"][5]["prompt_ids"]
    pieces = [long[i * 13: i * 13 + n] for i, n in enumerate([4, 9, 17, 25, 40, 5, 60, 12, 80])]
    return [c["prompt_ids"] for c in golden["cases"]] + pieces


def test_staggered_streams_get_the_tokens_they_get_alone(deploy, fixture_dir, golden):
    prompts = _prompts(golden)
    lengths = [4 + (i * 5) % 13 for i in range(16)]
    ref = local_engine(str(fixture_dir))
    alone = [ref.generate([p], SamplingParams(max_tokens=n, ignore_eod=True))[0].output_ids
             for p, n in zip(prompts, lengths)]
    gw = deploy(pools=4).gateways[0]

    async def one(i: int) -> list[int]:
        await asyncio.sleep(0.03 * i)  # arrive while others are decoding
        tokens = []
        async for ref_ in gw.generate_stream.remote(f"s{i}", prompts[i], {"max_tokens": lengths[i], "ignore_eod": True}):
            event = await ref_
            if event["token_id"] >= 0:
                tokens.append(event["token_id"])
        return tokens

    async def main():
        return await asyncio.gather(*(one(i) for i in range(16)))

    streamed = asyncio.run(main())
    assert streamed == alone
    stats = ray.get(gw.stats.remote())
    assert stats["running"] == 0 and stats["cache_slots_used"] == 0 and stats["streams"] == 0


def test_bad_request_fails_alone_and_the_batch_finishes(deploy, golden):
    gw = deploy(pools=2).gateways[0]
    good = [gw.generate.remote(f"g{c['index']}", c["prompt_ids"], GREEDY16) for c in golden["cases"][:3]]
    with pytest.raises(InvalidRequest) as err:
        ray.get(gw.generate.remote("bad", [1, 2, 3], {"max_tokens": 4, "top_p": 2.0}))
    assert err.value.field == "top_p"
    with pytest.raises(InvalidRequest) as err:
        ray.get(gw.generate.remote("bad2", [], {"max_tokens": 4}))
    assert err.value.field == "prompt"
    for res, case in zip(ray.get(good), golden["cases"][:3]):
        assert res["token_ids"] == case["generated_ids"] and res["error"] is None


def test_two_gateways_share_the_same_pools(deploy, golden):
    d = deploy(pools=2, gateways=2)
    a, b = d.gateways
    cases = golden["cases"][:4]
    ra = [a.generate.remote(f"a{c['index']}", c["prompt_ids"], GREEDY16) for c in cases]
    rb = [b.generate.remote(f"b{c['index']}", c["prompt_ids"], GREEDY16) for c in cases]
    for res, case in zip(ray.get(ra) + ray.get(rb), cases + cases):
        assert res["token_ids"] == case["generated_ids"]


@pytest.mark.parametrize("transport, micro_batches", [("ray", 1), ("dataplane", 1), ("ray", 2), ("dataplane", 2)])
def test_each_transport_is_token_exact(ray_cluster, fixture_dir, golden, transport, micro_batches):
    from gateway.engine import Engine
    from gateway.pool_dispatcher import PoolDispatcher
    from model.checkpoint import load_model

    d = Deployment(DeploymentConfig(str(fixture_dir), pools=2, gateways=0)).start_pools()
    try:
        model, _ = load_model(str(fixture_dir))
        disp = PoolDispatcher(d.table, d.workers, transport, model.cfg.num_layers)
        seqs = Engine(model, disp, micro_batches=micro_batches).generate([c["prompt_ids"] for c in golden["cases"]],
                                            SamplingParams(max_tokens=16, ignore_eod=True))
        assert [s.output_ids for s in seqs] == [c["generated_ids"] for c in golden["cases"]]
        assert disp.fallbacks == 0
        disp.close()
    finally:
        d.shutdown()


def test_a_broken_data_plane_falls_back_to_ray_calls(ray_cluster, fixture_dir, golden):
    from gateway.engine import Engine
    from gateway.pool_dispatcher import PoolDispatcher
    from model.checkpoint import load_model

    d = Deployment(DeploymentConfig(str(fixture_dir), pools=2, gateways=0)).start_pools()
    try:
        model, _ = load_model(str(fixture_dir))
        disp = PoolDispatcher(d.table, d.workers, "dataplane", model.cfg.num_layers)
        engine = Engine(model, disp)
        case = golden["cases"][4]
        seq = engine.add("a", case["prompt_ids"], SamplingParams(max_tokens=16, ignore_eod=True))
        for _ in range(5):
            engine.step()
        disp._channels[(0, 0)].sock.close()  # the socket dies mid-generation
        while not seq.finished:
            engine.step()
        assert seq.output_ids == case["generated_ids"]
        assert disp.fallbacks >= 1 and (0, 0) not in disp._channels
        disp.close()
    finally:
        d.shutdown()


def test_compiled_graph_transport_is_token_exact(ray_cluster, fixture_dir, golden):
    from gateway.compiled_dispatcher import CompiledGraphDispatcher
    from gateway.engine import Engine
    from model.checkpoint import load_model

    d = Deployment(DeploymentConfig(str(fixture_dir), pools=2, gateways=0)).start_pools()
    disp = None
    try:
        model, _ = load_model(str(fixture_dir))
        disp = CompiledGraphDispatcher(d.table, d.workers)
        cases = golden["cases"][:4]
        seqs = Engine(model, disp).generate([c["prompt_ids"] for c in cases], SamplingParams(max_tokens=16, ignore_eod=True))
        assert [s.output_ids for s in seqs] == [c["generated_ids"] for c in cases]
    finally:
        if disp is not None:
            disp.close()  # tears the graph down: its idle actors spin until then
        d.shutdown()
