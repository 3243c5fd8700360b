"""Batch-invariant mode: a token's numbers do not depend on what else is in its forward.

Without it, greedy output can depend on the batch: a 400-token greedy stream left its solo run at
token 323 in batches of 4 to 32. Where the bits come from (torch 2.13 CPU, measured here):
- a row of `F.linear` has the same bits for any row count from 12 up (2 threads; from 4 with one),
  but other bits with fewer rows (matrix-vector and small-matrix kernels); a batched matmul over one
  row differs from the same row among many;
- row-wise reductions (RMSNorm's mean, softmax) and elementwise ops are the same for any row count.
So in this mode every matmul over rows runs with at least `MIN_ROWS` rows (zero rows padded in and
dropped after), and attention runs each query over exactly its own keys (positions 0..p), one small
matmul per query: its shape then depends on nothing but the query's position, which also makes a
prompt's bits independent of how it is chunked. The cost is measured in docs/PERFORMANCE.md.

The mode is a process-wide switch (`enabled`): the engine turns it on around its forwards
(`mode`), and an expert pool for its whole life.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from model import skinny

MIN_ROWS = 16
_enabled = False


def enabled() -> bool:
    return _enabled


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = bool(on)


@contextmanager
def mode(on: bool):
    """Batch-invariant (or not) inside the block; the previous setting after it."""
    before = _enabled
    set_enabled(on)
    try:
        yield
    finally:
        set_enabled(before)


def _padded(x: torch.Tensor) -> torch.Tensor:
    pad = x.new_zeros(MIN_ROWS - x.shape[0], *x.shape[1:])
    return torch.cat([x, pad])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` over rows `x` `[M, K]`; in this mode with at least `MIN_ROWS` rows. Outside it,
    few rows on the CPU go to `model.skinny`."""
    M = x.shape[0]
    if not _enabled:
        return skinny.matmul(x, weight, bias) if skinny.fits(x, weight) else F.linear(x, weight, bias)
    if M >= MIN_ROWS or M == 0:
        return F.linear(x, weight, bias)
    return F.linear(_padded(x), weight, bias)[:M]


def linear_into(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """out = x @ weight.T (no bias) written into `out`, as `linear` computes it."""
    M = x.shape[0]
    if not _enabled and skinny.fits(x, weight) and out.stride(1) == 1:
        skinny.matmul(x, weight, out=out)
    elif not _enabled or M >= MIN_ROWS:
        torch.mm(x, weight.t(), out=out)
    else:
        out.copy_(F.linear(_padded(x), weight)[:M])


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`torch.matmul` of batches `[M, n, k] x [M, k, m]`; in this mode with at least `MIN_ROWS` of them."""
    M = a.shape[0]
    if not _enabled or M >= MIN_ROWS or M == 0:
        return torch.matmul(a, b)
    return torch.matmul(_padded(a), _padded(b))[:M]
