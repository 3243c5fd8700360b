"""The skinny matmul (model/_skinny.c) against torch, and the property the engine relies on: a row's
bits do not depend on the other rows of the call. float32, and bfloat16 (widened, summed in float32,
rounded once)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from gateway.engine import Engine
from gateway.sampling import SamplingParams
from model import invariant, skinny

pytestmark = pytest.mark.skipif(
    not skinny.available(), reason="model._skinny is not built or this CPU lacks AVX2/FMA (torch is used)"
)


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 16, 19])  # 13, 19: rows after the fours
@pytest.mark.parametrize("out_features", [1, 4, 8, 37, 256])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_reference(rows, out_features, with_bias):
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    K = 136
    x = torch.randn(rows, K, generator=g)
    w = torch.randn(out_features, K, generator=g)
    b = torch.randn(out_features, generator=g) if with_bias else None
    assert skinny.fits(x, w)
    y = skinny.matmul(x, w, b)
    err = (y.double() - _reference(x, w, b)).abs().max().item()
    assert err < 1e-4, f"max |skinny - float64| = {err}"  # |values| ~ sqrt(136): float32 rounding


def test_strided_rows_in_and_out():
    """x rows and out rows may be slices of wider buffers (the expert step writes into `u[a:b]`)."""
    g = torch.Generator().manual_seed(1)
    wide_x = torch.randn(6, 80, generator=g)
    x = wide_x[1:5, 8:72]  # [4, 64], rows 80 apart
    w = torch.randn(24, 64, generator=g)
    wide_out = torch.full((5, 40), 7.0)
    out = wide_out[1:5, 4:28]
    skinny.matmul(x, w, out=out)
    assert (out.double() - _reference(x, w, None)).abs().max().item() < 1e-4
    untouched = torch.ones_like(wide_out, dtype=torch.bool)
    untouched[1:5, 4:28] = False
    assert torch.all(wide_out[untouched] == 7.0), "wrote outside `out`"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_has_the_same_bits_in_any_call(dtype):
    """Whatever kernel a row count picks (one row, pairs, the 3 x 4 blocks, the rows after the fours
    in pieces), a row gets the same operations."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(23, 512, generator=g).to(dtype)
    w = torch.randn(1300, 512, generator=g).to(dtype)  # several pieces of the rows after the fours
    b = torch.randn(1300, generator=g).to(dtype)
    together = skinny.matmul(x, w, b)
    for lo, hi in [(0, 1), (3, 4), (5, 8), (2, 13), (15, 16), (0, 9), (1, 13), (0, 16), (4, 21), (0, 19)]:
        assert torch.equal(skinny.matmul(x[lo:hi], w, b), together[lo:hi]), f"rows {lo}:{hi} differ"


def test_fits_refuses_what_the_kernel_does_not_do():
    w = torch.randn(8, 64)
    assert not skinny.fits(torch.randn(skinny.MAX_ROWS + 1, 64), w)  # many rows: torch's blocked kernel
    assert not skinny.fits(torch.randn(2, 64).double(), w.double())
    assert not skinny.fits(torch.randn(2, 60), torch.randn(8, 60))  # K not a multiple of 8
    assert not skinny.fits(torch.randn(64, 2).t(), w)  # columns not contiguous
    assert not skinny.fits(torch.randn(2, 64), torch.randn(64, 8).t())  # weight not contiguous
    assert not skinny.fits(torch.randn(0, 64), w)
    with skinny.mode(False):
        assert not skinny.fits(torch.randn(2, 64), w)
    assert skinny.fits(torch.randn(2, 64), w)


