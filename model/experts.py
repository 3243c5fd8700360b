"""SwiGLU experts, stacked per layer, and the grouped expert computation every path uses.

Legend: R routed rows (token, expert) pairs, E local experts, F expert width, d hidden.
u = w1 g (2F), a = silu(u[:F]) * u[F:], y = w2 a. Rows are grouped by expert so each expert runs
one matmul over all its rows (no per-token Python loop); outputs come back in the rows' order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ExpertBank(nn.Module):
    """The experts `expert_ids` (global ids) of one layer: w1 `[E, 2F, d]`, w2 `[E, d, F]`."""

    def __init__(self, expert_ids: list[int], hidden: int, ffn_hidden: int) -> None:
        super().__init__()
        self.expert_ids = list(expert_ids)
        self.w1 = nn.Parameter(torch.empty(len(expert_ids), 2 * ffn_hidden, hidden))
        self.w2 = nn.Parameter(torch.empty(len(expert_ids), hidden, ffn_hidden))
        lookup = torch.full((max(expert_ids, default=-1) + 1,), -1, dtype=torch.long)
        lookup[torch.tensor(expert_ids, dtype=torch.long)] = torch.arange(len(expert_ids))
        self.register_buffer("local_index", lookup, persistent=False)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x `[R, d]`, expert_ids `[R]` global ids held here -> `[R, d]`."""
        local = self.local_index[expert_ids]
        assert bool((local >= 0).all()), "row routed to an expert this bank does not hold"
        order = torch.argsort(local, stable=True)
        counts = torch.bincount(local, minlength=len(self.expert_ids)).tolist()
        out = torch.empty_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = order[start:start + n]
                out[rows] = swiglu(x[rows], self.w1[e], self.w2[e])
                start += n
        return out


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    u = F.linear(x, w1)  # [R, 2F]
    ffn = u.shape[-1] // 2
    return F.linear(F.silu(u[:, :ffn]) * u[:, ffn:], w2)
