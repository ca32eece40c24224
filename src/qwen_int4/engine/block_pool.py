"""The KV block pool: which blocks are free, who holds them, and the prefix cache. Plain Python.

Every sequence holds a list of block ids (its block table); a block is shared when several
sequences start with the same tokens. Full blocks are registered in the prefix cache under
a hash of (parent block's hash, their token ids), so a later sequence with the same prefix
(the system prompt of every chat, n choices of one request, a preempted sequence coming
back) takes them instead of recomputing. Blocks with no holder wait in an LRU free queue;
a free block keeps its cached content until it is handed out again (evicted), least
recently freed first.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence


class NoFreeBlocks(RuntimeError):
    """Raised by allocate() when fewer blocks are free than asked for."""


def hash_block(parent: bytes | None, token_ids: Sequence[int], salt: str = "") -> bytes:
    """Prefix-cache key of a full block: sha256 over the parent's key and the block's ids.

    `salt` distinguishes blocks whose K/V differ for the same tokens (the NTK alpha that
    rotated the keys); it is mixed into the first block and so inherited by the rest.
    """
    h = hashlib.sha256(parent if parent is not None else f"root:{salt}".encode())
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockPool:
    """`num_blocks` KV blocks with reference counts and a prefix cache of full blocks."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU first
        self._cached: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks nobody holds (some of them still cached, evictable)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def allocate(self, n: int) -> list[int]:
        """Hand out `n` blocks (ref count 1), evicting the least recently freed cached ones."""
        if n > len(self._free):
            raise NoFreeBlocks(f"asked for {n} KV blocks, {len(self._free)} free of {self.num_blocks}")
        blocks = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            self._evict(block)
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block; unreferenced ones join the free queue in this order
        (free a sequence's blocks tail first, so its shared prefix is evicted last)."""
        for block in blocks:
            if self.ref_counts[block] <= 0:
                raise ValueError(f"block {block} freed more times than it was allocated")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free[block] = None

    def lookup(self, block_hash: bytes) -> int | None:
        """The cached block holding this content, or None."""
        return self._cached.get(block_hash)

    def take(self, block: int) -> None:
        """Add a holder to a cached block found by lookup() (it leaves the free queue if it was there)."""
        if self.ref_counts[block] == 0:
            del self._free[block]
        self.ref_counts[block] += 1

    def cache(self, block: int, block_hash: bytes) -> None:
        """Register a full, computed block under `block_hash` (no-op if that content is cached already)."""
        if not self.enable_prefix_caching or block_hash in self._cached or self.block_hash[block] is not None:
            return
        self.block_hash[block] = block_hash
        self._cached[block_hash] = block

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (their content stays until overwritten)."""
        self._cached.clear()
        self.block_hash = [None] * self.num_blocks

    def _evict(self, block: int) -> None:
        block_hash = self.block_hash[block]
        if block_hash is not None:
            del self._cached[block_hash]
            self.block_hash[block] = None