def test_out_and_bias_are_checked():
    x, w = torch.randn(2, 64), torch.randn(8, 64)
    with pytest.raises(ValueError, match="out"):
        skinny.matmul(x, w, out=torch.empty(2, 9))
    with pytest.raises(ValueError, match="bias"):
        skinny.matmul(x, w, torch.randn(7))


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 9, 13, 16, 17, 64])
@pytest.mark.parametrize("threads", [1, 2])
def test_bfloat16_is_the_float32_kernel_on_widened_values_rounded_once(rows, threads):
    """Widening is exact and the sums are the float32 kernel's, so the bfloat16 result is exactly
    the float32 call on the widened tensors, rounded by torch's conversion (ties to even); and it is
    as near the exact product as bfloat16 can be."""
    g = torch.Generator().manual_seed(rows * 10 + threads)
    N, K = 1100, 256  # past PAR_FLOATS: threads share it
    x = torch.randn(rows, K, generator=g).bfloat16()
    w = torch.randn(N, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g).bfloat16()
    assert skinny.fits(x, w)
    y = _with_threads(threads, lambda: skinny.matmul(x, w, b))
    wide = _with_threads(threads, lambda: skinny.matmul(x.float(), w.float(), b.float()))
    assert y.dtype is torch.bfloat16 and y.shape == (rows, N)
    assert torch.equal(y, wide.bfloat16())
    exact = _reference(x, w, b)
    assert ((y.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-4).all()


def _bf16_pieces(v: torch.Tensor) -> torch.Tensor:
    """float32 values `[n]` -> bfloat16 `[n, 3]` whose float32 sum is exactly the value: the top 8
    mantissa bits, the next 8, the rest (each cut by truncation, so each piece is exact)."""

    def trunc(t: torch.Tensor) -> torch.Tensor:
        return (t.view(torch.int32) & -65536).view(torch.float32)

    a = trunc(v)
    r = torch.where(torch.isfinite(v), v - a, torch.zeros_like(v))
    b = trunc(r)
    return torch.stack([a, b, r - b], 1).bfloat16()


def test_bfloat16_rounds_ties_to_even_and_nan_inf_overflow_as_torch():
    """Each output row's weights are three bfloat16 pieces of a chosen float32 value, so its float32
    sum is that value and the output is the kernel's rounding of it: ties go to even, NaN is the
    quiet NaN, float32 values past bfloat16's largest become inf."""
    top = torch.tensor(0x7F7F8000, dtype=torch.int32).view(torch.float32).item()  # tie at the top
    values = torch.tensor(
        [
            1 + 2**-8,
            1 + 3 * 2**-8,
            -(1 + 2**-8),
            1 + 2**-8 + 2**-20,
            3.4028235e38,
            -3.4028235e38,
            top,
            float("inf"),
            -float("inf"),
            float("nan"),
            2**-130,
            -(2**-133),
            0.1,
            -2.5,
            65504.0,
            1 + 2**-9,
        ],
        dtype=torch.float32,
    )
    w = torch.zeros(values.numel(), 8, dtype=torch.bfloat16)
    w[:, :3] = _bf16_pieces(values)
    ones = torch.ones(1, 8, dtype=torch.bfloat16)
    sums = skinny.matmul(ones.float(), w.float())[0]  # the float32 kernel: the chosen values exactly
    finite = torch.isfinite(values)
    assert torch.equal(sums[finite], values[finite]) and torch.isnan(sums[9])
    y = skinny.matmul(ones, w)[0]
    bits, nan = y.view(torch.int16), torch.isnan(values)
    # NaN bits: c10::BFloat16's scalar conversion gives 0x7fc0, torch's vectorized one 0xffff
    assert torch.equal(bits[~nan], sums.bfloat16().view(torch.int16)[~nan]), "differs from torch's conversion"
    assert y[0] == 1.0 and y[1] == 1 + 2**-6 and y[2] == -1.0 and y[3] == 1 + 2**-7  # ties to even
    assert y[4] == float("inf") and y[5] == -float("inf") and y[6] == float("inf")
    assert bits[9].item() == 0x7FC0


def test_bfloat16_fits_only_with_bfloat16_weights_and_checks_out():
    x, w = torch.randn(2, 64).bfloat16(), torch.randn(8, 64).bfloat16()
    assert skinny.fits(x, w)
    assert not skinny.fits(x, w.float()) and not skinny.fits(x.float(), w)
    assert not skinny.fits(x.half(), w.half())
    with pytest.raises(ValueError, match="out"):
        skinny.matmul(x, w, out=torch.empty(2, 8))  # float32 out for bfloat16 x
    with pytest.raises(ValueError, match="bias"):
        skinny.matmul(x, w, torch.randn(8))


def test_bfloat16_engine_is_as_near_float32_with_it_as_with_torch(fixture_dir, golden, golden_tensors):
    """The bfloat16 engine through the kernel is no further from the float32 fixture than through
    torch's bfloat16 matmuls (both round each product's sum once)."""
    from gateway.engine import local_engine

    errs = {}
    for on in (True, False):
        with skinny.mode(on):
            eng = local_engine(str(fixture_dir), dtype="bfloat16")
            errs[on] = max(
                (
                    eng.model.prefill([torch.tensor(c["prompt_ids"])], eng.dispatcher)[0].float()
                    - golden_tensors[f"case{c['index']}.logits"][0]
                )
                .abs()
                .max()
                .item()
                for c in golden["cases"]
            )
    assert 0 < errs[True] <= 2 * errs[False], errs


def test_invariant_linear_uses_it_outside_batch_invariant_mode():
    """`invariant.linear` gives the kernel's bits for few rows, torch's (padded) in the mode."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(3, 64, generator=g), torch.randn(32, 64, generator=g)
    assert torch.equal(invariant.linear(x, w), skinny.matmul(x, w))
    with invariant.mode(True):
        padded = torch.cat([x, x.new_zeros(invariant.MIN_ROWS - 3, 64)])
        assert torch.equal(invariant.linear(x, w), F.linear(padded, w)[:3])


def test_golden_tokens_with_and_without_it(engine_factory, golden):
    """The fixture is token-exact either way (the golden logit tests run with it on)."""
    for on in (True, False):
        with skinny.mode(on):
            eng = engine_factory()
            prompts = [c["prompt_ids"] for c in golden["cases"]]
            seqs = eng.generate(prompts, SamplingParams(max_tokens=16, ignore_eod=True))
        assert [s.output_ids for s in seqs] == [c["generated_ids"] for c in golden["cases"]], f"skinny={on}"


@pytest.fixture(scope="module")
def engine_factory(fixture_dir):
    from gateway.engine import local_engine

    base = local_engine(str(fixture_dir))
    return lambda: Engine(base.model, base.dispatcher)


def _bank(E: int = 6, d: int = 64, F: int = 48, seed: int = 4):
    from model.experts import ExpertBank

    g = torch.Generator().manual_seed(seed)
    bank = ExpertBank(list(range(10, 10 + E)), d, F)
    bank.w1.data = torch.randn(bank.w1.shape, generator=g) / d**0.5
    bank.w2.data = torch.randn(bank.w2.shape, generator=g) / F**0.5
    return bank, g


def _pairs(bank, g, T: int, R: int, S: int):
    x = torch.randn(T, bank.w1.shape[2], generator=g)
    rows = torch.randint(0, T, (R,), generator=g)
    ids = torch.tensor(bank.expert_ids)[torch.randint(0, len(bank.expert_ids), (R,), generator=g)]
    weights = torch.rand(R, generator=g)
    slots = torch.randperm(S, generator=g)[:R]
    return x, rows, ids, weights, slots


@pytest.mark.parametrize("R", [1, 2, 7, 64, 300])  # 300 pairs over 6 experts: groups past 32 rows
def test_grouped_expert_step_equals_the_per_expert_torch_path(R):
    """The three-call expert step gives the bits of the per-expert path with the same kernel, and
    stays within float32 rounding of torch's own matmuls; slots it does not own are untouched."""
    bank, g = _bank()
    x, rows, ids, weights, slots = _pairs(bank, g, T=max(R, 4), R=R, S=R + 5)
    with torch.inference_mode():
        grouped = torch.full((R + 5, 64), 9.0)
        bank.pair_outputs(x, rows, ids, weights, grouped, slots)
        limit = skinny.EXPERT_MAX_ROWS
        try:
            skinny.EXPERT_MAX_ROWS = 0  # the per-expert path, its matmuls still this kernel's below 17 rows
            per_expert = torch.full((R + 5, 64), 9.0)
            bank.pair_outputs(x, rows, ids, weights, per_expert, slots)
        finally:
            skinny.EXPERT_MAX_ROWS = limit
        with skinny.mode(False):
            plain = torch.full((R + 5, 64), 9.0)
            bank.pair_outputs(x, rows, ids, weights, plain, slots)
    counts = torch.bincount(ids - 10, minlength=6)
    if int(counts.max()) <= skinny.MAX_ROWS:
        assert torch.equal(grouped, per_expert)
    assert (grouped - plain).abs().max().item() < 1e-5
    free = torch.ones(R + 5, dtype=torch.bool)
    free[slots] = False
    assert torch.all(grouped[free] == 9.0)


def test_grouped_expert_step_refuses_pairs_out_of_range():
    bank, g = _bank()
    x, rows, ids, weights, slots = _pairs(bank, g, T=4, R=6, S=8)
    out = torch.zeros(8, 64)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="does not hold"):
            bank.pair_outputs(x, rows, torch.tensor([10, 11, 12, 13, 14, 3]), weights, out, slots)
        with pytest.raises(ValueError, match="rows"):
            bank.pair_outputs(x, torch.tensor([0, 1, 2, 3, 0, 4]), ids, weights, out, slots)
        with pytest.raises(ValueError, match="slots"):
            bank.pair_outputs(x, rows, ids, weights, out, torch.tensor([0, 1, 2, 3, 4, 8]))
    assert torch.all(out == 0), "a refused call writes nothing"


