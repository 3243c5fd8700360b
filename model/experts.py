"""SwiGLU experts, stacked per layer, and the grouped expert computation every path uses.

Legend: T tokens, A active experts per token, R routed (token, expert) pairs, E experts held,
F expert width, d hidden. u = w1 g (2F), a = silu(u[:F]) * u[F:], y = w2 a. Pairs are grouped by
expert so each expert runs one matmul over all its rows (no per-token Python loop). Each pair's
weighted output has a slot t*A + a in `[T, A, d]`, and `sum_slots` adds a token's slots in `a`
order: the in-process dispatcher (`ExpertBank.forward`) and the gateway, whose pools fill the slots
with the same `pair_outputs`, sum the same way, so every path gives the same bits. On the CPU in
float32 the grouping and both matmuls of decode-sized groups run in C (`model.skinny.expert_pairs`):
three calls a layer instead of two per active expert plus ~25; `forward` (in-process) does it in
two C calls and the activation, the slot sum included (`model.skinny.bank_forward`, the same bits).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model import invariant, skinny
from model.invariant import linear_into


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
        -> `[T, d]` = sum over held pairs of weight * expert(x), in `a` order (`sum_slots`).
        """
        if skinny.experts_fit(x, self.w1, self.w2) and not invariant.enabled():
            out = skinny.bank_forward(x, expert_ids, weights, self.local_index, self.w1, self.w2)
            if out is not None:  # decode-sized groups: two C calls and the activation
                return out
        (T, A), flat = expert_ids.shape, expert_ids.reshape(-1)
        pairs = (flat >= 0).nonzero().squeeze(1)  # [R] token-major
        alloc = torch.empty if pairs.numel() == T * A else torch.zeros  # slots of pairs held elsewhere stay 0
        slots = alloc(T * A, x.shape[1], dtype=x.dtype, device=x.device)
        self.pair_outputs(x, pairs // A, flat[pairs], weights.reshape(-1)[pairs], slots, pairs)
        return sum_slots(slots.view(T, A, -1))

    def pair_outputs(
        self,
        x: torch.Tensor,
        rows: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        out: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        """out[slots[i]] = weights[i] * expert `expert_ids[i]`(x[rows[i]]) for each pair i. Expert
        pools answer the data plane with this, writing straight into the gateway's shared outputs."""
        local = self.local_index[expert_ids]  # ids are in [0, experts): the data plane checked them
        E = len(self.expert_ids)
        if skinny.experts_fit(x, self.w1, self.w2, out) and not invariant.enabled():
            order, counts, biggest = skinny.group(local, E)  # raises for a pair not held here
            if biggest <= skinny.EXPERT_MAX_ROWS:  # decode-sized groups: three calls for the layer
                skinny.expert_pairs(x, rows, order, counts, weights, self.w1, self.w2, out, slots)
                return
            counts = counts.tolist()
        else:
            if not bool((local >= 0).all()):
                raise ValueError("expert_ids: a pair is routed to an expert this bank does not hold")
            order = torch.argsort(local, stable=True)
            counts = torch.bincount(local, minlength=E).tolist()
        # Rows and weights gathered once, grouped by expert; then two matmuls per active expert into
        # one buffer each, and one activation and one weighting over all rows (few calls: per-op
        # overhead is what small decode batches pay for).
        xs, ws = x.index_select(0, rows[order]), weights[order].unsqueeze(1)
        ffn = self.w2.shape[2]
        u = xs.new_empty(xs.shape[0], 2 * ffn)
        bounds = []
        start = 0
        for e, n in enumerate(counts):
            if n:
                bounds.append((e, start, start + n))
                start += n
        for e, a, b in bounds:
            linear_into(xs[a:b], self.w1[e], u[a:b])  # [n, 2F]
        act = F.silu(u[:, :ffn]).mul_(u[:, ffn:]) if invariant.enabled() else skinny.swiglu(u, ffn)  # [R, F]
        y = torch.empty_like(xs)
        for e, a, b in bounds:
            linear_into(act[a:b], self.w2[e], y[a:b])  # [n, d]
        y.mul_(ws)
        scatter_rows(out, slots[order], y)

    def nbytes(self) -> int:
        return self.w1.numel() * self.w1.element_size() + self.w2.numel() * self.w2.element_size()


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's elements as same-size integers in numpy, which has no bfloat16: for moving
    them, where numpy's one call is cheaper than torch's."""
    return t.view(_SAME_SIZE_INT[t.element_size()]).numpy()


def scatter_rows(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """out[index[i]] = src[i]. On CPU numpy's row copy does it: 4x faster than torch's `index_copy_`,
    which copies element by element (24 vs 6.5 us for 32 x 2048 fp32)."""
    if out.device.type != "cpu":
        out.index_copy_(0, index, src)
        return
    bits(out)[index.numpy()] = bits(src)


def sum_slots(slots: torch.Tensor) -> torch.Tensor:
    """`[T, A, d]` pair outputs -> `[T, d]`, each token's A slots added in `a` order (a new tensor:
    the slots may be shared memory that is rewritten next layer)."""
    out = slots[:, 0].clone() if slots.shape[1] == 1 else torch.add(slots[:, 0], slots[:, 1])
    for a in range(2, slots.shape[1]):
        out += slots[:, a]
    return out
