"""Skinny matmuls: `x @ w.T (+ b)` for few rows of x, on the CPU in float32, by `model/_skinny.c`.

Decode steps are made of them: one row per stream for attention, the router and the LM head, and
a few rows per expert (a 32-stream batch gives each of ~22 experts ~3 rows). Such a product should
run at the speed its weights stream from memory; torch's CPU kernel reaches about half of that at
1-8 rows on this machine and this kernel most of it (docs/PERFORMANCE.md, "Skinny matmuls").
Above `MAX_ROWS` rows the product is compute-bound and torch's blocked kernel is as fast or faster,
so `fits` says no and the caller uses torch.

Every output element is computed by the same operations whatever the row count, so a row's bits
do not depend on the rest of the batch (the kernel's comment says how). `model.invariant` is the
one caller; batch-invariant mode keeps its own rule (torch with at least 16 rows).
Off with `YUAN_SERVE_SKINNY=0` in the environment or `set_enabled(False)` (benchmarks compare both).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

try:
    from model import _skinny
except ImportError:  # not built (a source checkout without `pip install`): torch does it all
    _skinny = None

MAX_ROWS = 16  # at and below this many rows the kernel is faster than torch's here (measured)

_available = bool(_skinny is not None and _skinny.available())
_enabled = _available and os.environ.get("YUAN_SERVE_SKINNY", "1") != "0"


def available() -> bool:
    """Whether the kernel is built and this CPU runs it (x86-64 with AVX2 and FMA)."""
    return _available


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


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `x @ weight.T` runs here: enabled, CPU float32, 1..MAX_ROWS rows of x with unit
    column stride, `weight` `[N, K]` contiguous with K a multiple of 8."""
    return (
        _enabled
        and x.dtype is torch.float32
        and weight.dtype is torch.float32
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
    tensors that `fits`."""
    M, K = x.shape
    N = weight.shape[0]
    if out is None:
        out = torch.empty(M, N)
    elif out.shape != (M, N) or out.dtype is not torch.float32 or out.stride(1) != 1:
        raise ValueError(f"out: expected float32 [{M}, {N}] rows, got {out.dtype} {list(out.shape)}")
    b = 0
    if bias is not None:
        if bias.dtype is not torch.float32 or not bias.is_contiguous() or bias.shape != (N,):
            raise ValueError(f"bias: expected contiguous float32 [{N}], got {bias.dtype} {list(bias.shape)}")
        b = bias.data_ptr()
    ldx, ldy = (x.stride(0), out.stride(0)) if M > 1 else (K, N)  # one row: its stride is unused
    _skinny.matmul(x.data_ptr(), ldx, weight.data_ptr(), b, out.data_ptr(), ldy, M, N, K)
    return out
