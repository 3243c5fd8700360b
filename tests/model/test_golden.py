"""The in-process reference engine against the golden fixture made by the released Yuan code."""

from __future__ import annotations

import pytest
import torch

from gateway.engine import Engine, local_engine
from gateway.sampling import SamplingParams
from model.batch import Chunk, ForwardBatch, segment_start
from model.dispatcher import LocalDispatcher

LOGIT_TOL = 1e-4  # fixtures/README.md: max |delta| <= 1e-4, never looser than 1e-3
GREEDY16 = SamplingParams(max_tokens=16, ignore_eod=True)


class RecordingDispatcher:
    """Wraps the local dispatcher to record the router's choices per layer (order kept)."""

    def __init__(self, inner: LocalDispatcher) -> None:
        self.inner, self.calls = inner, []

    def experts(self, layer, x, expert_ids, weights):
        return self.wait(self.submit(layer, x, expert_ids, weights))

    def submit(self, layer, x, expert_ids, weights, lane=0):
        self.calls.append(expert_ids.clone())
        return self.inner.submit(layer, x, expert_ids, weights, lane)

    def wait(self, handle):
        return self.inner.wait(handle)


@pytest.fixture(scope="module")
def engine(fixture_dir):
    return local_engine(str(fixture_dir))


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_greedy_tokens_equal_golden(engine, golden, use_cache):
    for case in golden["cases"]:
        eng = Engine(engine.model, engine.dispatcher, use_cache=use_cache)
        seq = eng.generate([case["prompt_ids"]], GREEDY16)[0]
        assert seq.output_ids == case["generated_ids"], f"case {case['index']}: tokens differ from golden"


