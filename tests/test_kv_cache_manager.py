"""The KV cache manager, asserted with exact block ids: allocation, prefix-cache hits and LRU eviction,
truncation, sliding-window groups. No torch."""

import subprocess
import sys

import pytest

from nimblelm.engine.kv_cache.manager import KVCacheManager, KVGroup, kv_groups


class Seq:
    _ids = iter(range(10**6))

    def __init__(self, tokens):
        self.seq_id = next(self._ids)
        self.token_ids = list(tokens)
        self.num_computed_tokens = 0
        self.block_hashes = []


def compute(kv, seq, n, cached=0):
    """What the scheduler and engine do for one step of n tokens: allocate, run, cache."""
    if kv.block_ids(seq) == []:
        seq.num_computed_tokens = cached
    new = kv.allocate_slots(seq, n, cached)
    assert new is not None
    seq.num_computed_tokens += n
    kv.cache_computed(seq)
    return new


def refs(kv):
    return [b.ref_count for b in kv.pool.blocks]


def test_kv_cache_is_torch_free():
    code = "import sys, nimblelm.engine.kv_cache.manager; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_allocate_exact_ids_grow_only_when_a_block_fills():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    a, b = Seq(range(5)), Seq(range(100, 104))
    assert compute(kv, a, 5) == [[0, 1]]
    assert compute(kv, b, 4) == [[2]]
    assert refs(kv) == [1, 1, 1, 0, 0, 0] and kv.num_free_blocks == 3
    a.token_ids += [7, 7, 7, 7]
    assert compute(kv, a, 3) == [[]]  # tokens 5-7 still fit block 1
    assert compute(kv, a, 1) == [[3]]
    assert kv.block_ids(a) == [[0, 1, 3]]


def test_check_before_act():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    s = Seq(range(9))
    assert kv.allocate_slots(s, 9) is None
    assert kv.block_ids(s) == [] and kv.num_free_blocks == 2 and kv.usage == 0.0


def test_prefix_hit_shares_full_blocks_and_never_the_last_token():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = Seq(range(10))
    compute(kv, a, 10)  # blocks 0, 1 full and cached; block 2 holds tokens 8-9
    b = Seq([*range(9), 99])
    assert kv.cached_prefix(b) == 8
    assert compute(kv, b, 2, cached=8) == [[3]]
    assert kv.block_ids(b) == [[0, 1, 3]] and refs(kv)[:4] == [2, 2, 1, 1]
    assert (kv.num_queried_tokens, kv.num_hit_tokens) == (20, 8)  # a looked up 10 and found none
    # A prompt that is all cached blocks still recomputes its last token: the hit stops a block short.
    c = Seq(range(8))
    assert kv.cached_prefix(c) == 4
    # Another start shares nothing, though its later tokens match.
    assert kv.cached_prefix(Seq([5, *range(1, 10)])) == 0


def test_freed_blocks_stay_cached_until_reused_least_recent_first():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = Seq(range(5))
    compute(kv, a, 5)  # blocks 0, 1 cached (tokens 0-3); block 2 holds token 4
    kv.free(a)
    # Uncached block 2 is reused first, then the cached ones, a's last block before its first.
    assert list(kv.pool._free) == [2, 3, 1, 0]
    b = Seq(range(5))
    assert kv.cached_prefix(b) == 4
    assert compute(kv, b, 1, cached=4) == [[2]]
    assert kv.block_ids(b) == [[0, 1, 2]]
    kv.free(b)
    c = Seq(range(50, 57))
    assert compute(kv, c, 7) == [[2, 3, 1, 0]]  # evicts b's blocks, its last first
    assert kv.pool.num_evictions == 2
    assert kv.cached_prefix(Seq(range(5))) == 0


def test_disabled_prefix_caching_finds_nothing():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = Seq(range(10))
    compute(kv, a, 10)
    kv.free(a)
    assert kv.cached_prefix(Seq(range(10))) == 0


def test_a_salt_separates_caches():
    a, b = KVCacheManager(8, 4, salt=b"int8"), KVCacheManager(8, 4, salt=b"float32")
    s, t = Seq(range(8)), Seq(range(8))
    a.allocate_slots(s, 8), b.allocate_slots(t, 8)
    assert a._hashes(s) != b._hashes(t)


def test_truncate_rolls_back_blocks_and_hashes():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    s = Seq(range(14))
    compute(kv, s, 14)  # blocks 0-3; 3 full blocks hashed
    kv.truncate(s, 6)
    del s.token_ids[6:]
    s.num_computed_tokens = 6
    assert kv.block_ids(s) == [[0, 1]] and len(s.block_hashes) == 1
    assert refs(kv)[:4] == [1, 1, 0, 0] and kv.num_free_blocks == 6
    s.token_ids += [40, 41]
    assert compute(kv, s, 2) == [[]]
    assert len(kv._hashes(s)) == 2


def test_kv_groups_split_layers_by_window_in_equal_sizes():
    assert kv_groups([None] * 4) == [KVGroup(None, (0, 1, 2, 3))]
    gemma = [512] * 5 + [None] + [512] * 5 + [None]
    assert kv_groups(gemma) == [
        KVGroup(512, (0, 1)), KVGroup(512, (2, 3)), KVGroup(512, (4, 6)), KVGroup(512, (7, 8)),
        KVGroup(512, (9, 10)), KVGroup(None, (5, 11)),
    ]


