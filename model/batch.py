"""What one forward computes: chunks of sequences, packed, and where they read and write the cache.

Every forward is the same kind: each sequence feeds `n` new tokens from position `start` on (a
whole prompt, a prompt chunk, a recompute after preemption, or one decode token) and attends over
its cached positions plus the new ones. `ForwardBatch.build` turns the scheduler's chunks into the
index tensors the layers use, once per step; all layers share them (one block table per sequence
covers every layer).
Legend: T packed new tokens, B chunks (sequences), Bd decode chunks (n == 1), L context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.cache import NULL_BLOCK


@dataclass
class Chunk:
    """Tokens `[start, start + n)` of one sequence, fed in one forward."""

    token_ids: list[int]  # the sequence's tokens, at least `start + n` of them
    start: int  # first new position; positions before it are in the cache already
    n: int  # new tokens, >= 1
    block_table: list[int]  # the sequence's cache blocks, covering positions [0, start + n)
    seg_start: int = 0  # first position of the `<eod>` segment that position `start` belongs to
    logits: bool = True  # whether the chunk's last position yields a logits row


@dataclass
class PrefillAttention:
    """One chunk of more than one token: its rows in the batch and its context's cache slots."""

    rows: slice  # [n] rows of the packed batch
    slots: torch.Tensor  # [L] cache slots of positions 0..L-1, L = start + n
    mask: torch.Tensor  # [n, L] which keys each new token sees


