from nimblelm.engine.kv_cache.block_manager import BlockManager


class Seq:
    def __init__(self, computed=0):
        self.block_ids = []
        self.num_computed_tokens = computed


def test_allocate_exact_ids_and_ref_counts():
    bm = BlockManager(num_blocks=6, block_size=4)
    a, b = Seq(), Seq()
    assert bm.blocks_needed(a, 5) == 2
    bm.allocate(a, 5)
    bm.allocate(b, 4)
    assert a.block_ids == [0, 1]
    assert b.block_ids == [2]
    assert bm.ref_counts == [1, 1, 1, 0, 0, 0]
    assert bm.num_free_blocks == 3


def test_growth_only_when_a_block_fills():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = Seq()
    bm.allocate(s, 3)
    s.num_computed_tokens = 3
    assert bm.blocks_needed(s, 1) == 0  # the 4th token still fits block 0
    bm.allocate(s, 1)
    s.num_computed_tokens = 4
    assert bm.blocks_needed(s, 1) == 1
    bm.allocate(s, 1)
    assert s.block_ids == [0, 1]


def test_free_returns_blocks_tail_first_and_reuses_oldest_free():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = Seq(), Seq()
    bm.allocate(a, 4)  # blocks 0, 1
    bm.allocate(b, 2)  # block 2
    bm.free(a)
    assert a.block_ids == []
    assert list(bm.free_block_ids) == [3, 1, 0]
    assert bm.ref_counts == [0, 0, 1, 0]
    c = Seq()
    bm.allocate(c, 6)
    assert c.block_ids == [3, 1, 0]
    assert bm.num_free_blocks == 0


def test_check_before_act():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = Seq()
    assert not bm.can_allocate(bm.blocks_needed(s, 9))
    try:
        bm.allocate(s, 9)
    except RuntimeError:
        pass
    else:
        raise AssertionError("allocate past the free blocks must refuse")
    assert s.block_ids == [] and bm.num_free_blocks == 2
    assert bm.usage == 0.0
