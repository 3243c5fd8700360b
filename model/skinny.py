"""Skinny matmuls: `x @ w.T (+ b)` for few rows of x, on the CPU, by `model/_skinny.c`.

Decode steps are made of them: one row per stream for attention, the router and the LM head, and
a few rows per expert (a 32-stream batch gives each of ~22 experts ~3 rows). Such a product should
run at the speed its weights stream from memory; torch's CPU kernel reaches about half of that at
1-8 rows on this machine and this kernel most of it (docs/PERFORMANCE.md, "Skinny matmuls").
Up to `MAX_ROWS` rows (a 32-stream step's LM head, a short prompt's chunk) it is also faster than
torch's blocked kernel here, cold or warm, on one thread or two; above, torch's is as fast or
faster, so `fits` says no and the caller uses torch.

Every output element is computed by the same operations whatever the row count, so a row's bits
do not depend on the rest of the batch (the kernel's comment says how).

`matmul` takes float32 or bfloat16 (the released model's dtype): bfloat16 weights widen to float32
as they stream, the sums are float32 and round to bfloat16 once, as torch's CPU kernel does, and
half the bytes come from memory. The larger calls below are float32 only.

Threads: every call passes `torch.get_num_threads()`; a call over at least 64K floats of weights is
cut into ranges of output rows (experts: pieces of each expert's matmul) shared by that many
OpenMP threads, the team torch's own parallel regions run on (the module links the libgomp torch
loaded, so no second pool of threads spins against torch's). The split changes no bit (tested);
the gateway and pools run one thread each, the in-process engine torch's default (all cores).

Built on the same kernel, larger calls that take a decode step's torch calls away: the expert step
over routed pairs (`group` + `expert_pairs`, three calls a layer) and, for a step of one-token
chunks, the rest of the layer (`rms_norm`, `decode_attention` for the attention half, `decode_post`
for o_proj, the residual, the post norm and the router). Callers: `model.invariant` (matmuls),
`model.experts` and `model.transformer` (`DecoderLayer.decode_step`); batch-invariant mode uses none of this
(torch, with at least 16 rows per matmul). Off with `YUAN_SERVE_SKINNY=0` in the environment or
`set_enabled(False)` (benchmarks compare both).
"""

from __future__ import annotations

import os
import weakref
from contextlib import contextmanager

import torch

try:
    from model import _skinny
except ImportError:  # not built (a source checkout without `pip install`): torch does it all
    _skinny = None

MAX_ROWS = 64  # at and below this many rows the kernel is faster than torch's here (measured)

_available = bool(_skinny is not None and _skinny.available())
_enabled = _available and os.environ.get("YUAN_SERVE_SKINNY", "1") != "0"


def available() -> bool:
    """Whether the kernel is built and this CPU runs it (x86-64 with AVX2 and FMA)."""
    return _available


def threaded() -> bool:
    """Whether calls over at least 64K floats of weights are shared by torch's threads (the module
    was built with OpenMP; it runs on the team torch's own parallel regions use)."""
    return bool(_available and _skinny.openmp())


def release_team() -> bool:
    """Free the calling thread's OpenMP team, so that the thread that runs engine steps has the
    process's only one (call it from the others, e.g. the one that loaded the model). libgomp keeps
    a team of workers per thread that ever ran a parallel region, and when its threads outnumber the
    CPUs it stops spin-waiting between regions: every region then pays a futex wake-up. Measured
    on this 2-core box with 2 threads: 1-stream decode on the Gateway's engine thread 8.0 ms a
    step with the loading thread's team alive, 3.8 ms after this (docs/PERFORMANCE.md). Torch's
    own parallel regions run on the same teams (the module links torch's libgomp). Does nothing
    (False) without the OpenMP build or inside a parallel region; a later parallel region on this
    thread makes a new team."""
    return bool(_skinny is not None and _skinny.release_team())


def enabled() -> bool:
    return _enabled


def set_enabled(on: bool) -> None:
    """Use the kernel where it fits (only if `available`)."""
    global _enabled
    _enabled = bool(on) and _available


@contextmanager
def mode(on: bool):
    before = _enabled
    set_enabled(on)
    try:
        yield
    finally:
        set_enabled(before)


