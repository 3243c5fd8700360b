"""KV block accounting for the scheduler: free blocks, reference counts and the prefix cache.

Plain Python over block ids of a `model.cache.PagedCache` (block 0, the null block, is never
handed out). As in nano-vllm's `BlockManager` and vLLM's KV cache manager:
- a full block gets a key: a hash of its token ids chained with the previous block's key, so a key
  names a whole prefix from position 0 (its positions and `<eod>` segments follow from the ids),
  and with it the block's K/V and LF state in every layer;
- a block is shared by every sequence whose prefix has its key (reference-counted);
- a block whose count drops to 0 stays cached until it is needed: the free queue hands out
  uncached blocks first, then cached ones least recently freed first (evicting their key).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


def block_key(parent: bytes, token_ids: list[int]) -> bytes:
    """The prefix key of a full block: blake2b-128 over the previous block's key and its ids."""
    return hashlib.blake2b(parent + np.asarray(token_ids, dtype=np.int64).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.key: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # key -> block
        # Free blocks in hand-out order: uncached ones in front, cached ones behind, oldest first.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of those, tokens found (their prefill skipped)
        self.evictions = 0  # cached blocks whose key was dropped to reuse the block

    @property
    def usable(self) -> int:
        return self.num_blocks - 1

    @property
    def used(self) -> int:
        """Blocks some sequence holds (cached free blocks are not used)."""
        return self.usable - len(self.free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def keys(self, token_ids: list[int], known: list[bytes], full_blocks: int) -> list[bytes]:
        """Extend `known` (the keys of a sequence's first blocks) to `full_blocks` keys."""
        bs = self.block_size
        for j in range(len(known), full_blocks):
            known.append(block_key(known[-1] if known else b"", token_ids[j * bs : (j + 1) * bs]))
        return known

    def match(self, keys: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `keys` (not taken yet)."""
        if not self.prefix_caching:
            return []
        out = []
        for k in keys:
            b = self.cached.get(k)
            if b is None:
                break
            out.append(b)
        return out

    def can_take(self, hits: list[int], new_blocks: int) -> bool:
        """Whether `hits` can be shared and `new_blocks` handed out now."""
        reclaimed = sum(1 for b in hits if self.ref[b] == 0)  # cached free blocks leave the queue
        return len(self.free) - reclaimed >= new_blocks

    def take(self, block: int) -> None:
        """Share a cached block."""
        if self.ref[block] == 0:
            del self.free[block]
        self.ref[block] += 1

    def allocate(self) -> int:
        block, _ = self.free.popitem(last=False)
        key = self.key[block]
        if key is not None:  # the least recently freed cached block gives up its key
            del self.cached[key]
            self.key[block] = None
            self.evictions += 1
        self.ref[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; the sequence's last blocks are evicted first."""
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
                if self.key[b] is None:
                    self.free.move_to_end(b, last=False)

    def register(self, block: int, key: bytes) -> None:
        """A block just became full: cache it under its prefix key (the first block with a key
        keeps it; a second one computed at the same time stays uncached)."""
        if self.prefix_caching and self.key[block] is None and key not in self.cached:
            self.cached[key] = block
            self.key[block] = key
