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


# KV groups (ModelConfig.kv_groups): a full-attention group and a sliding one of window 6, blocks of 4 tokens


def test_sliding_group_gives_back_the_blocks_its_window_left():
    bm = BlockManager(num_blocks=16, block_size=4, windows=(None, 6))
    assert bm.num_blocks == 15 and bm.num_free == 15  # page 0 is the null page
    a = seq(range(20))
    computed(bm, a, 8)
    bm.slide(a)  # the next token (position 8) sees 3..8: block 0 still needed
    assert len(a.tables) == 2 and 0 not in a.tables[0] + a.tables[1] and bm.num_free == 11
    computed(bm, a, 9)
    bm.slide(a)  # position 9 sees 4..9: block 0 (tokens 0..3) is left behind in the sliding group only
    assert a.tables[1][0] == 0 and a.tables[0][0] != 0 and bm.num_free == 10
    computed(bm, a, 20)
    bm.slide(a)  # position 20 sees 15..20: blocks 0..2 gone, 3 and 4 held
    assert a.tables[1][:3] == [0, 0, 0] and 0 not in a.tables[1][3:] and len(a.tables[0]) == 5
    assert bm.num_free == 15 - 5 - 2
    bm.check()
    bm.free_seq(a)  # the null entries are not released
    assert bm.num_free == 15
    bm.check()


def test_every_group_only_sliding_frees_all_it_left():
    bm = BlockManager(num_blocks=8, block_size=4, windows=(6,))
    a = seq(range(40))
    for n in range(1, 41):  # one token a step, as decodes: never more than 3 pages (window 6 spans up to 3 blocks)
        assert bm.grow(a, n)
        a.num_computed = n
        bm.commit(a)
        bm.slide(a)
        assert len(a.block_table) - a.block_table.count(0) <= 3
    bm.check()
    assert bm.pages_for(40, 1) == 3 and bm.pages_for(40, 8) == 5 and bm.pages_for(5, 8) == 2


def test_pages_for_counts_each_group():
    bm = BlockManager(num_blocks=64, block_size=4, windows=(None, None, 6, 6))
    assert bm.pages_for(100, 4) == 2 * 25 + 2 * 4 and bm.pages_for(6, 4) == 4 * 2


def test_prefix_hit_needs_each_sliding_groups_window_blocks():
    bm = BlockManager(num_blocks=32, block_size=4, windows=(None, 6))
    a = seq(range(30))
    computed(bm, a, 24)
    bm.slide(a)  # the sliding group keeps blocks 4 and 5 (tokens 19..23 in the window)
    b = seq(list(range(24)) + [99])
    bm.match_prefix(b)
    assert b.num_computed == 24  # all six blocks: the full group's, and the window's two in the sliding group
    assert b.tables[0] == a.tables[0] and b.tables[1][:4] == [0, 0, 0, 0] and b.tables[1][4:] == a.tables[1][4:]
    assert all(bm.blocks[i].ref_count == 2 for i in a.tables[1][4:])
    bm.free_seq(b)
    c = seq(list(range(16)) + [99] * 9)  # a shorter prefix: its window's blocks 2 and 3 were freed...
    bm.match_prefix(c)
    # ...but they stay cached until reused, so the 4-block prefix is found whole
    assert c.num_computed == 16 and c.tables[1][:2] == [0, 0] and 0 not in c.tables[1][2:]
    bm.free_seq(c)
    bm.free_seq(a)
    bm.check()


def test_prefix_hit_stops_where_a_sliding_block_was_reused():
    bm = BlockManager(num_blocks=14, block_size=4, windows=(None, 6))
    a = seq(range(30))
    computed(bm, a, 24)
    sliding = list(a.tables[1])
    bm.slide(a)  # frees the sliding group's blocks 3, 2, 1, 0 in that order; they stay cached
    assert list(bm.free) == [13] + sliding[3::-1]
    other = seq(range(100, 200))
    assert bm.grow(other, 4)  # a block in each group: the never used page, then the least recently freed: block 3's
    assert other.tables == [[13], [sliding[3]]]
    c = seq(list(range(20)) + [99])
    bm.match_prefix(c)
    # 20 tokens would need blocks 3 and 4 of the window, 16 blocks 2 and 3: block 3 is gone; 12 need 1 and 2
    assert c.num_computed == 12 and c.tables[1] == [0, sliding[1], sliding[2]]
    assert c.tables[0] == a.tables[0][:3]
    bm.free_seq(c)
    bm.free_seq(other)
    bm.free_seq(a)
    bm.check()
