"""The paged engine: chunked prefill, block sizes, prefix caching, preemption, eviction, the cache's
size, and the batch-invariant mode, judged by the golden fixture and by solo runs."""

from __future__ import annotations

import os
import random

import pytest
import torch
from recording import RecordingEngine

from gateway.engine import Engine, EngineLimits, local_engine
from gateway.sampling import SamplingParams
from model import invariant
from model.cache import PagedCache

LOGIT_TOL = 1e-4
GREEDY16 = SamplingParams(max_tokens=16, ignore_eod=True)


@pytest.fixture(scope="module")
def ref(fixture_dir):
    return local_engine(str(fixture_dir))


def run_golden(ref, golden, golden_tensors, cases=None, **limits) -> RecordingEngine:
    """All golden prompts together; every request's tokens equal golden, its 17 logit rows close."""
    eng = RecordingEngine(ref.model, ref.dispatcher, EngineLimits(**limits))
    cases = cases or golden["cases"]
    seqs = eng.generate([c["prompt_ids"] for c in cases], GREEDY16)
    for seq, case in zip(seqs, cases):
        assert seq.output_ids == case["generated_ids"], f"case {case['index']} ({limits}): tokens"
        got = torch.stack(eng.logits[seq.request_id])
        err = (got - golden_tensors[f"case{case['index']}.logits"][:16]).abs().max().item()
        assert err <= LOGIT_TOL, f"case {case['index']} ({limits}): max |logit - golden| = {err}"
    assert eng.stats()["kv_blocks_used"] == 0
    return eng


@pytest.mark.parametrize(
    "budget, block_size", [(1, 16), (7, 16), (64, 16), (7, 1), (7, 64), (64, 1), (64, 64)]
)
def test_golden_with_step_budgets_and_block_sizes(ref, golden, golden_tensors, budget, block_size):
    """Every prompt chunked by the budget (1: one token a step) beside the others' decodes; the
    300-token prompt spans many blocks, the <eod> case crosses segments inside chunks."""
    eng = run_golden(ref, golden, golden_tensors, max_num_batched_tokens=budget, block_size=block_size)
    total = sum(len(c["prompt_ids"]) + 15 for c in golden["cases"])  # the last token is never fed
    assert eng.steps >= total / budget


@pytest.mark.parametrize("case_index, prefix_len, block_size", [(5, 100, 16), (6, 10, 4), (4, 33, 1)])
def test_prefix_cache_hit_equals_the_miss(ref, golden, golden_tensors, case_index, prefix_len, block_size):
    """A request whose prompt extends an earlier one's starts from the cached blocks (case 6 has
    <eod>s inside the cached prefix, so its segments start there); tokens and logits as golden."""
    case = golden["cases"][case_index]
    eng = RecordingEngine(ref.model, ref.dispatcher, EngineLimits(block_size=block_size))
    eng.generate([case["prompt_ids"][:prefix_len]], SamplingParams(max_tokens=1))
    before = eng.stats()["prefix_cache_hits"]
    seq = eng.generate([case["prompt_ids"]], GREEDY16)[0]
    hit = eng.stats()["prefix_cache_hits"] - before
    expect = min(prefix_len // block_size, (len(case["prompt_ids"]) - 1) // block_size) * block_size
    assert hit == expect > 0
    assert seq.output_ids == case["generated_ids"]
    err = (
        (torch.stack(eng.logits[seq.request_id]) - golden_tensors[f"case{case_index}.logits"][:16])
        .abs()
        .max()
    )
    assert err.item() <= LOGIT_TOL


def test_prefix_caching_off_never_hits(ref, golden):
    case = golden["cases"][5]
    eng = Engine(ref.model, ref.dispatcher, EngineLimits(prefix_caching=False))
    for _ in range(2):
        assert eng.generate([case["prompt_ids"]], GREEDY16)[0].output_ids == case["generated_ids"]
    assert eng.stats()["prefix_cache_hits"] == 0


def solo(ref, prompt, params, **limits) -> list[int]:
    return Engine(ref.model, ref.dispatcher, EngineLimits(**limits)).generate([prompt], params)[0].output_ids


def test_few_blocks_preempt_and_every_request_finishes_as_alone(ref):
    """16 streams over a cache that holds a few of them: the newest give their blocks back and are
    recomputed later; none is lost and each gets the tokens it gets alone."""
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randrange(5, 30))] for _ in range(16)]
    greedy = SamplingParams(max_tokens=40, ignore_eod=True)
    eng = Engine(ref.model, ref.dispatcher, EngineLimits(block_size=4, num_kv_blocks=60))
    seqs = [eng.add(f"r{i}", p, greedy) for i, p in enumerate(prompts)]
    most = 0
    while eng.has_work:
        eng.step()
        most = max(most, eng.stats()["kv_blocks_used"])
        assert most <= 59
    assert eng.stats()["preemptions"] > 0 and any(s.preempted for s in seqs)
    for p, s in zip(prompts, seqs):
        assert s.finish_reason == "length" and s.output_ids == solo(ref, p, greedy), s.request_id
    assert eng.stats()["kv_blocks_used"] == 0