def _decode_logits(model, dispatcher, prompts, steps, on, whole=True):
    """Prefill each prompt (its own chunk), then `steps` decode forwards of all of them together;
    the logits of every decode step `[steps * B, V]`. `on`: decode layers in C; `whole`: an
    in-process step's layers in one call (`decode_layers`), else a few calls a layer."""
    from model.batch import Chunk, ForwardBatch, segment_start

    bs, eod = 4, model.eod_for_segments  # small blocks: decode crosses block boundaries
    tokens = [list(p) for p in prompts]
    width = max(len(p) for p in prompts) + steps
    per = width // bs + 1  # blocks per sequence
    tables = [list(range(1 + i * per, 1 + (i + 1) * per)) for i in range(len(prompts))]
    cache = model.new_cache(1 + len(prompts) * per, bs)
    rows = []
    with skinny.mode(True):
        limit, skinny.DECODE_LAYER = skinny.DECODE_LAYER, on
        step, skinny.DECODE_STEP = skinny.DECODE_STEP, whole
        try:
            for t, table in zip(tokens, tables):
                if len(t) > 1:  # a one-token prompt is a decode-shaped chunk at position 0
                    chunk = Chunk(t, 0, len(t) - 1, table, 0, logits=False)
                    model.forward([ForwardBatch.build([chunk], bs, eod)], dispatcher, cache)
            for _ in range(steps):
                chunks = [
                    Chunk(t, len(t) - 1, 1, table, segment_start(t, len(t) - 1, eod))
                    for t, table in zip(tokens, tables)
                ]
                logits = model.forward([ForwardBatch.build(chunks, bs, eod)], dispatcher, cache)
                rows.append(logits)
                for t, nxt in zip(tokens, logits.argmax(-1).tolist()):
                    t.append(nxt)
        finally:
            skinny.DECODE_LAYER, skinny.DECODE_STEP = limit, step
    return torch.cat(rows), tokens


