"""The memory-bandwidth bound of a decode step, and how near a measured rate comes to it.

A decode step of B streams must read the gateway's weights (everything but the embedding table, of
which it reads B rows; the LM head whole), every expert its batch touches in every layer, and the
K/V of every stream's context. On a CPU (and on a GPU at small batch) that, divided by the machine's
read bandwidth, bounds the step's time from below: tokens/s <= B * bandwidth / bytes per step.

Beside it, the step's multiply-adds over the machine's measured matmul rate (`step_flops`,
`matmul_gflops`): with many streams a CPU step is also that much compute, and where the two cannot
overlap (two cores, both busy), their sum bounds it better than either (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import time

import torch

from model.pages import huge_empty
from model.transformer import YuanModel


def huge_buffer(mbytes: int) -> torch.Tensor:
    """`mbytes` MiB of float32 ones, in huge pages where the OS gives them (`model.pages`)."""
    region = huge_empty(mbytes << 20)
    x = region.view(torch.float32) if region is not None else torch.empty((mbytes << 20) // 4)
    return x.fill_(1.0)


def read_bandwidth_gbs(mbytes: int = 256, reps: int = 7) -> float:
    """This machine's read bandwidth as torch sees it (all its threads): the best of `reps` sums
    over a buffer far larger than the caches, in GB/s (1e9 bytes). The buffer is in huge pages
    where the OS gives them, as the loaded weights are (`model.pages`): reading is faster from
    them, so the bound is too."""
    x = huge_buffer(mbytes)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def matmul_gflops(n: int = 768, reps: int = 5) -> float:
    """This machine's float32 matmul rate as torch sees it (all its threads): the best of `reps`
    `[n, n] @ [n, n]` with warm operands, in GFLOP/s (1e9)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def step_flops(model: YuanModel, batch: int, context: float) -> float:
    """Floating-point operations (2 a multiply-add) of one decode step of `batch` streams: every
    gateway weight matrix once a token (the LM head included, the embedding table not), `top_k`
    experts a token in every layer, and attention over `context` positions (q.k and p.v)."""
    cfg, macs = model.cfg, 0
    for name, p in model.named_parameters():
        if p.dim() >= 2 and name != "embed.weight":
            macs += p.numel()
    if cfg.tie_word_embeddings:
        macs += model.embed.weight.numel()
    macs += cfg.num_layers * cfg.top_k * 3 * cfg.hidden_size * cfg.ffn_hidden_size
    macs += cfg.num_layers * 2 * context * cfg.hidden_size
    return 2.0 * batch * macs


def gateway_bytes(model: YuanModel, batch: int) -> int:
    """Weights a decode step reads outside the experts: all but the embedding table, plus its
    `batch` rows (the LM head counted whole, tied to the table or not)."""
    cfg, total = model.cfg, 0
    for name, p in model.named_parameters():
        if name != "embed.weight":
            total += p.numel() * p.element_size()
    emb = model.embed.weight
    if cfg.tie_word_embeddings:
        total += emb.numel() * emb.element_size()
    return total + batch * emb.shape[1] * emb.element_size()


def expert_bytes(model: YuanModel) -> int:
    """One expert of one layer: w1 `[2F, d]` and w2 `[d, F]`."""
    cfg = model.cfg
    return 3 * cfg.hidden_size * cfg.ffn_hidden_size * model.embed.weight.element_size()


def step_bytes(model: YuanModel, batch: int, experts_touched_per_layer: float, context: float) -> float:
    """Bytes one decode step of `batch` streams must read, `context` tokens of K/V each."""
    cfg = model.cfg
    kv = batch * context * cfg.num_layers * 2 * cfg.hidden_size * model.embed.weight.element_size()
    return gateway_bytes(model, batch) + cfg.num_layers * experts_touched_per_layer * expert_bytes(model) + kv


def experts_touched(routed: list[torch.Tensor], rows: int) -> float:
    """Distinct experts a layer's expert step touched, on average over the calls of `rows` rows
    (`routed`: each call's expert ids `[T, A]`); over every call where none had that many, 0 for none."""
    per_call = [(ids.shape[0], int(torch.unique(ids).numel())) for ids in routed]
    calls = [n for r, n in per_call if r == rows] or [n for _, n in per_call]
    return sum(calls) / max(1, len(calls))


def step_seconds(
    model: YuanModel, batch: int, touched: float, context: float, bandwidth_gbs: float, gflops: float
) -> dict[str, float]:
    """A decode step's bytes (`step_bytes`) and operations (`step_flops`), and the seconds each takes
    at the measured read bandwidth and matmul rate."""
    nbytes, flops = step_bytes(model, batch, touched, context), step_flops(model, batch, context)
    return {
        "bytes": nbytes,
        "flops": flops,
        "memory_s": nbytes / (bandwidth_gbs * 1e9),
        "compute_s": flops / (gflops * 1e9),
    }


def bound_tokens_per_s(bytes_per_step: float, batch: int, bandwidth_gbs: float) -> float:
    return batch * bandwidth_gbs * 1e9 / bytes_per_step
