"""The KV blocks themselves: reference counts, the hashes of cached full blocks, and the free list.

Torch-free. A free block may still hold a cached prefix: it stays findable by its hash until a new
allocation takes it, and allocations take the least recently freed block first, so the cache keeps
what was used last (LRU eviction).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    cache_key: Hashable | None = None  # set while the block holds a cached full block's K/V


class BlockPool:
    def __init__(self, num_blocks: int):
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order: the first is taken first.
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[Hashable, Block] = {}
        self.num_evictions = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[Block]:
        """n free blocks, referenced once each; the caller checked num_free first."""
        if n > len(self._free):
            raise RuntimeError(f"take of {n} blocks with {len(self._free)} free: check first")
        taken = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.cache_key is not None:
                del self._cached[block.cache_key]
                block.cache_key = None
                self.num_evictions += 1
            block.ref_count = 1
            taken.append(block)
        return taken

    def lookup(self, key: Hashable) -> Block | None:
        return self._cached.get(key)

    def num_free_among(self, blocks: list[Block]) -> int:
        return sum(1 for b in blocks if b.ref_count == 0)

    def share(self, blocks: list[Block]) -> None:
        """One more reference to each of `blocks` (cache hits); a free one leaves the free list."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1

    def release(self, blocks: list[Block]) -> None:
        """One reference less to each; those no one holds become free. A block that holds a cached prefix
        goes to the back of the free list (evicted last, in the order released); one that holds nothing
        reusable goes to the front."""
        for block in blocks:
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block.block_id] = block
                if block.cache_key is None:
                    self._free.move_to_end(block.block_id, last=False)

    def reset_cache(self) -> bool:
        """Forget every cached prefix, where no block is in use (else change nothing and say False)."""
        if len(self._free) < len(self.blocks):
            return False
        for block in self._cached.values():
            block.cache_key = None
        self._cached.clear()
        return True

    def uncache(self, block: Block) -> None:
        """Make `block` unfindable: its K/V are about to change."""
        if block.cache_key is not None:
            del self._cached[block.cache_key]
            block.cache_key = None

    def cache(self, block: Block, key: Hashable) -> None:
        """Make `block` findable by `key`. If another block already holds the same K/V, keep that one."""
        if block.cache_key is None and key not in self._cached:
            block.cache_key = key
            self._cached[key] = block