@contextmanager
def _counted(name: str):
    """`model.skinny.<name>` counted while inside: yields the list its calls append to."""
    calls, real = [], getattr(skinny, name)

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    setattr(skinny, name, counted)
    try:
        yield calls
    finally:
        setattr(skinny, name, real)


def test_one_call_decode_attention_matches_the_torch_layers(engine_factory, golden):
    """Decode steps of several sequences at once (one starting at position 0 with no LF state, one
    crossing `<eod>` segments, all crossing 4-token block boundaries): the one-call C attention
    gives the torch layers' logits within float32 rounding and the same greedy tokens."""
    eng = engine_factory()
    eod = eng.model.cfg.eod_token_id
    prompts = [c["prompt_ids"] for c in golden["cases"][:3]] + [[7], [5, 9, eod, 11, 12, eod, 13]]
    with _counted("decode_attention") as calls:
        c_logits, c_tokens = _decode_logits(eng.model, eng.dispatcher, prompts, 9, on=True, whole=False)
    t_logits, t_tokens = _decode_logits(eng.model, eng.dispatcher, prompts, 9, on=False)
    assert len(calls) >= 9 * eng.model.cfg.num_layers, "every decode forward took the C path"
    assert (c_logits - t_logits).abs().max().item() < 1e-5
    assert c_tokens == t_tokens


def test_a_decode_step_in_one_call_has_the_bits_of_the_per_layer_calls(engine_factory, golden):
    """In-process decode steps with every layer, experts included, in one C call (`decode_layers`)
    give the logits of the per-layer C calls bit for bit (the same operations in the same order),
    over the same awkward batch as above; the golden prompts' greedy tokens stay the released
    code's."""
    eng = engine_factory()
    eod = eng.model.cfg.eod_token_id
    cases = golden["cases"][:3]
    prompts = [c["prompt_ids"] for c in cases] + [[7], [5, 9, eod, 11, 12, eod, 13]]
    with _counted("decode_layers") as calls:
        one_logits, one_tokens = _decode_logits(eng.model, eng.dispatcher, prompts, 9, on=True)
    layer_logits, layer_tokens = _decode_logits(eng.model, eng.dispatcher, prompts, 9, on=True, whole=False)
    assert len(calls) >= 9, "every decode step was one call"
    assert torch.equal(one_logits, layer_logits)
    assert one_tokens == layer_tokens
    for case, tokens in zip(cases, one_tokens):
        n = len(case["prompt_ids"])
        want = case["generated_ids"][:9]
        assert tokens[n : n + len(want)] == want


def test_a_decode_step_of_more_than_32_streams_is_one_call_with_the_bits_of_the_per_layer_calls(
    engine_factory,
):
    """Past 32 streams (up to `MAX_ROWS`) a decode step still runs in one call: experts get more
    rows there (the many-row kernel inside the grouped call) and the LM head has more rows; the
    logits stay the per-layer calls' bit for bit."""
    eng = engine_factory()
    prompts = [[3 + (11 * i + j) % 250 for j in range(3 + i % 5)] for i in range(48)]
    with _counted("decode_layers") as calls:
        one_logits, one_tokens = _decode_logits(eng.model, eng.dispatcher, prompts, 3, on=True)
    layer_logits, layer_tokens = _decode_logits(eng.model, eng.dispatcher, prompts, 3, on=True, whole=False)
    assert len(calls) == 3, "every decode step of 48 streams was one call"
    assert torch.equal(one_logits, layer_logits)
    assert one_tokens == layer_tokens


