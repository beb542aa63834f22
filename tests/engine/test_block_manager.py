from lmcli.engine.block_manager import BlockManager
from lmcli.engine.sampling_params import SamplingParams
from lmcli.engine.sequence import Sequence


def seq(tokens):
    return Sequence(list(tokens), SamplingParams())


def computed(bm, s, n):
    assert bm.grow(s, n)
    s.num_computed = n
    bm.commit(s)


def test_grow_and_free_return_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = seq(range(10)), seq(range(100, 105))
    assert bm.grow(a, 10) and len(a.block_table) == 3
    assert bm.grow(b, 5) and len(b.block_table) == 2
    assert bm.num_free == 3
    assert not bm.grow(a, 30)  # needs 5 more: refused, nothing taken
    assert len(a.block_table) == 3 and bm.num_free == 3
    bm.free_seq(a)
    bm.free_seq(b)
    assert bm.num_free == 8 and a.block_table == [] and a.num_computed == 0
    bm.check()


def test_prefix_hit_shares_full_blocks_with_ref_counts():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(11))  # blocks [0..3], [4..7] full, [8..10] partial
    computed(bm, a, 11)
    b = seq(list(range(9)) + [99, 98])
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:2]  # the two full blocks
    assert b.num_computed == b.num_cached_tokens == 8
    assert all(bm.blocks[i].ref_count == 2 for i in a.block_table[:2])
    assert bm.blocks[a.block_table[2]].ref_count == 1
    bm.free_seq(a)
    assert all(bm.blocks[i].ref_count == 1 for i in b.block_table)
    bm.free_seq(b)
    assert bm.num_free == 16
    bm.check()


def test_prefix_hit_needs_the_same_earlier_blocks():
    bm = BlockManager(num_blocks=16, block_size=4)
    computed(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 9]), 9)
    c = seq([0, 2, 3, 4, 5, 6, 7, 8, 9])  # same second block, other first block: no hit
    bm.match_prefix(c)
    assert c.block_table == [] and c.num_computed == 0


def test_a_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    computed(bm, seq(range(8)), 8)
    d = seq(range(8))
    bm.match_prefix(d)
    assert d.num_computed == 4  # the second block holds the last token, whose logits are needed


def test_freed_blocks_stay_cached_until_reused_least_recent_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(range(8))
    computed(bm, a, 8)
    first, second = a.block_table
    bm.free_seq(a)
    assert list(bm.free)[-2:] == [second, first]  # the tail is freed first, so it is reused first
    e = seq(range(9))
    bm.match_prefix(e)  # blocks with ref 0 are picked up from the free queue
    assert e.block_table == [first, second] and bm.num_free == 2
    bm.free_seq(e)
    f = seq(range(500, 516))  # takes all four blocks: the cached ones are overwritten
    assert bm.grow(f, 16)
    assert bm.cached == {}
    g = seq(range(9))
    bm.match_prefix(g)
    assert g.block_table == []
    bm.check()


def test_prefix_caching_off():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    computed(bm, seq(range(9)), 9)
    h = seq(range(9))
    bm.match_prefix(h)
    assert h.num_computed == 0 and bm.cached == {}
