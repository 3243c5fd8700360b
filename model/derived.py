"""Weights laid out for fewer, larger matmuls, derived from the checkpoint's tensors and kept.

`Derived(fn).get(*params)` returns `fn(*params)`, computed again only when one of the params has
changed since (written in place, replaced, or moved to another device or dtype), so loading,
`.to()` and tests that edit weights all see fresh values, and a decode step pays nothing.
"""

from __future__ import annotations

from typing import Callable

import torch

from model.pages import huge_copy


class Derived:
    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.key: tuple | None = None
        self.value: torch.Tensor | None = None

    def get(self, *params: torch.Tensor) -> torch.Tensor:
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if key != self.key:
            with torch.no_grad():
                self.value = huge_copy(self.fn(*params).contiguous())  # read every decode step
            self.key = key
        return self.value
