"""SwiGLU experts, stacked per layer, and the grouped expert computation every path uses.

Legend: T tokens, A active experts per token, R routed (token, expert) pairs, E experts held,
F expert width, d hidden. u = w1 g (2F), a = silu(u[:F]) * u[F:], y = w2 a. Pairs are grouped by
expert so each expert runs one matmul over all its rows (no per-token Python loop). The in-process
dispatcher and every expert pool call the same `ExpertBank.forward`.
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

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted expert sum over the pairs held here.

        x `[T, d]`, expert_ids `[T, A]` global ids (-1: a pair computed elsewhere), weights `[T, A]`
        -> `[T, d]` = sum over held pairs of weight * expert(x). Pairs add in `a` order onto zeros, so
        a token whose two experts live in two pools sums to the same bits as here.
        """
        A = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)
        pairs = (flat >= 0).nonzero().squeeze(1)  # [R] token-major
        rows = pairs // A
        y = self.pair_outputs(x, rows, flat[pairs], weights.reshape(-1)[pairs])
        return torch.zeros_like(x).index_add_(0, rows, y)

    def pair_outputs(self, x: torch.Tensor, rows: torch.Tensor, expert_ids: torch.Tensor,
                     weights: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """weights[i] * expert `expert_ids[i]`(x[rows[i]]) for each pair i: `[R, d]`, unsummed, into
        `out` if given. Expert pools answer the data plane with this, writing into shared memory;
        the caller adds pairs into their tokens."""
        local = self.local_index[expert_ids]
        assert bool((local >= 0).all()), "pair routed to an expert this bank does not hold"
        order = torch.argsort(local, stable=True)
        counts = torch.bincount(local, minlength=len(self.expert_ids)).tolist()
        y = torch.empty(rows.numel(), x.shape[1], dtype=x.dtype)
        start = 0
        for e, n in enumerate(counts):  # one matmul per expert over all its rows
            if n:
                sel = order[start:start + n]
                y[sel] = swiglu(x[rows[sel]], self.w1[e], self.w2[e])
                start += n
        return torch.mul(y, weights[:, None], out=out)

    def nbytes(self) -> int:
        return self.w1.numel() * self.w1.element_size() + self.w2.numel() * self.w2.element_size()


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    u = F.linear(x, w1)  # [R, 2F]
    ffn = u.shape[-1] // 2
    return F.linear(F.silu(u[:, :ffn]) * u[:, ffn:], w2)