@dataclass
class ForwardBatch:
    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    write_slots: torch.Tensor  # [T] cache slot each new token's K/V goes to
    seq_starts: torch.Tensor  # [B] row of each chunk's first token
    lf_read: torch.Tensor  # [B] block holding the LF state before the chunk (null at position 0)
    has_prev: torch.Tensor  # [B, 1] bool: the chunk starts after position 0
    lf_rows: torch.Tensor  # [W] rows whose LF state is kept: a block's last position or a chunk's last
    lf_blocks: torch.Tensor  # [W] the block each of those states goes to
    decode_rows: torch.Tensor | slice  # [Bd] rows of one-token chunks (a slice when all are)
    decode_slots: torch.Tensor  # [Bd, L] their context's cache slots, padded with the null block
    decode_mask: torch.Tensor  # [Bd, L]
    prefills: list[PrefillAttention]
    logits_rows: torch.Tensor  # [R] rows whose logits the caller wants, in chunk order
    _decode_index: torch.Tensor | None = None
    _prefill_group: tuple | None = None  # `prefill_group`'s answer, once made (() for none)

    def to(self, device: torch.device) -> ForwardBatch:
        """The index tensors on `device` (the cache's), copied once a step."""
        if device.type == "cpu":
            return self
        moved = {
            k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in self.__dict__.items()
            if k != "prefills"
        }
        prefills = [
            PrefillAttention(
                p.rows, p.slots.to(device, non_blocking=True), p.mask.to(device, non_blocking=True)
            )
            for p in self.prefills
        ]
        return ForwardBatch(**{**moved, "prefills": prefills})

    def decode_index(self, heads: int, slots: int) -> torch.Tensor:
        """`decode_slots` as rows of a layer's cache viewed `[heads * slots, D]`, head-major: one
        `index_select` then gives `[heads, Bd, L, D]`. Made once and kept (every layer uses it)."""
        if self._decode_index is None:
            flat = self.decode_slots.reshape(-1)
            heads_ = torch.arange(heads, device=flat.device)
            self._decode_index = (heads_[:, None] * slots + flat[None, :]).reshape(-1)
        return self._decode_index

    def prefill_group(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The longer chunks padded to one shape, for one attention call over all of them: (rows
        `[C, n]` of the batch, padded with row 0; valid `[C, n]`, which of them are the chunk's;
        slots `[C, L]`, padded with the null block's slot 0, whose keys and values are zeros; mask
        `[C, n, L]`, a padded query seeing slot 0 alone). None for fewer than two chunks, or when
        the padding would more than double the attention's work (`n * L` summed over the chunks).
        Made once a step and kept (every layer uses it)."""
        if self._prefill_group is None:
            self._prefill_group = ()
            C = len(self.prefills)
            sizes = [(p.rows.stop - p.rows.start, p.slots.numel()) for p in self.prefills]
            n_max, l_max = max((n for n, _ in sizes), default=0), max((L for _, L in sizes), default=0)
            if C >= 2 and C * n_max * l_max <= 2 * sum(n * L for n, L in sizes):
                device = self.prefills[0].slots.device
                rows = torch.zeros(C, n_max, dtype=torch.long, device=device)
                valid = torch.zeros(C, n_max, dtype=torch.bool, device=device)
                slots = torch.zeros(C, l_max, dtype=torch.long, device=device)
                mask = torch.zeros(C, n_max, l_max, dtype=torch.bool, device=device)
                for i, (p, (n, L)) in enumerate(zip(self.prefills, sizes)):
                    rows[i, :n] = torch.arange(p.rows.start, p.rows.stop, device=device)
                    valid[i, :n] = True
                    slots[i, :L] = p.slots
                    mask[i, :n, :L] = p.mask
                    mask[i, n:, 0] = True  # a padded query: discarded, but not all-masked (no NaN)
                self._prefill_group = (rows, valid, slots, mask)
        return self._prefill_group or None

    @staticmethod
    def build(chunks: list[Chunk], block_size: int, eod_token_id: int | None) -> ForwardBatch:
        """`eod_token_id` None: no segments (the model has no `reset_attention_mask`)."""
        bs = block_size
        # Python ints, one list per field, turned into tensors once (a decode chunk is one of each).
        ids, positions, write, lf_rows, lf_blocks = [], [], [], [], []
        seq_starts, lf_read, has_prev, logits_rows, prefills = [], [], [], [], []
        dec_rows, dec_pos, dec_seg, dec_tables = [], [], [], []
        row = 0
        for c in chunks:
            s, n, table = c.start, c.n, c.block_table
            if n < 1 or len(c.token_ids) < s + n or len(table) * bs < s + n:
                raise ValueError(f"chunk [{s}, {s + n}) does not fit its tokens or block table")
            seq_starts.append(row)
            lf_read.append(table[(s - 1) // bs] if s > 0 else NULL_BLOCK)
            has_prev.append(s > 0)
            if n == 1:  # a decode token (most chunks): its one position, written out
                block = table[s // bs]
                ids.append(c.token_ids[s])
                positions.append(s)
                write.append(block * bs + s % bs)
                lf_rows.append(row)
                lf_blocks.append(block)
                dec_rows.append(row)
                dec_pos.append(s)
                dec_seg.append(c.seg_start)
                dec_tables.append(table[: s // bs + 1])
            else:
                ids.extend(c.token_ids[s : s + n])
                positions.extend(range(s, s + n))
                write.extend(table[p // bs] * bs + p % bs for p in range(s, s + n))
                for p in range(s, s + n):  # a block's last position, and the chunk's last
                    if (p + 1) % bs == 0 or p == s + n - 1:
                        lf_rows.append(row + p - s)
                        lf_blocks.append(table[p // bs])
                L = s + n
                t = torch.tensor(table[: (L + bs - 1) // bs], dtype=torch.long)
                ctx = (t[:, None] * bs + torch.arange(bs)).reshape(-1)[:L]
                seg = _segment_starts(c.token_ids, s, n, c.seg_start, eod_token_id)
                mask = _mask(torch.arange(s, L), seg, torch.arange(L))
                prefills.append(PrefillAttention(slice(row, row + n), ctx, mask))
            if c.logits:
                logits_rows.append(row + n - 1)
            row += n
        Bd = len(dec_rows)
        if Bd:  # numpy for these few small arrays: each op ~1 us where torch's takes 5-10
            L = max(dec_pos) + 1
            width = max(len(t) for t in dec_tables)
            tables = np.array([t + [NULL_BLOCK] * (width - len(t)) for t in dec_tables], dtype=np.int64)
            slots = (tables[:, :, None] * bs + np.arange(bs)).reshape(Bd, -1)[:, :L]
            keys, q_pos = np.arange(L), np.array(dec_pos, dtype=np.int64)
            # Past a sequence's own position its last block holds stale values (maybe not even
            # finite): read the null block there, as for padding, so masked keys add exact zeros.
            decode_slots = torch.from_numpy(np.where(keys[None, :] <= q_pos[:, None], slots, 0))
            decode_mask = torch.from_numpy(_mask(q_pos, np.array(dec_seg, dtype=np.int64), keys))
        else:
            decode_slots = decode_mask = torch.empty(0, 0, dtype=torch.long)
        return ForwardBatch(
            token_ids=_longs(ids),
            positions=_longs(positions),
            write_slots=_longs(write),
            seq_starts=_longs(seq_starts),
            lf_read=_longs(lf_read),
            has_prev=torch.from_numpy(np.array(has_prev, dtype=np.bool_)[:, None]),
            lf_rows=_longs(lf_rows),
            lf_blocks=_longs(lf_blocks),
            decode_rows=slice(None) if Bd == row else _longs(dec_rows),
            decode_slots=decode_slots,
            decode_mask=decode_mask,
            prefills=prefills,
            logits_rows=_longs(logits_rows),
        )


def _longs(values: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.int64))


def _segment_starts(token_ids: list[int], s: int, n: int, seg_start: int, eod: int | None) -> torch.Tensor:
    """First position of the segment of each position in [s, s + n): a segment ends at, and
    includes, an `<eod>` (SPEC step 6), so position p starts one when token p-1 is `<eod>`."""
    if eod is None:
        return torch.zeros(n, dtype=torch.long)
    prev = torch.tensor(token_ids[max(s - 1, 0) : s + n - 1], dtype=torch.long)
    if s == 0:
        prev = torch.cat([torch.tensor([-1]), prev])
    pos = torch.arange(s, s + n)
    starts = torch.where(prev == eod, pos, torch.full_like(pos, seg_start))
    return torch.cummax(starts, 0).values


def _mask(q_pos, q_seg, keys):
    """`[Q, L]`: key position k is seen by a query at p when seg_start(p) <= k <= p. q_pos, q_seg
    `[Q]` and keys `[L]` (0..L-1) are all torch tensors or all numpy arrays, the result alike."""
    return (keys[None, :] <= q_pos[:, None]) & (keys[None, :] >= q_seg[:, None])


def segment_start(token_ids: list[int], pos: int, eod: int | None) -> int:
    """The first position of the segment that position `pos` belongs to."""
    if eod is None or pos == 0:
        return 0
    try:
        return pos - token_ids[pos - 1 :: -1].index(eod)  # index i in reverse is position pos-1-i
    except ValueError:
        return 0