_WEIGHT_TYPES = (torch.float32, torch.bfloat16)  # x, weight (and bias, out) all of one of these


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `x @ weight.T` runs here: enabled, CPU float32 or bfloat16 (both of one), 1..MAX_ROWS
    rows of x with unit column stride, `weight` `[N, K]` contiguous with K a multiple of 8."""
    return (
        _enabled
        and x.dtype in _WEIGHT_TYPES
        and weight.dtype is x.dtype
        and x.device.type == "cpu"
        and x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and x.stride(1) == 1
        and weight.is_contiguous()
        and weight.shape[1] % 8 == 0
        and x.shape[1] == weight.shape[1]
        and not (weight.requires_grad and torch.is_grad_enabled())  # no autograd through C
    )


def matmul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`x @ weight.T (+ bias)` into `out` (new when None; rows with unit column stride), for
    tensors that `fits`. bfloat16 sums in float32 and rounds once, as torch's CPU kernel does, and
    reads half the bytes (docs/PERFORMANCE.md)."""
    M, K = x.shape
    N = weight.shape[0]
    dtype = x.dtype
    if out is None:
        out = torch.empty(M, N, dtype=dtype)
    elif out.shape != (M, N) or out.dtype is not dtype or out.stride(1) != 1:
        raise ValueError(f"out: expected {dtype} [{M}, {N}] rows, got {out.dtype} {list(out.shape)}")
    b = 0
    if bias is not None:
        if bias.dtype is not dtype or not bias.is_contiguous() or bias.shape != (N,):
            raise ValueError(f"bias: expected contiguous {dtype} [{N}], got {bias.dtype} {list(bias.shape)}")
        b = bias.data_ptr()
    ldx, ldy = (x.stride(0), out.stride(0)) if M > 1 else (K, N)  # one row: its stride is unused
    threads = torch.get_num_threads()
    bf16 = dtype is torch.bfloat16
    _skinny.matmul(x.data_ptr(), ldx, weight.data_ptr(), b, out.data_ptr(), ldy, M, N, K, threads, bf16)
    return out


# ---- the expert step over routed pairs ----------------------------------------------------------
EXPERT_MAX_ROWS = 256  # an expert's rows up to which the grouped call is used (a default prefill
# chunk's most, `max_num_batched_tokens`): experts of 12+ rows run the many-row kernel in it, and it
# saves two calls an expert and the bookkeeping between them (prefills 1.1-1.28x over the per-expert
# road, docs/PERFORMANCE.md); larger groups take that road (torch's blocked kernel past 64 rows).


def experts_fit(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, out: torch.Tensor | None = None) -> bool:
    """Whether `expert_pairs` (with `out`) or `bank_forward` (a new output) runs here: enabled, CPU
    float32, x and out rows with unit column stride, stacked weights contiguous with both inner
    sizes multiples of 8."""
    return (
        _enabled
        and x.dtype is torch.float32
        and w1.dtype is torch.float32
        and (out is None or (out.dtype is torch.float32 and out.stride(1) == 1))
        and x.device.type == "cpu"
        and x.dim() == 2
        and x.stride(1) == 1
        and w1.is_contiguous()
        and w2.is_contiguous()
        and w2.dtype is torch.float32
        and x.shape[1] % 8 == 0
        and w2.shape[2] % 8 == 0
        and not ((w1.requires_grad or w2.requires_grad) and torch.is_grad_enabled())
    )