class _Seeing:
    """A dispatcher over in-process banks that keeps every layer's routing it is given or told."""

    def __init__(self, inner) -> None:
        self.inner, self.seen = inner, []

    @property
    def banks(self):
        return self.inner.banks

    def record_routing(self, layer, expert_ids):
        self.seen.append((layer, expert_ids.tolist()))

    def submit(self, layer, x, expert_ids, weights, lane=0):
        self.seen.append((layer, expert_ids.tolist()))
        return self.inner.submit(layer, x, expert_ids, weights, lane)

    def wait(self, handle):
        return self.inner.wait(handle)


def test_a_decode_step_in_one_call_sees_weights_edited_in_place_and_new_storage(engine_factory):
    """The pointer table follows the weights over one engine's cache: after q_proj is written in
    place (its stacked copy must be rebuilt) and an expert bank gets new storage, one-call steps
    give the per-layer calls' tokens, not the old ones."""
    from gateway.sampling import SamplingParams

    eng = engine_factory()
    params = SamplingParams(max_tokens=12, ignore_eod=True)
    prompts = [[3, 4, 5], [20, 21, 22, 23], [7]]

    def tokens(whole: bool) -> list[list[int]]:
        step, skinny.DECODE_STEP = skinny.DECODE_STEP, whole
        try:
            return [s.output_ids for s in eng.generate(prompts, params)]
        finally:
            skinny.DECODE_STEP = step

    before = tokens(True)
    with torch.no_grad():
        for layer in eng.model.layers:
            layer.attn.q_proj.weight.mul_(-3.0)
        for bank in eng.dispatcher.banks:
            bank.w2.data = bank.w2.data * -4.0
    after = tokens(True)
    assert after == tokens(False)
    assert after != before
    with torch.no_grad():  # the step's ends: the LM head in new storage, the embedding in place
        eng.model.lm_head.weight.data = eng.model.lm_head.weight.data.flip(0).clone()
        eng.model.embed.weight.mul_(-2.0)
    ends = tokens(True)
    assert ends == tokens(False)
    assert ends != after


def test_a_decode_step_in_one_call_tells_the_dispatcher_the_routing_it_did_not_see(engine_factory):
    eng = engine_factory()
    prompts = [[3, 4, 5], [9], [20, 21, 22, 23, 24]]
    one, per_layer = _Seeing(eng.dispatcher), _Seeing(eng.dispatcher)
    _decode_logits(eng.model, one, prompts, 4, on=True)
    _decode_logits(eng.model, per_layer, prompts, 4, on=True, whole=False)
    assert one.seen == per_layer.seen
    assert len(one.seen) >= 4 * eng.model.cfg.num_layers


def test_a_decode_step_in_one_call_names_a_pair_routed_to_an_expert_not_held(engine_factory):
    """A bank that lacks an expert its layer's router picks: ValueError naming the layer and pair."""
    from model.batch import Chunk, ForwardBatch
    from model.dispatcher import LocalDispatcher
    from model.experts import ExpertBank

    eng = engine_factory()
    model, full = eng.model, eng.dispatcher.banks
    cfg = model.cfg
    banks = []
    for bank in full:  # every layer's bank without expert 0..15: some pair is routed there
        part = ExpertBank(list(range(16, cfg.num_experts)), cfg.hidden_size, cfg.ffn_hidden_size)
        part.w1.data, part.w2.data = bank.w1.data[16:].clone(), bank.w2.data[16:].clone()
        banks.append(part)
    cache = model.new_cache(16, 4)
    chunks = [Chunk([3 + i], 0, 1, [1 + i], 0) for i in range(12)]
    batch = ForwardBatch.build(chunks, 4, None)
    with pytest.raises(ValueError, match=r"layer \d+ pair \d+ is routed to an expert its bank does not hold"):
        model.forward([batch], LocalDispatcher(banks), cache)


@pytest.mark.parametrize("field", ["token_ids", "positions", "logits_rows"])
def test_a_decode_step_in_one_call_refuses_an_index_out_of_range_by_name(engine_factory, field):
    """A token id past the vocabulary, a position past the rotary tables or a logits row past the
    batch: ValueError naming the field, before anything is read or written."""
    from model.batch import Chunk, ForwardBatch

    eng = engine_factory()
    model, cfg = eng.model, eng.model.cfg
    cache = model.new_cache(8, 4)
    batch = ForwardBatch.build([Chunk([3 + i], 0, 1, [1 + i], 0) for i in range(3)], 4, None)
    bad = {"token_ids": cfg.vocab_size, "positions": cfg.max_position_embeddings, "logits_rows": 3}[field]
    getattr(batch, field)[1] = bad
    before = cache.k.view(torch.int32).clone()  # its bits: a new cache holds whatever was there
    with pytest.raises(ValueError, match=f"{field}: entry 1 is {bad}, out of range"):
        model.forward([batch], eng.dispatcher, cache)
    assert torch.equal(cache.k.view(torch.int32), before)


