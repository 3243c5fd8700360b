"""Localized Filtering (LF): two causal 2-tap convolutions along the sequence, then RMSNorm(c2 + h).

Shapes: T tokens (packed over sequences), d hidden.
  c1[t] = A1 h[t-1] + B1 h[t] + b1            (d -> d/2)
  c2[t] = A2 c1[t-1] + B2 c1[t] + b2          (d/2 -> d)
Anything before a sequence's position 0 is zero, for c1[-1] too (not b1). Tap 0 of each (2 x 1)
kernel multiplies the earlier position. Decoding keeps per sequence the last two inputs
`[h[t-2], h[t-1]]`, from which c1[t-1] is recomputed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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

    def forward_prefill(self, h: torch.Tensor, seq_starts: torch.Tensor) -> torch.Tensor:
        """h `[T, d]` packed sequences that all start at position 0; `seq_starts` are row indices."""
        a1, b1 = self._taps(self.conv1_weight)
        a2, b2 = self._taps(self.conv2_weight)
        c1 = F.linear(h, b1, self.conv1_bias) + F.linear(_shift(h, seq_starts), a1)
        c2 = F.linear(c1, b2, self.conv2_bias) + F.linear(_shift(c1, seq_starts), a2)
        return self.norm(c2 + h)

    def forward_decode(self, h: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """h `[B, d]` one new token per sequence; state `[B, 2, d]` = `[h[t-2], h[t-1]]`."""
        a1, b1 = self._taps(self.conv1_weight)
        a2, b2 = self._taps(self.conv2_weight)
        prev2, prev1 = state[:, 0], state[:, 1]
        c1_prev = F.linear(prev1, b1, self.conv1_bias) + F.linear(prev2, a1)
        c1 = F.linear(h, b1, self.conv1_bias) + F.linear(prev1, a1)
        c2 = F.linear(c1, b2, self.conv2_bias) + F.linear(c1_prev, a2)
        return self.norm(c2 + h)


def _shift(x: torch.Tensor, seq_starts: torch.Tensor) -> torch.Tensor:
    """Row t gets row t-1, and each sequence's first row gets zeros."""
    shifted = torch.roll(x, 1, dims=0)
    shifted[seq_starts] = 0
    return shifted