def test_cached_logits_and_routing_equal_golden(engine, golden, golden_tensors):
    """The prompt in one chunk, then one decode forward per golden token over the paged cache: all 17
    logit rows and every top-2 choice."""
    model, bs = engine.model, 16
    layers, eod = model.cfg.num_layers, model.eod_for_segments
    for case in golden["cases"]:
        i, prompt = case["index"], case["prompt_ids"]
        tokens = prompt + case["generated_ids"]
        rec = RecordingDispatcher(engine.dispatcher)
        table = list(range(1, 1 + -(-len(tokens) // bs)))
        cache = model.new_cache(len(table) + 1, bs)

        def run(start: int, n: int) -> torch.Tensor:
            chunk = Chunk(tokens, start, n, table, segment_start(tokens, start, eod))
            return model.forward([ForwardBatch.build([chunk], bs, eod)], rec, cache)

        rows = [run(0, len(prompt))] + [run(len(prompt) + k, 1) for k in range(16)]
        err = (torch.cat(rows) - golden_tensors[f"case{i}.logits"]).abs().max().item()
        assert err <= LOGIT_TOL, f"case {i}: max |logit - golden| = {err}"
        prefill = torch.stack(rec.calls[:layers])  # [layers, prompt_len, 2]
        decode = torch.stack(rec.calls[layers:]).view(16, layers, 2).transpose(0, 1)
        assert torch.equal(prefill, golden_tensors[f"case{i}.prefill_top2"]), f"case {i}: prefill routing"
        assert torch.equal(decode, golden_tensors[f"case{i}.decode_top2"]), f"case {i}: decode routing"


def test_uncached_logits_equal_golden(engine, golden, golden_tensors):
    """Recompute the whole sequence at every step (no cache), as the fixture's uncached reference."""
    for case in golden["cases"]:
        seqs = [torch.tensor(case["prompt_ids"] + case["generated_ids"][:k]) for k in range(17)]
        logits = torch.cat([engine.model.prefill([s], engine.dispatcher) for s in seqs])
        err = (logits - golden_tensors[f"case{case['index']}.logits"]).abs().max().item()
        assert err <= LOGIT_TOL, f"case {case['index']}: max |logit - golden| = {err}"


def test_batch_of_all_golden_prompts_equals_each_alone(engine, golden):
    eng = Engine(engine.model, engine.dispatcher)
    seqs = eng.generate([c["prompt_ids"] for c in golden["cases"]], GREEDY16)
    for seq, case in zip(seqs, golden["cases"]):
        assert seq.output_ids == case["generated_ids"], f"case {case['index']} changed when batched"
    assert eng.stats()["kv_blocks_used"] == 0, "finished sequences must free their cache blocks"


def test_packed_prefill_logits_equal_separate(engine, golden):
    """Packing prompts into one prefill must not leak LF state or attention across sequences."""
    prompts = [torch.tensor(c["prompt_ids"]) for c in golden["cases"]]
    together = engine.model.prefill(prompts, engine.dispatcher)
    alone = torch.cat([engine.model.prefill([p], engine.dispatcher) for p in prompts])
    assert (together - alone).abs().max().item() <= 1e-5


def test_micro_batch_overlap_keeps_tokens(engine, golden):
    """Two half-batches run ping-pong (attention of one while the other's experts run): same tokens."""
    eng = Engine(engine.model, engine.dispatcher, micro_batches=2)
    seqs = eng.generate([c["prompt_ids"] for c in golden["cases"]], GREEDY16)
    assert [s.output_ids for s in seqs] == [c["generated_ids"] for c in golden["cases"]]


def test_bfloat16_runs_and_stays_close_to_float32(fixture_dir, golden, golden_tensors):
    """bf16 is for GPUs; the fixture is float32-only, so compare loosely: first logits near, first token
    equal."""
    from gateway.engine import local_engine

    bf16 = local_engine(str(fixture_dir), dtype="bfloat16")
    assert bf16.model.embed.weight.dtype == torch.bfloat16
    agree = 0
    for case in golden["cases"]:
        logits = bf16.model.prefill([torch.tensor(case["prompt_ids"])], bf16.dispatcher)[0].float()
        ref = golden_tensors[f"case{case['index']}.logits"][0]
        assert (logits - ref).abs().max().item() < 1.0
        agree += int(logits.argmax()) == case["generated_ids"][0]
    assert agree >= len(golden["cases"]) - 1


def test_classical_router_checkpoint_loads_and_serves(tmp_path):
    """The paper's baseline gate (softmax(W g), one N x d matrix) as a config option."""
    from gateway.engine import local_engine
    from model.checkpoint import write_random_checkpoint
    from model.config import YuanConfig, preset

    ckpt = write_random_checkpoint(
        preset("tiny").with_(router_type="classical"), tmp_path / "classical", seed=1
    )
    cfg = YuanConfig.from_file(ckpt / "config.json")
    assert cfg.router_type == "classical"
    engine = local_engine(str(ckpt))
    seqs = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=6, ignore_eod=True))
    assert all(len(s.output_ids) == 6 for s in seqs)
    alone = local_engine(str(ckpt)).generate([[4, 5]], SamplingParams(max_tokens=6, ignore_eod=True))[0]
    assert alone.output_ids == seqs[1].output_ids


def test_prefill_chunks_in_one_padded_attention_call_equal_one_by_one(engine, golden, monkeypatch):
    """Prompt chunks of different lengths, one crossing `<eod>` segments and, in the second step,
    every one continuing its cached prefix, attend in one padded call (`prefill_group`): the
    logits of the chunk-by-chunk loop within float32 rounding."""
    model, bs = engine.model, 4
    eod = model.eod_for_segments
    cases = {len(c["prompt_ids"]): c["prompt_ids"] for c in golden["cases"]}
    seqs = [cases[24], cases[33][:28], [5, 9, eod or 7, 11, 12, eod or 7, 13] * 3 + [14, 15, 16]]
    cuts = [12, 15, 11]  # the first step's chunk of each sequence; the second step has the rest

    def run() -> tuple[torch.Tensor, list[bool]]:
        cache = model.new_cache(1 + 3 * 9, bs)
        tables = [list(range(1 + 9 * i, 10 + 9 * i)) for i in range(3)]
        logits, grouped = [], []
        for step in range(2):
            chunks = []
            for tokens, cut, table in zip(seqs, cuts, tables):
                start, end = (0, cut) if step == 0 else (cut, len(tokens))
                chunks.append(Chunk(tokens, start, end - start, table, segment_start(tokens, start, eod)))
            batch = ForwardBatch.build(chunks, bs, eod)
            grouped.append(batch.prefill_group() is not None)
            logits.append(model.forward([batch], engine.dispatcher, cache))
        return torch.cat(logits), grouped

    together, grouped = run()
    monkeypatch.setattr(ForwardBatch, "prefill_group", lambda self: None)
    one_by_one, _ = run()
    assert grouped == [True, True], "both steps' chunks took the one padded call"
    assert (together - one_by_one).abs().max().item() <= 1e-5
    assert torch.equal(together.argmax(-1), one_by_one.argmax(-1))