@pytest.mark.parametrize("F", [8, 13, 64])
def test_swiglu_is_within_float32_rounding_and_its_bits_do_not_depend_on_the_position(F):
    """The C SwiGLU against float64 (its exp within a few ulp of expf, inputs across exp's whole
    range, clamped ends included), and an element computed in the vector loop has the bits of the
    same element computed in the scalar tail."""
    g = torch.Generator().manual_seed(F)
    u = torch.cat([torch.randn(40, 2 * F, generator=g) * 8, torch.randn(4, 2 * F, generator=g) * 60])
    u[0, :F] = torch.linspace(-100, 100, F)
    act = skinny.swiglu(u, F)
    a, b = u[:, :F].double(), u[:, F:].double()
    want = (a / (1 + torch.exp(-a)) * b).float()
    assert act.shape == (44, F)
    assert torch.allclose(act, want, rtol=4e-7, atol=1e-30)
    if F == 13:  # elements 8..12: the scalar tail's here, the vector loop's in a 16-wide call
        wide = torch.cat([u[:, :F], torch.zeros(44, 3), u[:, F:], torch.zeros(44, 3)], 1)
        assert torch.equal(skinny.swiglu(wide, 16)[:, :F], act)


def test_one_call_decode_attention_refuses_out_of_range_indices(engine_factory):
    from model.batch import Chunk, ForwardBatch

    eng = engine_factory()
    model = eng.model
    cache = model.new_cache(4, 4)
    batch = ForwardBatch.build([Chunk([3, 4], 1, 1, [1], 0)], 4, None)
    batch.write_slots = torch.tensor([4 * 4])  # past the cache's last slot
    layer = model.layers[0]
    h = torch.randn(1, model.cfg.hidden_size)
    cos, sin = model.rope_cos[batch.positions], model.rope_sin[batch.positions]
    with torch.inference_mode(), pytest.raises(ValueError, match="write_slots"):
        skinny.decode_attention(layer.attn, h, batch, cos, sin, cache.k[0], cache.v[0], cache.lf[0])


def test_decode_post_is_the_residual_norm_and_router_of_the_torch_layer(engine_factory):
    """o_proj + residual, the post-attention norm and the Attention Router in one C call: the torch
    layer's numbers within float32 rounding and its experts, most probable first."""
    layer = engine_factory().model.layers[1]
    g = torch.Generator().manual_seed(7)
    d = layer.attn.o_proj.weight.shape[0]
    attn_out, x = torch.randn(37, d, generator=g), torch.randn(37, d, generator=g)
    with torch.inference_mode():
        new_x, gn, ids, weights = skinny.decode_post(layer, attn_out, x)
        ref_x = x + torch.nn.functional.linear(attn_out, layer.attn.o_proj.weight)
        ref_g = layer.post_norm(ref_x)
        ref_ids, ref_w = layer.router(ref_g)
        normed = skinny.rms_norm(x, layer.input_norm)
    assert (new_x - ref_x).abs().max().item() < 1e-5 and (gn - ref_g).abs().max().item() < 1e-5
    assert torch.equal(ids, ref_ids)
    assert (weights - ref_w).abs().max().item() < 1e-6
    assert (normed - layer.input_norm(x)).abs().max().item() < 1e-5


def test_a_nan_row_still_gets_valid_distinct_experts_and_leaves_the_other_rows_alone(engine_factory):
    """A broken request (NaN in its hidden state) must not reach outside its row: the router still
    names experts that exist (a pool would refuse others, failing the whole batch), and the other
    rows' results are bit for bit those without it."""
    layer = engine_factory().model.layers[0]
    g = torch.Generator().manual_seed(3)
    d = layer.attn.o_proj.weight.shape[0]
    attn_out, x = torch.randn(4, d, generator=g), torch.randn(4, d, generator=g)
    broken = x.clone()
    broken[2, 5] = float("nan")
    with torch.inference_mode():
        clean = skinny.decode_post(layer, attn_out, x)
        nan = skinny.decode_post(layer, attn_out, broken)
    N, A = layer.router.query.weight.shape[0], layer.router.top_k
    ids = nan[2][2].tolist()
    assert all(0 <= i < N for i in ids) and len(set(ids)) == A
    keep = [0, 1, 3]
    for a, b in zip(clean, nan):
        assert torch.equal(a[keep], b[keep])