def test_eviction_under_pressure_keeps_correctness_and_reuses_blocks(ref):
    """More distinct prompts than cached blocks: least recently freed cached blocks are evicted and
    handed out again; a recent prompt still hits, an evicted one recomputes, all tokens right."""
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 250) for _ in range(21)] for _ in range(12)]
    greedy = SamplingParams(max_tokens=4, ignore_eod=True)
    eng = Engine(ref.model, ref.dispatcher, EngineLimits(block_size=4, num_kv_blocks=21))
    seen: set[int] = set()
    for p in prompts:
        seq = eng.add(f"p{len(seen)}-{rng.random()}", p, greedy)
        while not seq.finished:
            eng.step()
            seen.update(seq.block_table)
        assert seq.output_ids == solo(ref, p, greedy)
    assert eng.blocks.evictions > 0 and len(seen) == 20  # every block handed out, most many times
    hits = eng.stats()["prefix_cache_hits"]
    assert eng.generate([prompts[-1]], greedy)[0].output_ids == solo(ref, prompts[-1], greedy)
    assert eng.stats()["prefix_cache_hits"] == hits + 20  # its 5 full blocks were still cached
    assert eng.generate([prompts[0]], greedy)[0].output_ids == solo(ref, prompts[0], greedy)


def test_cache_bytes_are_fixed_by_config_and_blocks_follow_tokens(ref, golden):
    cfg, gb, bs = ref.model.cfg, 0.02, 16
    eng = Engine(ref.model, ref.dispatcher, EngineLimits(kv_cache_gb=gb, block_size=bs))
    per_block = PagedCache.block_bytes(
        cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.hidden_size, torch.float32, bs
    )
    allocated = eng.cache.nbytes()
    assert gb * 1e9 - per_block < allocated <= gb * 1e9
    assert eng.stats()["kv_blocks_total"] == eng.cache.num_blocks - 1
    seqs = [eng.add(f"r{i}", c["prompt_ids"], GREEDY16) for i, c in enumerate(golden["cases"])]
    while eng.has_work:
        eng.step()
        held = sum(-(-s.num_computed // bs) for s in eng.running)
        assert eng.stats()["kv_blocks_used"] == held  # nothing shared here: one block per 16 tokens
        assert eng.cache.nbytes() == allocated
    assert all(s.finish_reason == "length" for s in seqs) and eng.stats()["kv_blocks_used"] == 0


def test_chunked_prefill_keeps_running_streams_decoding(ref, golden):
    """A 300-token prompt arrives while four streams decode: with a budget of 32 every step still
    carries the four decodes, so each gets one token per step while the prompt is chunked."""
    eng = Engine(ref.model, ref.dispatcher, EngineLimits(max_num_batched_tokens=32))
    streams = [eng.add(f"r{i}", c["prompt_ids"], GREEDY16) for i, c in enumerate(golden["cases"][:4])]
    while any(not s.output_ids for s in streams):
        eng.step()
    long = eng.add("long", golden["cases"][5]["prompt_ids"], GREEDY16)
    while not long.output_ids:
        before = [len(s.output_ids) for s in streams]
        eng.step()
        for s, n in zip(streams, before):
            assert s.finished or len(s.output_ids) == n + 1
    assert long.num_computed == 300
    while eng.has_work:
        eng.step()
    assert [s.output_ids for s in streams + [long]] == [
        c["generated_ids"] for c in golden["cases"][:4] + [golden["cases"][5]]
    ]


def test_a_request_larger_than_the_cache_is_refused(ref):
    from gateway.errors import InvalidRequest

    eng = Engine(ref.model, ref.dispatcher, EngineLimits(block_size=4, num_kv_blocks=5))
    with pytest.raises(InvalidRequest) as err:
        eng.add("big", list(range(10)), SamplingParams(max_tokens=10))
    assert err.value.field == "max_tokens" and "KV blocks" in str(err.value)


def test_batch_invariant_linear_rows_do_not_depend_on_the_batch():
    """The mechanism: a row's bits from F.linear change with the row count; in the mode they do not."""
    torch.manual_seed(0)
    w, x = torch.randn(96, 64), torch.randn(40, 64)
    with invariant.mode(True):
        alone = torch.cat([invariant.linear(x[i : i + 1], w) for i in range(40)])
        for m in (2, 3, 7, 16, 40):
            assert torch.equal(invariant.linear(x[:m], w), alone[:m])


def test_batch_invariant_golden_and_chunking(ref, golden, golden_tensors):
    """The mode keeps the fixture (tokens exact, logits within 1e-4), and a prompt's logits are the
    same bits however it is chunked and whatever runs beside it."""
    a = run_golden(ref, golden, golden_tensors, max_num_batched_tokens=7, batch_invariant=True)
    b = run_golden(ref, golden, golden_tensors, max_num_batched_tokens=64, batch_invariant=True)
    c = RecordingEngine(
        ref.model, ref.dispatcher, EngineLimits(batch_invariant=True, max_num_batched_tokens=5)
    )
    c.generate([golden["cases"][5]["prompt_ids"]], GREEDY16)
    rows = {k: torch.stack(v) for k, v in a.logits.items()}
    assert all(torch.equal(rows[k], torch.stack(v)) for k, v in b.logits.items())
    (alone,) = c.logits.values()
    assert torch.equal(torch.stack(alone), rows["gen-0-5"])


def test_batch_invariant_32_streams_of_400_tokens_equal_solo_runs(tiny_checkpoint):
    """32 concurrent greedy 400-token streams on the demo-sized checkpoint; a sample of 3 of them
    (first, last and one drawn; all 32 with YUAN_SERVE_FULL_CHECKS=1) run solo: each the same, token
    for token."""
    eng = local_engine(str(tiny_checkpoint), limits=EngineLimits(batch_invariant=True))
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randrange(4, 40))] for _ in range(32)]
    greedy = SamplingParams(max_tokens=400, ignore_eod=True)
    together = [s.output_ids for s in eng.generate(prompts, greedy)]
    sample = range(32) if os.environ.get("YUAN_SERVE_FULL_CHECKS") else [0, 31, rng.randrange(1, 31)]
    for i in sample:
        assert together[i] == solo(eng, prompts[i], greedy, batch_invariant=True), f"stream {i}"
