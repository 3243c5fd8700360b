"""Localized-Filtering attention (LFA) of one decoder layer, over the paged KV and LF cache.

Legend: T packed tokens, B chunks, H heads, D head dim, d hidden, L context length, P cache slots.
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

from model import invariant
from model.batch import ForwardBatch
from model.derived import Derived
from model.invariant import linear
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
        self._wqk = Derived(lambda wq, wk: torch.cat([wq, wk]))  # one matmul gives [q, k]

    def _qkv(self, h: torch.Tensor, f: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        H, D = self.num_heads, self.head_dim
        qk = linear(f, self._wqk.get(self.q_proj.weight, self.k_proj.weight)).view(-1, H, 2, D)  # T,H,2,D
        qk = apply_rotary(qk, cos[:, None, None], sin[:, None, None])  # q and k rotated in one go
        q, k = qk[:, :, 0], qk[:, :, 1]  # [T, H, D] each
        v = linear(h, self.v_proj.weight).view(-1, H, D)
        return q, k, v

    def forward(
        self,
        h: torch.Tensor,
        batch: ForwardBatch,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        lf_cache: torch.Tensor,
    ) -> torch.Tensor:
        """h `[T, d]`: the batch's new tokens. Writes their K/V and LF state into this layer's cache
        (k/v `[H, P, D]`, lf `[N, d/2 + d]`), then attends over each chunk's whole context. Reads are
        `index_select`s of whole rows, which give `[H, ..., L, D]` contiguous: the matmuls then
        need no copy (measured: 3x faster than advanced indexing, 1.3x than selecting along P)."""
        H, D = self.num_heads, self.head_dim
        state = lf_cache.index_select(0, batch.lf_read)
        f, kept = self.lf(h, batch.seq_starts, state, batch.has_prev, batch.lf_rows)
        q, k, v = self._qkv(h, f, cos, sin)
        k_cache.index_copy_(1, batch.write_slots, k.transpose(0, 1))
        v_cache.index_copy_(1, batch.write_slots, v.transpose(0, 1))
        lf_cache.index_copy_(0, batch.lf_blocks, kept)
        out = torch.empty_like(q)
        if invariant.enabled():
            _attend_each_query(q, out, batch, k_cache, v_cache)
            return linear(out.reshape(h.shape[0], -1), self.o_proj.weight)
        if batch.decode_slots.numel():  # one-token chunks together: q `[H, Bd, 1, D]`
            Bd, L = batch.decode_slots.shape
            index = batch.decode_index(H, k_cache.shape[1])  # rows of `[H * P, D]`, made once a step
            keys = k_cache.view(-1, D).index_select(0, index).view(H, Bd, L, D)
            values = v_cache.view(-1, D).index_select(0, index).view(H, Bd, L, D)
            r = batch.decode_rows
            o = _attend(q[r].transpose(0, 1)[:, :, None], keys, values, batch.decode_mask[None, :, None])
            out[r] = o.squeeze(2).transpose(0, 1)
        group = batch.prefill_group()
        if group is not None:  # longer chunks padded to one shape, one call: q `[H, C, n, D]`
            rows, valid, slots, mask = group
            C, n = rows.shape
            qg = q.index_select(0, rows.view(-1)).view(C, n, H, D).permute(2, 0, 1, 3)
            keys = k_cache.index_select(1, slots.view(-1)).view(H, C, -1, D)
            values = v_cache.index_select(1, slots.view(-1)).view(H, C, -1, D)
            out[rows[valid]] = _attend(qg, keys, values, mask).permute(1, 2, 0, 3)[valid]
        else:
            for p in batch.prefills:  # longer chunks one by one: q `[H, n, D]`, keys `[H, L, D]`
                out[p.rows] = _attend(
                    q[p.rows].transpose(0, 1),
                    k_cache.index_select(1, p.slots),
                    v_cache.index_select(1, p.slots),
                    p.mask,
                ).transpose(0, 1)
        return linear(out.reshape(h.shape[0], -1), self.o_proj.weight)


def _attend_each_query(
    q: torch.Tensor, out: torch.Tensor, batch: ForwardBatch, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> None:
    """Batch-invariant attention (`model.invariant`): each query over exactly its keys 0..p, so the
    shapes, and with them the bits, depend on its position only."""
    positions = batch.positions.tolist()
    queries = []  # (row, slots of positions 0..p, mask)
    if batch.decode_slots.numel():
        rows = range(q.shape[0]) if isinstance(batch.decode_rows, slice) else batch.decode_rows.tolist()
        for b, r in enumerate(rows):
            p = positions[r]
            queries.append((r, batch.decode_slots[b, : p + 1], batch.decode_mask[b, : p + 1]))
    for pre in batch.prefills:
        for j, r in enumerate(range(pre.rows.start, pre.rows.stop)):
            p = positions[r]
            queries.append((r, pre.slots[: p + 1], pre.mask[j, : p + 1]))
    for r, slots, mask in queries:
        out[r] = _attend(
            q[r][:, None], k_cache.index_select(1, slots), v_cache.index_select(1, slots), mask[None]
        ).squeeze(1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention in float32; q `[..., Q, D]`, k/v `[..., K, D]`, mask broadcast to `[..., Q, K]`."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    probs = F.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)
