"""KV cache accounting: which blocks hold each sequence's K/V, per KV group, and which full blocks are
cached for reuse by later prompts with the same prefix. Torch-free; the tensors live in the model runner.

A KV group is a set of layers with one attention window (None: the whole context). Each group gives a
sequence its own block table, all groups drawing on one block pool; a block of a group holds the K/V of
that group's layers at block_size consecutive KV entries. A table holds only the blocks the sequence still
attends to, so a token's place in it is not its position: a group that dropped d blocks from the front of
its table keeps the K/V of position p at entry p - d * block_size. A sliding-window group drops the
blocks that fell out of its window this way, so they serve other sequences.

Prefix caching: a full block is identified by a hash chained over the tokens from the start of the
sequence (and a salt naming whatever else changes the K/V: model, dtype, quantization). Once a block's
tokens are computed it is cached under (group, hash); when its sequence ends, it stays cached on the free
list until an allocation needs it (least recently freed first). A new sequence starts from the longest
prefix whose blocks every group still has, but never its whole prompt: the last token is recomputed to
give the logits.

Compaction (KV policies, kv_cache/policy.py): a sequence's entries in its full-attention groups are
gathered into fresh blocks by the model runner during a step, and its old blocks are released after it.
The kept count leaves the sequence's next position on a block boundary of its new table, so its later
tokens are found as in a table that dropped blocks from its front. A compacted sequence's blocks hold a
selection, not a prefix: they are never offered to the prefix cache (its prompt's full blocks were, before
the compaction released them).
"""

from __future__ import annotations

import hashlib
import math
from array import array
from dataclasses import dataclass, field
from typing import Protocol

from nimblelm.engine.kv_cache.block_pool import Block, BlockPool


class KVRequest(Protocol):
    seq_id: int
    token_ids: list[int]
    num_computed_tokens: int
    block_hashes: list[bytes]  # chained hashes of its full blocks, filled by the manager


@dataclass
class _Probe:
    """A prompt looked up in the prefix cache without being a sequence."""

    token_ids: list[int]
    seq_id: int = -1
    num_computed_tokens: int = 0
    block_hashes: list[bytes] = field(default_factory=list)