# ---- threads: large calls are shared by torch's OpenMP team; the split changes no bit ------------
def _with_threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("rows", [1, 3, 16, 19])
@pytest.mark.parametrize("threads", [2, 3, 7])  # more threads than cores, and splits not a power of 2
def test_threads_give_the_same_bits_as_one(rows, threads):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 512, generator=g)
    w = torch.randn(300, 512, generator=g)  # 153,600 floats: past the size the split starts at
    b = torch.randn(300, generator=g)
    one = _with_threads(1, lambda: skinny.matmul(x, w, b))
    many = _with_threads(threads, lambda: skinny.matmul(x, w, b))
    assert torch.equal(one, many)
    assert (one.double() - _reference(x, w, b)).abs().max().item() < 1e-3


@pytest.mark.parametrize("threads", [2, 3, 7])  # cuts inside experts, at uneven costs
@pytest.mark.parametrize("many", [4, 24], ids=["decode-sized", "a-prefill-group"])
def test_threaded_expert_step_has_the_bits_of_one_thread(threads, many):
    """Decode-sized groups: each thread takes a stretch of the held experts' output rows; with a
    group of MANY_ROWS or more, items handed out. Either way every row is computed once: the bits
    of one thread, every pair's slot written, the others untouched."""
    bank, g = _bank(E=12, d=512, F=256, seed=8)  # w1 per expert [512, 512]
    x, rows, ids, weights, slots = _pairs(bank, g, T=40, R=50, S=60)
    ids[ids == 13] = 20  # an expert no pair uses, between used ones
    ids[:many] = 11  # one expert of more rows (costs more a row), beside ones of few
    counts = torch.bincount(ids - 10, minlength=12)
    assert int(counts.min()) == 0 and (int(counts.max()) >= 12) == (many > 12)  # MANY_ROWS in _skinny.c

    def step():
        out = torch.full((60, 512), 9.0)
        with torch.inference_mode():
            bank.pair_outputs(x, rows, ids, weights, out, slots)
        return out

    one, shared = _with_threads(1, step), _with_threads(threads, step)
    assert torch.equal(one, shared)
    assert not torch.any(shared[slots] == 9.0)
    assert torch.all(shared[[i for i in range(60) if i not in set(slots.tolist())]] == 9.0)
    with skinny.mode(False), torch.inference_mode():  # torch's matmuls: float32 rounding apart
        plain = torch.full((60, 512), 9.0)
        bank.pair_outputs(x, rows, ids, weights, plain, slots)
    assert (shared - plain).abs().max().item() < 1e-4


@pytest.mark.parametrize("heads", [2, 8], ids=["head-dim-128", "head-dim-32"])
def test_c_decode_attention_matches_torch_at_other_head_dims(tmp_path, heads):
    """The C attention over the cache takes a head 64 values at a time (in registers): head dims of
    128 (two passes) and 32 (part of one) give the torch layers' logits and tokens, with sequences
    of different lengths in the batch (the slots each one masks out)."""
    from gateway.engine import local_engine
    from model.checkpoint import write_random_checkpoint
    from model.config import preset

    cfg = preset("small").with_(hidden_size=256, num_heads=heads, num_layers=2, ffn_hidden_size=64)
    cfg = cfg.with_(vocab_size=320)
    eng = local_engine(str(write_random_checkpoint(cfg, tmp_path / f"h{heads}", seed=5)))
    prompts = [[3 + (5 * i + j) % 250 for j in range(1 + 4 * i)] for i in range(5)]
    c_logits, c_tokens = _decode_logits(eng.model, eng.dispatcher, prompts, 6, on=True, whole=False)
    t_logits, t_tokens = _decode_logits(eng.model, eng.dispatcher, prompts, 6, on=False)
    assert (c_logits - t_logits).abs().max().item() < 1e-5
    assert c_tokens == t_tokens


def test_threaded_decode_steps_have_the_bits_of_one_thread(tmp_path):
    """Decode steps of a model wide enough that every C call of the layer is split among threads
    (hidden 512): the logits of 2 threads are those of 1, bit for bit."""
    from gateway.engine import local_engine
    from model.checkpoint import write_random_checkpoint
    from model.config import preset

    cfg = preset("small").with_(num_layers=1, num_experts=4, vocab_size=320)
    eng = local_engine(str(write_random_checkpoint(cfg, tmp_path / "wide", seed=3)))
    prompts = [[1, 2, 3], [7], [40, 41, 42, 43, 44, 45]]
    one = _with_threads(1, lambda: _decode_logits(eng.model, eng.dispatcher, prompts, 5, on=True))
    two = _with_threads(2, lambda: _decode_logits(eng.model, eng.dispatcher, prompts, 5, on=True))
    assert torch.equal(one[0], two[0]) and one[1] == two[1]