def test_sliding_window_group_drops_blocks_out_of_its_window():
    kv = KVCacheManager(num_blocks=16, block_size=4, group_windows=[None, 6])
    s = Seq(range(12))
    assert compute(kv, s, 12) == [[0, 1, 2], [3, 4, 5]]
    s.token_ids.append(12)
    # The query at position 12 sees positions 7-12: the sliding group's block 0 (0-3) is dropped.
    assert compute(kv, s, 1) == [[6], [7]]
    assert kv.block_ids(s) == [[0, 1, 2, 6], [4, 5, 7]] and kv.dropped_blocks(s) == [0, 1]
    assert refs(kv)[3] == 0 and kv.num_free_blocks == 16 - 7
    kv.free(s)
    assert kv.num_free_blocks == 16


def test_sliding_window_prefix_hit_needs_only_the_window():
    kv = KVCacheManager(num_blocks=32, block_size=4, group_windows=[6])
    a = Seq(range(21))
    compute(kv, a, 12)
    compute(kv, a, 9)  # drops blocks 0, 1 (dead for queries from 12 on) before computing 12-20
    kv.free(a)
    b = Seq([*range(20), 77])
    # Blocks 0 and 1 were dropped while a ran, but still cached: a hit of 20 tokens needs blocks 3, 4.
    assert kv.cached_prefix(b) == 20
    compute(kv, b, 1, cached=20)
    assert kv.dropped_blocks(b) == [3] and len(kv.block_ids(b)[0]) == 3  # blocks 3, 4 and one for 20


@pytest.mark.parametrize("windows", [[None], [6], [None, 6]])
def test_every_block_comes_back(windows):
    kv = KVCacheManager(num_blocks=40, block_size=4, group_windows=windows)
    seqs = [Seq([i % 3, *range(30)]) for i in range(4)]  # the fourth shares the first's prompt
    for s in seqs:
        cached = kv.cached_prefix(s)
        compute(kv, s, min(5, len(s.token_ids) - cached), cached)
        while s.num_computed_tokens < len(s.token_ids):
            compute(kv, s, min(7, len(s.token_ids) - s.num_computed_tokens))
    assert kv.num_hit_tokens == 28
    for s in seqs:
        kv.free(s)
    assert kv.num_free_blocks == 40 and all(r == 0 for r in refs(kv))


def test_compaction_swaps_in_fresh_blocks_after_the_step_and_never_caches_them():
    """A KV policy's compaction: the kept entries' blocks come from the pool at schedule time; after the step the
    old table (whose full blocks were offered to the prefix cache first) is released, and the sequence's later
    tokens continue in the new table as after dropped blocks. Its blocks hold a selection: never cached."""
    kv = KVCacheManager(num_blocks=16, block_size=4)
    seq = Seq(range(20))
    kv.allocate_slots(seq, 20)
    assert kv.num_entries(seq, 0, 20) == 20
    plan = kv.plan_compaction(seq, 20, [8])
    assert plan == [([5, 6], 3)] and kv.num_free_blocks == 9
    seq.num_computed_tokens = 20
    kv.cache_computed(seq)
    kv.finish_compaction(seq)
    assert kv.block_ids(seq) == [[5, 6]] and kv.dropped_blocks(seq) == [3] and kv.num_free_blocks == 14
    assert kv.num_entries(seq, 0, 21) == 9
    seq.token_ids += [1, 2, 3, 4]
    assert compute(kv, seq, 4) == [[7]]
    assert kv.block_ids(seq) == [[5, 6, 7]]
    assert len(kv.pool._cached) == 5  # the prompt's 5 full blocks, none of the compacted ones
    assert kv.cached_prefix(Seq(list(range(20)) + [9])) == 20
    kv.free(seq)
    assert kv.num_free_blocks == 16


def test_a_sliding_group_is_left_alone_and_a_freed_plan_returns_its_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=4, group_windows=[None, 4])
    seq = Seq(range(12))
    kv.allocate_slots(seq, 12)
    assert kv.plan_compaction(seq, 12, [4, None]) == [([6], 2), None]
    kv.free(seq)
    assert kv.num_free_blocks == 8


def test_a_compaction_short_of_free_blocks_overwrites_the_sequences_own():
    """With the pool short, the kept entries go into the first blocks of the sequence's own table, which leave
    the prefix cache (their K/V change), and so does everything it computes later; a block another sequence
    shares cannot be overwritten, and then there is no compaction."""
    kv = KVCacheManager(num_blocks=6, block_size=4)
    seq = Seq(range(20))
    compute(kv, seq, 20)
    assert len(kv.pool._cached) == 5 and kv.num_free_blocks == 1
    assert kv.plan_compaction(seq, 20, [8]) == [([0, 1], 3)]
    assert len(kv.pool._cached) == 3  # blocks 0 and 1 no longer findable
    kv.finish_compaction(seq)
    assert kv.block_ids(seq) == [[0, 1]] and kv.num_free_blocks == 4
    seq.token_ids += [1, 2, 3, 4]
    compute(kv, seq, 4)
    assert len(kv.pool._cached) == 3
    kv.free(seq)
    assert kv.num_free_blocks == 6

    kv = KVCacheManager(num_blocks=4, block_size=4)
    first, second = Seq(range(9)), Seq(range(9))
    compute(kv, first, 9)
    compute(kv, second, 1, cached=kv.cached_prefix(second))  # shares blocks 0 and 1, takes the last free one
    assert kv.num_free_blocks == 0
    assert kv.plan_compaction(first, 9, [5]) is None
    assert len(kv.pool._cached) == 2