@dataclass
class _Held:
    """A sequence's blocks: per group, its table and how many blocks were dropped from the front of it."""

    tables: list[list[Block]]
    dropped: list[int]
    num_cached: int  # leading blocks already offered to the prefix cache
    compacted: bool = False
    pending: dict[int, tuple[list[Block], int]] | None = None  # per group, a compaction's new table and dropped


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        group_windows: list[int | None] | None = None,
        enable_prefix_caching: bool = True,
        salt: bytes = b"",
    ):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.windows = list(group_windows) if group_windows else [None]
        self.enable_prefix_caching = enable_prefix_caching
        self.salt = salt
        self._held: dict[int, _Held] = {}  # by seq_id
        self.num_queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0  # of those, tokens found cached

    # -- state ----------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; False, changing nothing, while a sequence holds blocks."""
        return self.pool.reset_cache()

    def block_ids(self, seq: KVRequest) -> list[list[int]]:
        """Per group, the sequence's block table."""
        held = self._held.get(seq.seq_id)
        return [[b.block_id for b in table] for table in held.tables] if held else []

    def dropped_blocks(self, seq: KVRequest) -> list[int]:
        """Per group, how many blocks the sequence's table dropped from its front."""
        held = self._held.get(seq.seq_id)
        return list(held.dropped) if held else []

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_short(self, seq: KVRequest, num_tokens: int, num_cached_tokens: int = 0) -> int:
        """The blocks seq's tables still lack to hold its first num_tokens tokens (for a sequence not yet holding
        blocks: beyond the num_cached_tokens it would share), counting every group as whole."""
        held = self._held.get(seq.seq_id)
        if held is None:
            return len(self.windows) * (self.blocks_for(num_tokens) - num_cached_tokens // self.block_size)
        total = self.blocks_for(num_tokens)
        return sum(max(0, total - d - len(t)) for t, d in zip(held.tables, held.dropped))

    # -- prefix cache ---------------------------------------------------------------------------

    def cached_prefix(self, seq: KVRequest) -> int:
        """Tokens at the start of `seq` whose K/V every group has cached: a multiple of block_size, below
        the sequence's length. Changes nothing."""
        if not self.enable_prefix_caching:
            return 0
        hashes = self._hashes(seq)
        n = min(len(hashes), (len(seq.token_ids) - 1) // self.block_size)
        settled = False
        while not settled:  # each group can only lower n; stop when none does
            settled = True
            for g, window in enumerate(self.windows):
                m = self._group_hit(g, window, hashes, n)
                if m < n:
                    n, settled = m, False
        return n * self.block_size

    def _group_hit(self, g: int, window: int | None, hashes: list[bytes], n: int) -> int:
        """The largest k <= n such that group g has cached every block the tokens after k * block_size
        would attend to."""
        if window is None:
            for k in range(n):
                if self.pool.lookup((g, hashes[k])) is None:
                    return k
            return n
        for k in range(n, 0, -1):
            first = self._first_in_window(k * self.block_size, window)
            if all(self.pool.lookup((g, hashes[j])) is not None for j in range(first, k)):
                return k
        return 0

    def _first_in_window(self, position: int, window: int) -> int:
        """The first block a query at `position` still attends to."""
        return max(0, position - window + 1) // self.block_size

    def _hashes(self, seq: KVRequest) -> list[bytes]:
        """The chained hashes of seq's full blocks, extended to its current tokens."""
        hashes, bs = seq.block_hashes, self.block_size
        for j in range(len(hashes), len(seq.token_ids) // bs):
            parent = hashes[j - 1] if j else self.salt
            hashes.append(hashlib.sha256(parent + array("q", seq.token_ids[j * bs : (j + 1) * bs]).tobytes()).digest())
        return hashes

    def blocks_filled(self, seq: KVRequest, start: int, num_tokens: int) -> list[bytes]:
        """The hashes of the blocks that computing seq's tokens start .. start + num_tokens completes
        (none without prefix caching)."""
        if not self.enable_prefix_caching:
            return []
        return self._hashes(seq)[start // self.block_size : (start + num_tokens) // self.block_size]

    def cache_computed(self, seq: KVRequest) -> None:
        """Offer seq's computed full blocks to the prefix cache (after the step that computed them)."""
        held = self._held[seq.seq_id]
        if not self.enable_prefix_caching or held.compacted:
            return
        # Kept drafts count as computed before they join the tokens: their blocks are cached a step later.
        full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        if full <= held.num_cached:
            return
        hashes = self._hashes(seq)
        for g, (table, dropped) in enumerate(zip(held.tables, held.dropped)):
            for j in range(max(held.num_cached, dropped), full):
                self.pool.cache(table[j - dropped], (g, hashes[j]))
        held.num_cached = full

    # -- a prefix computed by another engine (disaggregated prefill) ------------------------------

    def prefix_blocks(self, token_ids: list[int]) -> tuple[list[bytes], list[tuple[int, list[int]]]]:
        """The cached full blocks at the start of a prompt: their hashes, and per group the first block it holds
        (a sliding group only those a query after them sees) and the ids of its blocks from there on."""
        probe = _Probe(list(token_ids))
        k = self.cached_prefix(probe) // self.block_size
        return self._hashes(probe)[:k], [(first, [b.block_id for b in blocks])
                                         for blocks, first in self._cached_blocks(probe, k)]

    def adopt_prefix(self, hashes: list[bytes], firsts: list[int]) -> list[list[tuple[int, int]]] | None:
        """Free blocks, filed in the prefix cache under another engine's hashes (per group, its blocks from
        firsts[g] on), for that engine's K/V to be written into before the next step. Returns per group the
        (index among the group's blocks, block id) of each block taken: the blocks already cached here take none.
        None, changing nothing, when the pool cannot supply them."""
        if not self.enable_prefix_caching:
            return None
        wanted = [[i for i, h in enumerate(hashes[first:]) if self.pool.lookup((g, h)) is None]
                  for g, first in enumerate(firsts)]
        if sum(map(len, wanted)) > self.pool.num_free:
            return None
        placed = []
        for g, (first, indices) in enumerate(zip(firsts, wanted)):
            blocks = self.pool.take(len(indices))
            for i, block in zip(indices, blocks):
                self.pool.cache(block, (g, hashes[first + i]))
            self.pool.release(blocks)  # free, and found by their hashes until evicted
            placed.append([(i, b.block_id) for i, b in zip(indices, blocks)])
        return placed

    # -- allocation -----------------------------------------------------------------------------

    def allocate_slots(self, seq: KVRequest, num_new_tokens: int, num_cached_tokens: int = 0) -> list[list[int]] | None:
        """Blocks for seq's next num_new_tokens tokens, after its num_computed_tokens (for a sequence
        not yet holding blocks: after num_cached_tokens, as cached_prefix found them, which it then
        shares). Returns per group the ids of the blocks it took, or None, changing nothing, when the
        pool cannot supply them."""
        held = self._held.get(seq.seq_id)
        if held is None:
            start = num_cached_tokens
            hits = self._cached_blocks(seq, start // self.block_size)
            tables, dropped = [t for t, _ in hits], [d for _, d in hits]
        else:
            start = seq.num_computed_tokens
            self._drop_out_of_window(held, start)
            tables, dropped = held.tables, held.dropped
        total = self.blocks_for(start + num_new_tokens)
        needed = [max(0, total - d - len(t)) for t, d in zip(tables, dropped)]
        shared = [b for t in tables for b in t] if held is None else []
        if sum(needed) > self.pool.num_free - self.pool.num_free_among(shared):
            return None
        if held is None:
            self.pool.share(shared)
            self._held[seq.seq_id] = _Held(tables, dropped, start // self.block_size)
            if self.enable_prefix_caching:
                self.num_queried_tokens += len(seq.token_ids)
                self.num_hit_tokens += num_cached_tokens
        new_ids = []
        for table, n in zip(tables, needed):
            blocks = self.pool.take(n)
            table.extend(blocks)
            new_ids.append([b.block_id for b in blocks])
        return new_ids

    def _cached_blocks(self, seq: KVRequest, k: int) -> list[tuple[list[Block], int]]:
        """Per group, the cached blocks of seq's first k blocks that a query after them attends to, and
        how many blocks before them it does not."""
        hashes = self._hashes(seq)[:k]
        out = []
        for g, window in enumerate(self.windows):
            first = 0 if window is None else self._first_in_window(k * self.block_size, window)
            out.append(([self.pool.lookup((g, h)) for h in hashes[first:]], first))
        return out

    def _drop_out_of_window(self, held: _Held, num_computed: int) -> None:
        """Release the blocks no query from position num_computed on can see, in sliding groups."""
        for g, window in enumerate(self.windows):
            if window is None:
                continue
            dead = self._first_in_window(num_computed, window) - held.dropped[g]
            if dead > 0:
                table = held.tables[g]
                self.pool.release(table[:dead])
                del table[:dead]
                held.dropped[g] += dead

    # -- compaction -----------------------------------------------------------------------------

    def num_entries(self, seq: KVRequest, group: int, num_tokens: int) -> int:
        """The entries seq's table in `group` holds once its first num_tokens tokens are computed."""
        return num_tokens - self.block_size * self._held[seq.seq_id].dropped[group]

    def plan_compaction(self, seq: KVRequest, num_tokens: int,
                        keep: list[int | None]) -> list[tuple[list[int], int] | None] | None:
        """Blocks for the keep[g] entries that seq's table in group g keeps once its first num_tokens tokens are
        computed: per group, (their ids, the blocks then dropped from the table's front), None where keep[g] is.
        With prefix caching, and blocks not compacted before, fresh blocks where the pool has them, so that the
        prompt's own blocks can still serve the cache; else the first blocks of the sequence's own tables, overwritten in place, where no
        other sequence holds them (they leave the prefix cache, and so do the sequence's blocks from then on).
        None, changing nothing, when neither can be had."""
        held = self._held[seq.seq_id]
        sizes = {g: self.blocks_for(k) for g, k in enumerate(keep) if k is not None}
        own = {g: held.tables[g][:n] for g, n in sizes.items()}
        own_ok = all(b.ref_count == 1 for blocks in own.values() for b in blocks)
        cacheable = self.enable_prefix_caching and not held.compacted
        if sum(sizes.values()) <= self.pool.num_free and (cacheable or not own_ok):
            new = {g: self.pool.take(n) for g, n in sizes.items()}
        elif own_ok:
            new = own
            for b in (b for blocks in new.values() for b in blocks):
                self.pool.uncache(b)
            held.compacted = True
        else:
            return None
        held.pending = {g: (blocks, (num_tokens - keep[g]) // self.block_size) for g, blocks in new.items()}
        return [([b.block_id for b in held.pending[g][0]], held.pending[g][1]) if g in held.pending else None
                for g in range(len(self.windows))]

    def finish_compaction(self, seq: KVRequest) -> None:
        """After the step that gathered seq's kept entries: its new tables replace the old, whose other blocks
        are released."""
        held = self._held[seq.seq_id]
        for g, (blocks, dropped) in held.pending.items():
            kept = set(blocks)
            self.pool.release([b for b in held.tables[g][::-1] if b not in kept])
            held.tables[g] = blocks
            held.dropped[g] = dropped
        held.pending = None
        held.compacted = True

    def free(self, seq: KVRequest) -> None:
        """Release all of seq's blocks: the cached ones stay findable until reused, its last blocks
        evicted first."""
        held = self._held.pop(seq.seq_id, None)
        for table in held.tables if held else []:
            self.pool.release(table[::-1])
        for g, (blocks, _) in (held.pending or {}).items() if held else []:
            self.pool.release([b for b in blocks if b not in set(held.tables[g])])  # fresh ones, not its own

    def truncate(self, seq: KVRequest, num_tokens: int) -> None:
        """Keep only the blocks of seq's first num_tokens tokens (rolling back tokens that will not stay,
        such as rejected speculative ones); the caller truncates seq's tokens to match."""
        del seq.block_hashes[num_tokens // self.block_size :]
        held = self._held.get(seq.seq_id)
        if held is None:
            return
        keep = self.blocks_for(num_tokens)
        for table, dropped in zip(held.tables, held.dropped):
            kept = max(0, keep - dropped)
            self.pool.release(table[kept:][::-1])
            del table[kept:]
        held.num_cached = min(held.num_cached, num_tokens // self.block_size)


@dataclass(frozen=True)
class KVGroup:
    window: int | None
    layers: tuple[int, ...]


def kv_groups(layer_windows: list[int | None], full_layers_apart: bool = False) -> list[KVGroup]:
    """Layers split into KV groups of one window and one size, so that a block of any group is the same
    bytes: the runner keeps `size` tensors, and layer i of each group stores its K/V in tensor i. With
    one window throughout, one group holds every layer; Gemma 3's 15 sliding and 3 full layers make five
    sliding groups and one full group of three layers each. full_layers_apart: each full-attention layer is a
    group of its own, so that each can keep its own number of entries (PyramidKV's budgets by layer)."""
    by_window: dict[int | None, list[int]] = {}
    for layer, window in enumerate(layer_windows):
        by_window.setdefault((layer,) if full_layers_apart and window is None else window, []).append(layer)
    size = math.gcd(*(len(layers) for layers in by_window.values()))
    return [
        KVGroup(None if isinstance(window, tuple) else window, tuple(layers[i : i + size]))
        for window, layers in by_window.items()
        for i in range(0, len(layers), size)
    ]
