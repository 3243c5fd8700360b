"""Localized-Filtering attention (LFA) of one decoder layer, with its KV and LF cache.

Legend: T packed tokens, B sequences, H heads, D head dim, d hidden, L cached length.
Quirks (SPEC steps 2-6): q and k come from the LF-filtered states, v from the normed input; the
concatenation `[q, k]` is cut into H pieces of 2D (first D: head's query, last D: its key);
rotary uses bf16-rounded tables; softmax is float32; with `reset_attention_mask` a token sees only
its own segment (segments end at, and include, an `<eod>`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.cache import LayerCache
from model.localized_filter import LocalizedFilter
from model.rotary import apply_rotary


class LFAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.lf = LocalizedFilter(hidden)

    def _qkv(self, h: torch.Tensor, f: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        H, D = self.num_heads, self.head_dim
        qk = torch.cat([self.q_proj(f), self.k_proj(f)], dim=-1).view(-1, H, 2 * D)  # [T, H, 2D]
        q = apply_rotary(qk[..., :D], cos[:, None], sin[:, None])  # [T, H, D]
        k = apply_rotary(qk[..., D:], cos[:, None], sin[:, None])
        v = self.v_proj(h).view(-1, H, D)
        return q, k, v

    def forward_prefill(
        self,
        h: torch.Tensor,
        seq_lens: list[int],
        seq_starts: torch.Tensor,
        segments: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache | None,
        slots: list[int] | None,
    ) -> torch.Tensor:
        """h `[T, d]`: whole prompts packed, each from position 0. Writes K/V/LF into `slots`."""
        f = self.lf.forward_prefill(h, seq_starts)
        q, k, v = self._qkv(h, f, cos, sin)
        out = torch.empty_like(q)
        start = 0
        for i, n in enumerate(seq_lens):
            rows = slice(start, start + n)
            seg = segments[rows]
            causal = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()
            mask = causal & (seg[:, None] == seg[None, :])  # [n, n]
            out[rows] = _attend(
                q[rows].transpose(0, 1), k[rows].transpose(0, 1), v[rows].transpose(0, 1), mask
            ).transpose(0, 1)
            if cache is not None:
                cache.write_prompt(slots[i], k[rows], v[rows], h[rows])
            start += n
        return self.o_proj(out.reshape(h.shape[0], -1))

    def forward_decode(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        seg_starts: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache,
        slots: slice,
    ) -> torch.Tensor:
        """h `[B, d]`: one new token for each cache slot in the range `slots`, in slot order."""
        B = h.shape[0]
        f = self.lf.forward_decode(h, cache.lf[slots])
        q, k, v = self._qkv(h, f, cos, sin)
        cache.write_decode(slots, positions, k, v, h)
        L = int(positions.max()) + 1
        keys = torch.arange(L, device=h.device)
        mask = (keys[None, :] <= positions[:, None]) & (keys[None, :] >= seg_starts[:, None])  # [B, L]
        out = _attend(q[:, :, None], cache.k[slots, :, :L], cache.v[slots, :, :L], mask[:, None, None])
        return self.o_proj(out.reshape(B, -1))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention in float32; q `[..., Q, D]`, k/v `[..., K, D]`, mask broadcast to `[..., Q, K]`."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    probs = F.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)