def group(local: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pairs grouped by expert, stably: (order `[R]`, counts `[E]`, the largest count). `local`
    int64 `[R]`, each in [0, num_experts); ValueError names the first pair that is not."""
    local = local.contiguous()
    order = torch.empty_like(local)
    counts = torch.empty(num_experts, dtype=torch.long)
    biggest = _skinny.group(local.data_ptr(), local.numel(), num_experts, order.data_ptr(), counts.data_ptr())
    return order, counts, biggest


def swiglu(u: torch.Tensor, ffn: int) -> torch.Tensor:
    """`silu(u[:, :F]) * u[:, F:]` `[R, F]` for u `[R, 2F]`. On the CPU in float32 (u contiguous) it
    is one C loop with this module's vectorised exp (~2 ulp of expf), which every CPU expert road
    uses (the in-process step, the pools' pairs, the grouped torch path), so they keep the same
    bits; elsewhere, or with the kernel off, torch's `silu` and `mul`."""
    if (
        _enabled
        and u.dtype is torch.float32
        and u.device.type == "cpu"
        and u.dim() == 2
        and u.is_contiguous()
        and u.shape[1] == 2 * ffn
        and not (u.requires_grad and torch.is_grad_enabled())
    ):
        act = torch.empty(u.shape[0], ffn)
        _skinny.swiglu(u.data_ptr(), u.shape[0], ffn, act.data_ptr(), torch.get_num_threads())
        return act
    return torch.nn.functional.silu(u[:, :ffn]).mul_(u[:, ffn:])


def expert_pairs(
    x: torch.Tensor,
    rows: torch.Tensor,
    order: torch.Tensor,
    counts: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    out: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """out[slots[i]] = weights[i] * w2[e] (silu(u[:F]) * u[F:]), u = w1[e] x[rows[i]], for every
    pair i, e its expert, in `group`'s order: one call for all up-projections, `swiglu` over all
    rows, one call for all down-projections with the weighting and the
    scatter into `out`. For tensors that `experts_fit`; rows and slots are checked in range."""
    rows, slots = rows.contiguous(), slots.contiguous()
    weights = weights.to(torch.float32).contiguous()
    E, F2, K = w1.shape
    R, threads = order.numel(), torch.get_num_threads()
    u = torch.empty(R, F2)
    _skinny.expert_up(
        x.data_ptr(), x.stride(0), x.shape[0], rows.data_ptr(), order.data_ptr(), counts.data_ptr(),
        E, w1.data_ptr(), F2, K, u.data_ptr(), threads,
    )  # fmt: skip
    act = swiglu(u, F2 // 2)  # [R, F]
    D, F_ = w2.shape[1], F2 // 2
    _skinny.expert_down(
        act.data_ptr(), order.data_ptr(), counts.data_ptr(), E, w2.data_ptr(), D, F_,
        weights.data_ptr(), slots.data_ptr(), out.shape[0], out.data_ptr(), out.stride(0), threads,
    )  # fmt: skip


def bank_forward(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    lookup: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor | None:
    """`ExpertBank.forward` in two C calls and `swiglu`, for tensors that `experts_fit`: the
    held pairs of the `[T, A]` routing grouped by expert and their up-projections (`bank_up`), the
    activation, then the down-projections, the weighting and each token's sum of its A slots in `a`
    order (`bank_down`). The same bits as `pair_outputs` + `sum_slots` (the same kernel and adds);
    what it saves is the bookkeeping between them (~20 torch calls a layer). None, having computed
    nothing, when an expert has more than `EXPERT_MAX_ROWS` rows (the caller's grouped torch path
    takes those). ValueError names a pair routed to an expert the bank does not hold."""
    T, A = expert_ids.shape
    E, F2, K = w1.shape
    D, F_ = w2.shape[1], F2 // 2
    ids = expert_ids.reshape(-1).contiguous()
    weights = weights.reshape(-1).to(torch.float32).contiguous()
    u = torch.empty(T * A, F2)
    order, counts = torch.empty(T * A, dtype=torch.long), torch.empty(E, dtype=torch.long)
    threads = torch.get_num_threads()
    biggest, R = _skinny.bank_up(
        x.data_ptr(), x.stride(0), T, A, ids.data_ptr(), lookup.data_ptr(), lookup.numel(), E,
        w1.data_ptr(), F2, K, u.data_ptr(), order.data_ptr(), counts.data_ptr(), EXPERT_MAX_ROWS, threads,
    )  # fmt: skip
    if biggest > EXPERT_MAX_ROWS:
        return None
    act = swiglu(u[:R], F_)  # [R, F]
    out = torch.empty(T, D)
    _skinny.bank_down(
        act.data_ptr(), order.data_ptr(), counts.data_ptr(), E, w2.data_ptr(), D, F_,
        weights.data_ptr(), T, A, out.data_ptr(), threads,
    )  # fmt: skip
    return out


# ---- one decode step of a layer's LF attention ----------------------------------------------------
DECODE_LAYER = True  # whether decode steps run their layers in C calls (benchmarks compare both)


def decode_fits(h: torch.Tensor, batch, k_cache: torch.Tensor, num_heads: int) -> bool:
    """Whether `decode_attention` runs here: enabled, a batch of one-token chunks only, CPU float32
    throughout, hidden a multiple of 16 and head dim a multiple of 8 (up to 512)."""
    d = h.shape[1]
    return (
        _enabled
        and DECODE_LAYER
        and isinstance(batch.decode_rows, slice)
        and batch.decode_slots.numel() > 0
        and h.dtype is torch.float32
        and k_cache.dtype is torch.float32
        and h.device.type == "cpu"
        and h.is_contiguous()
        and d % 16 == 0
        and (d // num_heads) % 8 == 0
        and d // num_heads <= 512
        and not torch.is_grad_enabled()
    )


def decode_attention(attn, h, batch, cos, sin, k_cache, v_cache, lf_cache) -> torch.Tensor:
    """`LFAttention.forward` (h the normed input) for a batch that `decode_fits`, up to o_proj,
    in one C call: the LF convolutions from each sequence's cached state, its RMSNorm, q|k and v,
    rotary, the K/V and LF state writes, and attention over each sequence's cached keys. The
    matmuls are this module's kernel (the bits of the torch path's, which uses it for these row
    counts); the norm, rotary and softmax are written out in C, so their last bits may differ from
    torch's (the golden fixtures are the judge). Returns the attention output `[B, d]`."""
    lf = attn.lf
    B, d = h.shape
    H = attn.num_heads
    out = torch.empty(B, d)
    cos, sin = cos.contiguous(), sin.contiguous()
    slots, mask = batch.decode_slots.contiguous(), batch.decode_mask.contiguous()
    has_prev = batch.has_prev.contiguous()
    ptrs = (
        h.data_ptr(),
        lf_cache.data_ptr(),
        lf._w1.get(lf.conv1_weight).data_ptr(),
        lf.conv1_bias.data_ptr(),
        lf._w2.get(lf.conv2_weight).data_ptr(),
        lf.conv2_bias.data_ptr(),
        lf.norm.weight.data_ptr(),
        attn._wqk.get(attn.q_proj.weight, attn.k_proj.weight).data_ptr(),
        attn.v_proj.weight.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        out.data_ptr(),
        batch.lf_read.data_ptr(),
        batch.lf_blocks.data_ptr(),
        batch.write_slots.data_ptr(),
        slots.data_ptr(),
        has_prev.data_ptr(),
        mask.data_ptr(),
    )
    sizes = (B, d, H, d // H, k_cache.shape[1], slots.shape[1], lf_cache.shape[0])
    _skinny.decode_attention(ptrs, sizes, lf.norm.eps, torch.get_num_threads())
    return out


def rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """`norm(x)` (an `RMSNorm`) for contiguous CPU float32 rows, in one C call."""
    out = torch.empty_like(x)
    _skinny.rms_norm(x.data_ptr(), norm.weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], norm.eps)
    return out


def decode_post(layer, attn_out: torch.Tensor, x: torch.Tensor):
    """The rest of a decode step's layer up to its expert step, in one C call: the residual stream
    `x + o_proj(attn_out)`, its post-attention RMSNorm g, and the Attention Router's choices for g.
    Returns (new x `[B, d]`, g `[B, d]`, expert ids `[B, A]`, weights `[B, A]`), as
    `DecoderLayer.submit_moe` computes them (the router's softmaxes written out in C)."""
    router = layer.router
    B, d = x.shape
    N, A = router.query.weight.shape[0], router.top_k
    wqkv = router._wqkv.get(router.query.weight, router.key.weight, router.value.weight)
    x_out, g = torch.empty(B, d), torch.empty(B, d)
    ids, weights = torch.empty(B, A, dtype=torch.long), torch.empty(B, A)
    ptrs = (
        attn_out.data_ptr(),
        x.data_ptr(),
        layer.attn.o_proj.weight.data_ptr(),
        layer.post_norm.weight.data_ptr(),
        wqkv.data_ptr(),
        x_out.data_ptr(),
        g.data_ptr(),
        weights.data_ptr(),
        ids.data_ptr(),
    )
    sizes = (B, d, N, A, int(router.norm_topk_prob))
    _skinny.decode_post(ptrs, sizes, layer.post_norm.eps, torch.get_num_threads())
    return x_out, g, ids, weights


# ---- a whole decode step's layers in one call (the in-process engine) ---------------------------
DECODE_STEP = True  # whether in-process decode steps run all layers in one call (benchmarks compare)
LAYER_PTRS = 19  # `_skinny.c`'s table row: the pointers and sizes `decode_layers` reads per layer


class DecodeTable:
    """What `decode_layers` reads of each layer, as one int64 `[layers, LAYER_PTRS]` tensor of
    pointers (and a float32 `[layers, 3]` of its norms' eps), one per cache (so engines sharing a
    model each have theirs), built at a cache's first step and again only when something behind it
    changed: a weight written in place (the derived stacked weights then differ) or given new
    storage (`.to()`, `.data =`), or another bank. It keeps the derived weights it points at, and
    whether the model and banks can run a step in one call at all (`fits`)."""

    def __init__(self) -> None:
        self._by_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, model, x: torch.Tensor, banks: list, cache) -> _TableEntry:
        """The entry for `model`'s layers over `banks` and `cache` (x: a decode part that
        `decode_fits`, whose dtype and layout every later one shares)."""
        entry = self._by_cache.get(cache)
        if entry is None or entry.stale(banks):
            entry = self._by_cache[cache] = _TableEntry(model, x, banks, cache)
        return entry


class _TableEntry:
    def __init__(self, model, x: torch.Tensor, banks: list, cache) -> None:
        from model.attention_router import AttentionRouter

        # Every layer has the Attention Router and a bank that `experts_fit` (x's side of that is
        # the same in every part that `decode_fits`): else no one call, until the banks change.
        self.fits = (
            len(banks) == len(model.layers)
            and all(
                isinstance(layer.router, AttentionRouter) and experts_fit(x, bank.w1, bank.w2)
                for layer, bank in zip(model.layers, banks)
            )
            and _ends_fit(model)
        )
        self.banks, self.cache = list(banks), weakref.ref(cache)
        # what the key follows: every tensor the table points at or was built from (new storage
        # moves it), and of those the ones copied into derived weights (an in-place write then
        # needs a rebuild; one to a tensor the table points at is read as it is)
        self.sources = [w for bank in banks for w in (bank.w1, bank.w2)]
        self.copied: list[torch.Tensor] = []
        self.table = self.eps = None
        self.keep: list[torch.Tensor] = []
        if self.fits:
            self._build(model, banks, cache)
        self.key = self._key(cache)

    def _build(self, model, banks: list, cache) -> None:
        rows, eps, sources, copied, keep = [], [], [], [], []
        for i, (layer, bank) in enumerate(zip(model.layers, banks)):
            attn, lf, router = layer.attn, layer.attn.lf, layer.router
            sources += [
                layer.input_norm.weight, lf.conv1_weight, lf.conv1_bias, lf.conv2_weight, lf.conv2_bias,
                lf.norm.weight, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                attn.o_proj.weight, layer.post_norm.weight, router.query.weight, router.key.weight,
                router.value.weight, bank.w1, bank.w2, bank.local_index,
            ]  # fmt: skip
            derive = [  # each derived weight and the weights copied into it
                (lf._w1, (lf.conv1_weight,)),
                (lf._w2, (lf.conv2_weight,)),
                (attn._wqk, (attn.q_proj.weight, attn.k_proj.weight)),
                (router._wqkv, (router.query.weight, router.key.weight, router.value.weight)),
            ]
            derived = [d.get(*of) for d, of in derive]
            copied += [w for _, of in derive for w in of]
            keep += derived
            rows.append([
                layer.input_norm.weight.data_ptr(),
                derived[0].data_ptr(),
                lf.conv1_bias.data_ptr(),
                derived[1].data_ptr(),
                lf.conv2_bias.data_ptr(),
                lf.norm.weight.data_ptr(),
                derived[2].data_ptr(),
                attn.v_proj.weight.data_ptr(),
                attn.o_proj.weight.data_ptr(),
                layer.post_norm.weight.data_ptr(),
                derived[3].data_ptr(),
                bank.w1.data_ptr(),
                bank.w2.data_ptr(),
                bank.local_index.data_ptr(),
                cache.k[i].data_ptr(),
                cache.v[i].data_ptr(),
                cache.lf[i].data_ptr(),
                bank.local_index.numel(),
                bank.w1.shape[0],
            ])  # fmt: skip
            eps.append([layer.input_norm.eps, lf.norm.eps, layer.post_norm.eps])
        # the step's ends: the embedding and rotary rows in, the final norm and the LM head out
        ends = _ends(model)
        sources += ends
        self.ends = tuple(t.data_ptr() for t in ends)
        self.sizes = (model.embed.weight.shape[0], model.lm_head.weight.shape[0], model.rope_cos.shape[0])
        self.norm_eps = model.norm.eps
        self.table = torch.tensor(rows, dtype=torch.long).reshape(-1, LAYER_PTRS)
        self.eps = torch.tensor(eps, dtype=torch.float32).reshape(-1, 3)
        self.experts = max((b.w1.shape[0] for b in banks), default=1)
        self.sources, self.copied, self.keep = sources, copied, keep

    def _key(self, cache) -> tuple:
        return (
            cache.k.data_ptr(),
            cache.v.data_ptr(),
            cache.lf.data_ptr(),
            tuple(map(torch.Tensor.data_ptr, self.sources)),
            tuple(t._version for t in self.copied),
        )

    def stale(self, banks: list) -> bool:
        cache = self.cache()
        return (
            cache is None
            or len(banks) != len(self.banks)
            or any(a is not b for a, b in zip(banks, self.banks))
            or self._key(cache) != self.key
        )


def _ends(model) -> list[torch.Tensor]:
    """What a step's ends read, in `decode_layers`' order: the embedding, the rotary tables, the
    final norm's weight and the LM head."""
    return [model.embed.weight, model.rope_cos, model.rope_sin, model.norm.weight, model.lm_head.weight]


def _ends_fit(model) -> bool:
    """Whether `decode_layers` can take a step's ends for `model`: float32 CPU embedding, rotary
    tables, final norm and LM head, contiguous, the LM head as wide as the hidden size."""
    ends = _ends(model)
    return all(t.dtype is torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in ends) and (
        model.lm_head.weight.shape[1] == model.embed.weight.shape[1]
    )


def one_call_table(model, batch, banks: list, cache) -> _TableEntry | None:
    """The table a decode step runs with in one `decode_layers` call; None when it cannot: a batch
    of one-token chunks that `decode_fits` (its x are rows of the embedding table, whose dtype,
    device and width the table stands for), at most `EXPERT_MAX_ROWS` of them (so no expert gets
    more rows and no layer needs the grouped torch path) and at most `MAX_ROWS` (the matmuls the
    per-layer calls run with this kernel), and a model and banks that fit."""
    embed = model.embed.weight
    if (
        not DECODE_STEP
        or batch.token_ids.shape[0] > min(EXPERT_MAX_ROWS, MAX_ROWS)
        or not decode_fits(embed, batch, cache.k[0], model.cfg.num_heads)
    ):
        return None
    entry = model.decode_table.get(model, embed, banks, cache)
    return entry if entry.fits else None


def decode_layers(
    model, entry: _TableEntry, batch, cache, routing: torch.Tensor | None = None
) -> torch.Tensor:
    """A decode step in one C call, for a batch that `one_call_table` gives `entry` for: x from the
    embedding rows of its tokens, every layer in the per-layer calls' operations and order
    (`rms_norm`, `decode_attention`, `decode_post`, `bank_forward`, each one's expert step over its
    bank in this process), then the final norm and the LM head of `batch.logits_rows` as `rms_norm`
    and `matmul` compute them: the same bits, without Python or torch between them. `routing`
    (int64 `[layers, B, A]`, contiguous) gets each layer's expert ids. Returns logits `[R, V]`."""
    table, eps, experts = entry.table, entry.eps, entry.experts
    cfg = model.cfg
    B, d = batch.token_ids.shape[0], cfg.hidden_size
    slots, mask = batch.decode_slots.contiguous(), batch.decode_mask.contiguous()
    has_prev, rows = batch.has_prev.contiguous(), batch.logits_rows.contiguous()
    token_ids, positions = batch.token_ids.contiguous(), batch.positions.contiguous()
    vocab, V, max_pos = entry.sizes
    logits = torch.empty(rows.shape[0], V, dtype=torch.float32)
    step = (
        batch.lf_read.data_ptr(), batch.lf_blocks.data_ptr(), batch.write_slots.data_ptr(), slots.data_ptr(),
        has_prev.data_ptr(), mask.data_ptr(),
    )  # fmt: skip
    H = cfg.num_heads
    sizes = (
        B, d, H, d // H, cache.k.shape[2], slots.shape[1], cache.lf.shape[1], cfg.num_experts, cfg.top_k,
        int(cfg.norm_topk_prob), cfg.ffn_hidden_size,
    )  # fmt: skip
    if routing is not None and (
        routing.dtype is not torch.long or routing.shape != (table.shape[0], B, cfg.top_k)
    ):
        raise ValueError(f"routing: expected int64 [{table.shape[0]}, {B}, {cfg.top_k}]")
    model_args = (
        table.data_ptr(),
        eps.data_ptr(),
        table.shape[0],
        experts,
        0 if routing is None else routing.data_ptr(),
    )
    ends = (token_ids.data_ptr(), positions.data_ptr(), rows.data_ptr(), *entry.ends, logits.data_ptr())
    ends_sizes = (rows.shape[0], vocab, V, max_pos)
    _skinny.decode_layers(model_args, step, sizes, ends, ends_sizes, entry.norm_eps, torch.get_num_threads())
    return logits
