"""KV-cache accounting: which fixed-size blocks each sequence owns. Torch-free; the tensors live in
the model runner. Every change is a pure check (`blocks_needed`, `can_allocate`) then an act."""

from __future__ import annotations

from collections import deque
from typing import Protocol


class HasBlocks(Protocol):
    block_ids: list[int]
    num_computed_tokens: int


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        # Freed blocks go to the back, so the longest-free block is reused first.
        self.free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: HasBlocks, num_new_tokens: int) -> int:
        """New blocks `seq` needs so that its next `num_new_tokens` tokens have slots."""
        return max(0, self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free_block_ids)

    def allocate(self, seq: HasBlocks, num_new_tokens: int) -> None:
        needed = self.blocks_needed(seq, num_new_tokens)
        if not self.can_allocate(needed):
            raise RuntimeError(f"allocate of {needed} blocks with {self.num_free_blocks} free: check first")
        for _ in range(needed):
            block_id = self.free_block_ids.popleft()
            self.ref_counts[block_id] = 1
            seq.block_ids.append(block_id)

    def free(self, seq: HasBlocks) -> None:
        # Last block first: a sequence's tail is the least likely to be shared once prefixes are cached.
        for block_id in reversed(seq.block_ids):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.append(block_id)
        seq.block_ids = []
