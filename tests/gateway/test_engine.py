"""The continuous-batching engine: admission, sampling, stopping, limits and cancellation."""

from __future__ import annotations

import pytest

from gateway.engine import Engine, EngineLimits, local_engine
from gateway.errors import InvalidRequest, QueueFull
from gateway.sampling import SamplingParams


@pytest.fixture(scope="module")
def ref(fixture_dir):
    return local_engine(str(fixture_dir))


def fresh(ref: Engine, **limits) -> Engine:
    return Engine(ref.model, ref.dispatcher, EngineLimits(**limits))


def test_staggered_arrivals_get_the_tokens_they_get_alone(ref, golden):
    cases = golden["cases"]
    greedy = SamplingParams(max_tokens=16, ignore_eod=True)
    eng = fresh(ref)
    seqs, pending = [], list(cases)
    while pending or any(not s.finished for s in seqs):
        if pending:  # one new request every step, joining a running batch
            c = pending.pop(0)
            seqs.append(eng.add(f"r{c['index']}", c["prompt_ids"], greedy))
        eng.step()
    for seq, case in zip(seqs, cases):
        assert seq.output_ids == case["generated_ids"]


def test_seeded_sampling_is_the_same_alone_and_batched(ref, golden):
    params = [
        SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=100 + i, ignore_eod=True)
        for i in range(4)
    ]
    prompts = [c["prompt_ids"] for c in golden["cases"][:4]]
    alone = [fresh(ref).generate([p], sp)[0].output_ids for p, sp in zip(prompts, params)]
    together = [s.output_ids for s in fresh(ref).generate(prompts, params)]
    assert alone == together
    assert alone[0] != golden["cases"][0]["generated_ids"], "sampling at T=0.9 should not be greedy"


def test_stop_token_and_max_tokens_and_eod(ref, golden):
    case = golden["cases"][3]
    gen = case["generated_ids"]
    seq = fresh(ref).generate([case["prompt_ids"]], SamplingParams(max_tokens=16, stop_token_ids=(gen[4],)))[
        0
    ]
    assert seq.output_ids == gen[:5] and seq.finish_reason == "stop"
    seq = fresh(ref).generate([case["prompt_ids"]], SamplingParams(max_tokens=3))[0]
    assert seq.output_ids == gen[:3] and seq.finish_reason == "length"
    eod = ref.model.cfg.eod_token_id
    eng = fresh(ref)
    seq = eng.generate(
        [case["prompt_ids"]],
        SamplingParams(max_tokens=16, temperature=50.0, top_k=0, seed=3, stop_token_ids=()),
    )[0]
    assert seq.finish_reason in ("length", "eod")
    assert (seq.finish_reason == "eod") == (eod in seq.output_ids)


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ([], SamplingParams(), "prompt"),
        ([1, 5000], SamplingParams(), "token_ids"),
        ([1], SamplingParams(max_tokens=0), "max_tokens"),
        ([1], SamplingParams(max_tokens=10**6), "max_tokens"),
        ([1], SamplingParams(temperature=-1.0), "temperature"),
        ([1], SamplingParams(temperature=float("nan")), "temperature"),
        ([1], SamplingParams(top_k=-2), "top_k"),
        ([1], SamplingParams(top_p=0.0), "top_p"),
        ([1], SamplingParams(stop_token_ids=(99999,)), "stop_token_ids"),
        ([1] * 2000, SamplingParams(), "prompt"),
    ],
)
def test_bad_requests_fail_alone_naming_the_field(ref, golden, prompt, params, field):
    eng = fresh(ref)
    good = eng.add("good", golden["cases"][2]["prompt_ids"], SamplingParams(max_tokens=16, ignore_eod=True))
    with pytest.raises(InvalidRequest) as err:
        eng.add("bad", prompt, params)
    assert err.value.field == field
    while not good.finished:
        eng.step()
    assert good.output_ids == golden["cases"][2]["generated_ids"]


def test_queue_limit_and_duplicate_ids(ref):
    eng = fresh(ref, max_queue=2)
    eng.add("a", [1, 2], SamplingParams())
    with pytest.raises(InvalidRequest, match="request_id"):
        eng.add("a", [1, 2], SamplingParams())
    eng.add("b", [1, 2], SamplingParams())
    with pytest.raises(QueueFull):
        eng.add("c", [1, 2], SamplingParams())


def test_abort_frees_the_slot_and_others_continue(ref, golden):
    eng = fresh(ref)
    greedy = SamplingParams(max_tokens=16, ignore_eod=True)
    seqs = [eng.add(f"r{i}", c["prompt_ids"], greedy) for i, c in enumerate(golden["cases"][:4])]
    for _ in range(4):
        eng.step()
    held = eng.stats()["kv_blocks_used"]
    r1_blocks = len(seqs[1].block_table)
    assert eng.stats()["running"] == 4 and r1_blocks > 0
    assert eng.abort("r1").finish_reason == "cancelled"
    assert eng.stats()["kv_blocks_used"] == held - r1_blocks and eng.stats()["running"] == 3
    while eng.has_work:
        eng.step()
    for i in (0, 2, 3):
        assert seqs[i].output_ids == golden["cases"][i]["generated_ids"]
    assert len(seqs[1].output_ids) < 16
    assert eng.stats()["kv_blocks_used"] == 0


def test_more_requests_than_slots_all_finish(ref, golden):
    eng = fresh(ref, max_running=2)
    greedy = SamplingParams(max_tokens=16, ignore_eod=True)
    seqs = eng.generate([c["prompt_ids"] for c in golden["cases"]], greedy)
    assert [s.output_ids for s in seqs] == [c["generated_ids"] for c in golden["cases"]]
