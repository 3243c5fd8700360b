"""Per-sequence decode state: K and V per layer plus the two-vector LF state per layer.

Sequences own slots `0..active-1` of preallocated slabs, kept dense: freeing a slot moves the last
active slot into it. A decode step then reads `k[:B, :, :L]` as a plain view (no gather), and the
slabs grow by doubling (slots and length) so memory follows use.
Legend: S slots, H heads, C capacity (positions), D head dim, d hidden.
"""

from __future__ import annotations

import torch


class LayerCache:
    """One layer's slabs: k, v `[S, H, C, D]` (after rotary), lf `[S, 2, d]` = `[h[t-2], h[t-1]]`."""

    def __init__(
        self, slots: int, heads: int, capacity: int, head_dim: int, hidden: int, dtype: torch.dtype
    ) -> None:
        self.k = torch.zeros(slots, heads, capacity, head_dim, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.lf = torch.zeros(slots, 2, hidden, dtype=dtype)

    def write_prompt(self, slot: int, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor) -> None:
        """k, v `[n, H, D]`, h `[n, d]` of a prompt that starts at position 0."""
        n = k.shape[0]
        self.k[slot, :, :n] = k.transpose(0, 1)
        self.v[slot, :, :n] = v.transpose(0, 1)
        self.lf[slot, 0] = h[n - 2] if n >= 2 else 0
        self.lf[slot, 1] = h[n - 1]

    def write_decode(
        self, slots: slice, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor
    ) -> None:
        """One new token for each slot of the range `slots`: k, v `[B, H, D]`, h `[B, d]`."""
        rows = torch.arange(slots.start, slots.stop)
        self.k[rows, :, positions] = k
        self.v[rows, :, positions] = v
        self.lf[slots] = torch.stack([self.lf[slots, 1], h], dim=1)

    def resize(self, slots: int, capacity: int) -> None:
        S, C = min(slots, self.k.shape[0]), min(capacity, self.k.shape[2])
        k = self.k.new_zeros(slots, self.k.shape[1], capacity, self.k.shape[3])
        v = torch.zeros_like(k)
        k[:S, :, :C] = self.k[:S, :, :C]
        v[:S, :, :C] = self.v[:S, :, :C]
        lf = self.lf.new_zeros(slots, *self.lf.shape[1:])
        lf[:S] = self.lf[:S]
        self.k, self.v, self.lf = k, v, lf

    def move(self, src: int, dst: int) -> None:
        self.k[dst] = self.k[src]
        self.v[dst] = self.v[src]
        self.lf[dst] = self.lf[src]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.lf))


class KVCache:
    """All layers' slabs plus the dense slot allocator."""

    def __init__(
        self,
        num_layers: int,
        heads: int,
        head_dim: int,
        hidden: int,
        dtype: torch.dtype,
        max_slots: int,
        max_len: int,
        initial_slots: int = 4,
        initial_len: int = 64,
    ) -> None:
        self.max_slots, self.max_len = max_slots, max_len
        self.slots, self.capacity = min(initial_slots, max_slots), min(initial_len, max_len)
        self.layers = [
            LayerCache(self.slots, heads, self.capacity, head_dim, hidden, dtype) for _ in range(num_layers)
        ]
        self.active = 0

    def allocate(self) -> int:
        if self.active == self.max_slots:
            raise RuntimeError("KV cache has no free slot")  # the scheduler checks first
        if self.active == self.slots:
            self._resize(min(self.slots * 2, self.max_slots), self.capacity)
        self.active += 1
        return self.active - 1

    def free(self, slot: int) -> int | None:
        """Free `slot`; returns the slot whose contents moved into it (the old last one), if any."""
        last = self.active - 1
        self.active -= 1
        if slot == last:
            return None
        for layer in self.layers:
            layer.move(last, slot)
        return last

    def ensure_length(self, length: int) -> None:
        if length > self.max_len:
            raise RuntimeError(f"sequence length {length} exceeds the cache limit {self.max_len}")
        if length > self.capacity:
            cap = self.capacity
            while cap < length:
                cap *= 2
            self._resize(self.slots, min(cap, self.max_len))

    def _resize(self, slots: int, capacity: int) -> None:
        for layer in self.layers:
            layer.resize(slots, capacity)
        self.slots, self.capacity = slots, capacity

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
