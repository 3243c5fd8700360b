"""The paged KV + LF cache: fixed-size blocks of positions, shared by every layer.

A block holds `block_size` consecutive positions of one sequence: in every layer their K and V
(after rotary) and the LF state `[c1[t], h[t]]` at the block's last written position t (h: the
layer's input-normed hidden states, c1 the first LF convolution's output), which is what the LF
convolution needs to go on after it (`model/localized_filter.py`).
Sequences address blocks through block tables (the scheduler's `gateway/blocks.py` hands them out);
a cache position ("cache slot") is `block * block_size + offset`.
Block 0 is the null block: never handed out and always zero. Padded reads point at it, and a
sequence's LF state before position 0 is its (zero) state.
The tensors are allocated once, at the configured size, with `torch.empty`: pages the OS has not
touched cost no memory, so resident memory follows the blocks written.
Legend: N blocks, P = N * block_size cache slots, H heads, D head dim, d hidden.
"""

from __future__ import annotations

import torch

from model.config import lf_width

NULL_BLOCK = 0


class PagedCache:
    """k, v `[layers, H, P, D]` (heads outermost: a gather of slots is `[H, L, D]`, contiguous per
    head, as attention's matmuls want it); lf `[layers, N, d/2 + d]`."""

    def __init__(
        self,
        num_layers: int,
        heads: int,
        head_dim: int,
        hidden: int,
        dtype: torch.dtype,
        num_blocks: int,
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2 (block 0 is the null block), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        P = num_blocks * block_size
        self.k = torch.empty(num_layers, heads, P, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.lf = torch.empty(num_layers, num_blocks, lf_width(hidden), dtype=dtype, device=device)
        self.k[:, :, :block_size] = 0  # the null block
        self.v[:, :, :block_size] = 0
        self.lf[:, NULL_BLOCK] = 0

    @staticmethod
    def block_bytes(
        num_layers: int, heads: int, head_dim: int, hidden: int, dtype: torch.dtype, block_size: int
    ) -> int:
        """Bytes one block takes over all layers."""
        per_layer = 2 * block_size * heads * head_dim + lf_width(hidden)
        return num_layers * per_layer * torch.empty((), dtype=dtype).element_size()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.lf))
