"""Localized Filtering (LF): two causal 2-tap convolutions along the sequence, then RMSNorm(c2 + h).

Shapes: T tokens (packed over sequences), d hidden.
  c1[t] = A1 h[t-1] + B1 h[t] + b1            (d -> d/2)
  c2[t] = A2 c1[t-1] + B2 c1[t] + b2          (d/2 -> d)
Anything before a sequence's position 0 is zero, for c1[-1] too (not b1). Tap 0 of each (2 x 1)
kernel multiplies the earlier position. To go on after position t-1 (the next chunk, or a decode
step) the cache keeps per sequence the last two inputs `[h[t-2], h[t-1]]`, from which c1[t-1] is
recomputed.
"""

from __future__ import annotations

import torch
from torch import nn

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

    def _taps(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return w[:, :, 0, 0], w[:, :, 1, 0]  # (earlier, current)

    def forward(
        self, h: torch.Tensor, seq_starts: torch.Tensor, state: torch.Tensor, has_prev: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h `[T, d]`: chunks of sequences, packed; chunk i starts at row `seq_starts[i]`, with the
        state `[h[t-2], h[t-1]]` before it in `state` `[B, 2, d]` and `has_prev` `[B, 1]` False
        when it starts at position 0. Returns the filtered states `[T, d]` and each row's previous
        input h[t-1] `[T, d]` (the cache keeps `[h[t-1], h[t]]` as the state after t).
        A one-token chunk is a decode step: the same formula, nothing special."""
        a1, b1 = self._taps(self.conv1_weight)
        a2, b2 = self._taps(self.conv2_weight)
        prev2, prev1 = state[:, 0], state[:, 1]
        h_prev = _shift(h, seq_starts, prev1)
        c1 = linear(h, b1, self.conv1_bias) + linear(h_prev, a1)
        # c1[t-1] before each chunk, recomputed from the state; zero (not b1) before position 0.
        c1_first = linear(prev1, b1, self.conv1_bias) + linear(prev2, a1)
        c1_first = torch.where(has_prev, c1_first, torch.zeros_like(c1_first))
        c2 = linear(c1, b2, self.conv2_bias) + linear(_shift(c1, seq_starts, c1_first), a2)
        return self.norm(c2 + h), h_prev


def _shift(x: torch.Tensor, seq_starts: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Row t gets row t-1, and each chunk's first row gets its row of `first`."""
    shifted = torch.roll(x, 1, dims=0)
    shifted[seq_starts] = first
    return shifted