def test_threaded_token_loops_have_the_bits_of_one_thread(tmp_path):
    """Enough streams and context that the per-token loops of the C decode layer (rotary, cache
    writes and attention per sequence and head; the Attention Router per token) are shared by the
    threads: the logits and the routing of 2 and 3 threads are those of 1, bit for bit."""
    from gateway.engine import local_engine
    from model.checkpoint import write_random_checkpoint
    from model.config import preset

    cfg = preset("small").with_(num_layers=1, ffn_hidden_size=64, vocab_size=320)  # 32 experts
    eng = local_engine(str(write_random_checkpoint(cfg, tmp_path / "streams", seed=4)))
    prompts = [[3 + (7 * i + j) % 250 for j in range(1 + 3 * i)] for i in range(8)]  # 8 streams
    one = _with_threads(1, lambda: _decode_logits(eng.model, eng.dispatcher, prompts, 4, on=True))
    for n in (2, 3):
        many = _with_threads(n, lambda: _decode_logits(eng.model, eng.dispatcher, prompts, 4, on=True))
        assert torch.equal(one[0], many[0]) and one[1] == many[1], f"{n} threads"


def _os_threads() -> int:
    import os

    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not skinny.threaded(), reason="model._skinny was built without OpenMP")
def test_release_team_ends_this_threads_openmp_workers():
    """The thread that loaded a model lets its OpenMP workers go, so that the engine thread's team
    is the only one (libgomp stops spin-waiting when teams outnumber the CPUs)."""
    import time

    x, w = torch.randn(4, 512), torch.randn(1024, 512)
    _with_threads(3, lambda: skinny.matmul(x, w))  # a team of 3 on this thread: 2 workers
    with_team = _os_threads()
    assert skinny.release_team()
    deadline = time.monotonic() + 5
    while _os_threads() > with_team - 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _os_threads() <= with_team - 2, "the two workers of this thread's team exited"
    y = _with_threads(3, lambda: skinny.matmul(x, w))  # a later region makes a new team
    assert torch.equal(y, skinny.matmul(x, w))


@pytest.mark.parametrize("T", [1, 5, 40, 200, 1500])  # 1500 tokens over 6 experts: groups past 256 rows
@pytest.mark.parametrize("threads", [1, 2])
def test_bank_forward_in_two_calls_has_the_bits_of_pair_outputs_and_sum_slots(T, threads):
    """The in-process expert step (`ExpertBank.forward`: `bank_forward` when groups are
    decode-sized) against the pools' road (`pair_outputs` into slots, `sum_slots`), bit for bit,
    with some pairs held elsewhere (-1: they add nothing)."""
    from model.experts import sum_slots

    bank, g = _bank(E=6, d=512, F=256, seed=T)
    x = torch.randn(T, 512, generator=g)
    ids = torch.tensor(bank.expert_ids)[torch.randint(0, 6, (T, 2), generator=g)]
    ids[torch.rand(T, 2, generator=g) < 0.2] = -1
    weights = torch.rand(T, 2, generator=g)
    calls = []
    real = skinny.bank_forward

    def counted(*a):
        out = real(*a)
        calls.append(out is not None)
        return out

    with torch.inference_mode():
        skinny.bank_forward = counted
        try:
            got = _with_threads(threads, lambda: bank(x, ids, weights))
        finally:
            skinny.bank_forward = real
        flat = ids.reshape(-1)
        pairs = (flat >= 0).nonzero().squeeze(1)
        slots = torch.zeros(T * 2, 512)
        bank.pair_outputs(x, pairs // 2, flat[pairs], weights.reshape(-1)[pairs], slots, pairs)
        want = sum_slots(slots.view(T, 2, 512))
    biggest = int(torch.bincount(ids[ids >= 0]).max()) if T else 0
    grouped = biggest <= skinny.EXPERT_MAX_ROWS
    assert calls == [grouped], "two C calls up to EXPERT_MAX_ROWS rows an expert, the per-expert path past it"
    assert grouped == (T < 1000)  # both roads taken
    assert torch.equal(got, want)


def test_bank_forward_names_a_pair_routed_to_an_expert_not_held():
    bank, g = _bank()
    x = torch.randn(3, 64, generator=g)
    with torch.inference_mode(), pytest.raises(ValueError, match="pair 4 is routed to expert 3"):
        bank(x, torch.tensor([[10, 11], [12, 13], [3, 14]]), torch.ones(3, 2))
    with torch.inference_mode(), pytest.raises(ValueError, match="pair 1 is routed to expert 99"):
        bank(x, torch.tensor([[10, 99], [12, 13], [11, 14]]), torch.ones(3, 2))
