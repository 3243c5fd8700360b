"""Localized Filtering (LF): two causal 2-tap convolutions along the sequence, then RMSNorm(c2 + h).

Shapes: T tokens (packed over sequences), d hidden.
  c1[t] = A1 h[t-1] + B1 h[t] + b1            (d -> d/2)
  c2[t] = A2 c1[t-1] + B2 c1[t] + b2          (d/2 -> d)
Anything before a sequence's position 0 is zero, for c1[-1] too (not b1). Tap 0 of each (2 x 1)
kernel multiplies the earlier position. To go on after position t-1 (the next chunk, or a decode
step) the cache keeps, in the block of position t-1, the state `[c1[t-1], h[t-1]]` (d/2 + d): what
the two taps need from before the chunk. (Keeping `[h[t-2], h[t-1]]` instead would make every
chunk recompute c1[t-1], a second row of the first convolution for every decode token.)
"""

from __future__ import annotations

import torch
from torch import nn

from model.derived import Derived
from model.invariant import linear
from model.norm import RMSNorm

LF_NORM_EPS = 1e-6  # fixed in the released code; it ignores rms_norm_eps


class LocalizedFilter(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        half = hidden // 2
        # Weights in the checkpoint's conv layout: [out, in, 2 taps, 1].
        self.conv1_weight = nn.Parameter(torch.empty(half, hidden, 2, 1))
        self.conv1_bias = nn.Parameter(torch.zeros(half))
        self.conv2_weight = nn.Parameter(torch.empty(hidden, half, 2, 1))
        self.conv2_bias = nn.Parameter(torch.zeros(hidden))
        self.norm = RMSNorm(hidden, LF_NORM_EPS)
        self._w1, self._w2 = Derived(self._stack_taps), Derived(self._stack_taps)

    @staticmethod
    def _stack_taps(w: torch.Tensor) -> torch.Tensor:
        """`[out, in, 2, 1]` -> `[out, 2 * in]`: the earlier tap's columns, then the current one's,
        so both taps are one matmul over `[x[t-1], x[t]]`."""
        return w[:, :, :, 0].permute(0, 2, 1).reshape(w.shape[0], -1)

    def forward(
        self,
        h: torch.Tensor,
        seq_starts: torch.Tensor,
        state: torch.Tensor,
        has_prev: torch.Tensor,
        keep_rows: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h `[T, d]`: chunks of sequences, packed; chunk i starts at row `seq_starts[i]`, with the
        state `[c1[t-1], h[t-1]]` before it in `state` `[B, d/2 + d]` and `has_prev` `[B, 1]` False
        when it starts at position 0. Returns the filtered states `[T, d]` and the states after the
        rows `keep_rows` `[W]` (the ones the cache keeps): their `[c1[t], h[t]]` `[W, d/2 + d]`.
        A one-token chunk is a decode step: the same formula, nothing special."""
        w1 = self._w1.get(self.conv1_weight)  # [d/2, 2d]
        w2 = self._w2.get(self.conv2_weight)  # [d, d]
        half = w1.shape[0]
        h_prev = _shift(h, seq_starts, state[:, half:])
        c1 = linear(torch.cat([h_prev, h], dim=-1), w1, self.conv1_bias)  # [T, d/2]
        c1_first = torch.where(has_prev, state[:, :half], torch.zeros_like(state[:, :half]))  # zero before 0
        c2 = linear(torch.cat([_shift(c1, seq_starts, c1_first), c1], dim=-1), w2, self.conv2_bias)
        return self.norm(c2 + h), torch.cat([c1[keep_rows], h[keep_rows]], dim=-1)


def _shift(x: torch.Tensor, seq_starts: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Row t gets row t-1, and each chunk's first row gets its row of `first`."""
    shifted = torch.roll(x, 1, dims=0)
    shifted[seq_starts] = first
    return shifted
