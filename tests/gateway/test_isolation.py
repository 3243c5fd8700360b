"""One request never hurts another: a poison pill of sampling values, random sampling parameters
beside golden greedy streams, a row that cannot be sampled, and a forward that raises. Each failure
ends its own request only; the rest finish token-exact and the engine keeps serving."""

from __future__ import annotations

import random
import threading

import grpc
import pytest
import torch

from gateway.backends import local_backend
from gateway.engine import Engine, EngineLimits, local_engine
from gateway.sampling import GREEDY_BELOW, SampleError, SamplingParams, sample
from gateway.server import GatewayServer, ServerOptions
from protos import serving_pb2 as pb
from protos import serving_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def stub(fixture_dir):
    server = GatewayServer(
        lambda: local_backend(str(fixture_dir), EngineLimits(max_tokens=64)), ServerOptions(port=0)
    )
    port = server.start()
    server.wait_ready(60)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield pb_grpc.YuanServingStub(channel)
    channel.close()
    server.stop(grace_s=0)


def golden_request(case) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=case["prompt_ids"], max_tokens=16, ignore_eod=True)


def test_poison_pill_temperature_is_greedy_and_hurts_nobody(stub, golden):
    cases = golden["cases"][:6]
    streams = [stub.GenerateStream(golden_request(c), timeout=60) for c in cases]
    firsts = [next(s) for s in streams]  # all six are running
    pill = stub.Generate(
        pb.GenerateRequest(
            token_ids=cases[0]["prompt_ids"], max_tokens=16, ignore_eod=True, temperature=1e-40
        ),
        timeout=60,
    )
    assert list(pill.token_ids) == cases[0]["generated_ids"], "a temperature below the floor is greedy"
    for case, first, rest in zip(cases, firsts, streams):
        ids = [first.token_id] + [m.token_id for m in rest]
        assert ids == case["generated_ids"]


def random_params(rng: random.Random) -> dict:
    """Anything validation accepts, extremes included."""
    return {
        "temperature": rng.choice(
            [
                0.0,
                1e-45,
                1e-38,
                GREEDY_BELOW * 0.99,
                GREEDY_BELOW,
                1e-3,
                0.7,
                1.0,
                50.0,
                1e30,
                3.4e38,
                10 ** rng.uniform(-30, 30),
            ]
        ),
        "top_k": rng.choice([0, 1, 2, 7, 319, 320, 10_000, 2**31 - 1]),
        "top_p": rng.choice([1e-30, 1e-7, 0.01, 0.5, 0.999999, 1.0, rng.random() or 1.0]),
        "seed": rng.choice([0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, rng.getrandbits(64)]),
        "max_tokens": rng.randint(1, 24),
    }


def test_random_parameters_beside_golden_greedy_streams(stub, golden):
    rng = random.Random(12)
    results: dict[int, object] = {}

    def run(i: int, req: pb.GenerateRequest) -> None:
        try:
            results[i] = stub.Generate(req, timeout=120)
        except grpc.RpcError as e:
            results[i] = e

    reqs = [
        pb.GenerateRequest(
            token_ids=[rng.randrange(320) for _ in range(rng.randint(1, 12))],
            ignore_eod=True,
            **random_params(rng),
        )
        for _ in range(48)
    ]
    threads = [threading.Thread(target=run, args=(i, r)) for i, r in enumerate(reqs)]
    golden_streams = [stub.GenerateStream(golden_request(c), timeout=120) for c in golden["cases"][:2]]
    for t in threads:
        t.start()
    for case, stream in zip(golden["cases"], golden_streams):
        assert [m.token_id for m in stream] == case["generated_ids"]
    for t in threads:
        t.join(120)
    errors = {i: r for i, r in results.items() if isinstance(r, grpc.RpcError)}
    assert not errors, {i: (e.code(), e.details(), reqs[i]) for i, e in errors.items()}
    for i, req in enumerate(reqs):
        assert len(results[i].token_ids) == req.max_tokens


def test_sample_floor_and_a_row_that_cannot_be_sampled():
    logits = torch.tensor([[0.0, 3.0, 1.0], [float("nan")] * 3, [2.0, 0.0, -1.0]])
    hot = SamplingParams(temperature=1e-40, seed=1)
    warm = SamplingParams(temperature=1.0, seed=1)
    out = sample(
        logits,
        [hot, warm, SamplingParams(temperature=3e38, seed=2)],
        [hot.generator(), warm.generator(), torch.Generator().manual_seed(2)],
    )
    assert out[0] == 1  # greedy below the floor
    assert isinstance(out[1], SampleError)  # only this row fails
    assert out[2] in (0, 1, 2)


class FailingDispatcher:
    """The real in-process experts, raising once when armed (a pool that failed mid-forward), and
    always for a batch holding a non-finite state (a request whose state breaks the expert step)."""

    def __init__(self, inner) -> None:
        self.inner, self.armed = inner, False

    def experts(self, layer, x, expert_ids, weights):
        if self.armed:
            self.armed = False
            raise ConnectionError("pool 3 went away")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("non-finite expert input")
        return self.inner.experts(layer, x, expert_ids, weights)

    def submit(self, layer, x, expert_ids, weights, lane=0):
        return self.experts(layer, x, expert_ids, weights)

    def wait(self, handle):
        return handle


def test_a_failed_forward_ends_only_the_request_it_belongs_to(fixture_dir, golden):
    ref = local_engine(str(fixture_dir))
    poison = ref.model.cfg.vocab_size - 1
    ref.model.embed.weight.data[poison] = float("nan")  # this engine's own copy of the weights
    dispatcher = FailingDispatcher(ref.dispatcher)
    eng = Engine(ref.model, dispatcher, EngineLimits(max_num_batched_tokens=64))
    greedy = SamplingParams(max_tokens=16, ignore_eod=True)
    cases = golden["cases"][:3]
    assert all(poison not in c["prompt_ids"] for c in cases)
    running = [eng.add(f"r{i}", c["prompt_ids"], greedy) for i, c in enumerate(cases)]
    eng.step()
    eng.step()  # a decode: all three are mid-stream
    # A passing fault in a step with decodes and a new prompt: nobody fails, all are recomputed.
    later = eng.add("later", cases[0]["prompt_ids"], greedy)
    dispatcher.armed = True
    assert eng.step() == []
    assert not any(s.finished for s in running + [later]) and eng.stats()["kv_blocks_used"] == 0
    # A request that breaks every forward it is in ends alone, in a forward of its own.
    doomed = eng.add("doomed", [5, poison, 7], greedy)
    while any(not s.finished for s in running + [later, doomed]):
        eng.step()
    assert doomed.finish_reason == "error" and "non-finite expert input" in doomed.error
    assert [s.output_ids for s in running + [later]] == [c["generated_ids"] for c in cases + [cases[0]]]
    assert eng.stats()["kv_blocks_used"] == 0 and not eng.running and not eng.waiting
    # A poisoned request that joins running streams mid-generation ends alone too.
    batch = [eng.add(f"b{i}", c["prompt_ids"], greedy) for i, c in enumerate(cases)]
    eng.step()
    doomed = eng.add("doomed2", [poison], greedy)
    while any(not s.finished for s in batch + [doomed]):
        eng.step()
    assert doomed.finish_reason == "error"
    assert [s.output_ids for s in batch] == [c["generated_ids"] for c in cases]
