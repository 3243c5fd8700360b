"""Weights in transparent huge pages (2 MiB) on the CPU.

Why: a decode step streams its weights from memory, and in 4 KiB pages every 4 KiB of them costs a
TLB entry and stops the hardware prefetcher at the page's end. Measured here (docs/PERFORMANCE.md,
"Huge pages"): the expert step over 8 layers' banks 1.12-1.16x faster from huge pages, a plain
`torch.sum` over them 1.15x.

Linux gives huge pages to anonymous memory that asks for them (`madvise(MADV_HUGEPAGE)`) when
transparent huge pages are in "madvise" mode, the default of most distributions and this machine's;
torch's allocator does not ask. So a loaded module's parameters are moved, once, into one region
that asks (`to_huge_pages`): each parameter keeps its `Parameter` object and gets a view of the
region as its data. Where the OS or Python cannot ask (no `MADV_HUGEPAGE`, "never" mode), nothing
moves and nothing fails: the pages are then simply small ones.
"""

from __future__ import annotations

import mmap

import torch
from torch import nn

HUGE_PAGE = 2 << 20
ALIGN = 64  # bytes: every tensor in a region starts on a cache line


def huge_empty(nbytes: int) -> torch.Tensor | None:
    """`nbytes` uint8 of anonymous memory that asked for huge pages, starting on a 2 MiB boundary;
    None where it cannot ask. The tensor keeps the mapping alive (`torch.frombuffer`)."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or nbytes <= 0:
        return None
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE  # room to start on a boundary
    try:
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(advice)
    except (OSError, ValueError, AttributeError):
        return None
    whole = torch.frombuffer(region, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start : start + nbytes]


def to_huge_pages(module: nn.Module) -> int:
    """Move `module`'s CPU parameters into one huge-page region (values unchanged); the bytes moved,
    0 where nothing could be."""
    params = [p for p in module.parameters() if p.device.type == "cpu" and p.numel() > 0]
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += -(-p.numel() * p.element_size() // ALIGN) * ALIGN
    region = huge_empty(total)
    if region is None:
        return 0
    with torch.no_grad():
        for p, off in zip(params, offsets):
            p.data = _copy_into(region[off : off + p.numel() * p.element_size()], p.data)
    return total


def huge_copy(t: torch.Tensor, min_bytes: int = HUGE_PAGE // 2) -> torch.Tensor:
    """A contiguous CPU tensor of at least `min_bytes` copied into huge pages (others as they are):
    for weights derived at run time (`model.derived`)."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < min_bytes or not t.is_contiguous():
        return t
    region = huge_empty(nbytes)
    return t if region is None else _copy_into(region, t)


def _copy_into(region: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`t`'s values in `region` (uint8, exactly t's bytes), viewed with t's dtype and shape."""
    out = region.view(t.dtype).view(t.shape)
    out.copy_(t)
    return out
