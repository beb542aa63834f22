"""Paged KV bookkeeping: which pages are free, who holds each (reference counts), and the prefix cache.

No tensors here. A sequence holds one block table per KV group (ModelConfig.kv_groups: most models have one group
of all layers; Gemma 3 has full-attention groups and sliding-window ones); entry i of a table is the page that holds
tokens [i * block_size, (i + 1) * block_size) for that group's layers, all pages alike in one pool. A sliding group
of window W needs, once c tokens are computed, only the keys from c - W + 1 on: after each step (slide) the blocks
below (c - W + 1) // block_size give their pages back and their entries point at the null page, page 0, which is
kept out of use and never written (the kernels start at the window, or mask what lies before it).

A full block whose K/V are computed gets a hash of (previous block's hash, its tokens), so equal prefixes share
pages. A page whose count drops to zero goes to the back of the free queue but keeps its hash: until it is handed
out again, a request with the same prefix picks it up (least recently freed pages are reused first). A cached
prefix counts only as far as every sliding group still has the blocks its window needs there.
"""

from collections import deque
from typing import Optional

NULL = 0  # the null page, where a pool has sliding groups


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids", "group")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: Optional[int] = None
        self.token_ids: tuple = ()
        self.group = 0  # the KV group whose prefix cache holds it, while hashed


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 windows: tuple = (None,)):
        """num_blocks pages; windows: each KV group's sliding window in tokens, or None for full attention."""
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.windows = tuple(windows)
        self.sliding = any(w is not None for w in self.windows)
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: deque[int] = deque(range(1 if self.sliding else 0, num_blocks))  # ref_count 0, oldest first
        self.free_set = set(self.free)
        self.cached: dict[tuple[int, int], int] = {}  # (group, hash) -> page
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, found

    @property
    def num_blocks(self) -> int:
        """Pages that sequences can hold (the null page aside)."""
        return len(self.blocks) - self.sliding

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def pages_for(self, num_tokens: int, chunk: int) -> int:
        """The most pages one sequence of num_tokens tokens holds at once, computing up to chunk tokens a step."""
        n = self.blocks_for(num_tokens)
        return sum(n if w is None else min(n, self.blocks_for(w + chunk) + 1) for w in self.windows)

    def _dead(self, computed: int, window: Optional[int]) -> int:
        """How many leading blocks a sliding group no longer needs once `computed` tokens are computed."""
        return 0 if window is None else max(0, (computed - window + 1) // self.block_size)

    def _tables(self, seq) -> list[list[int]]:
        if not seq.tables:
            seq.tables = [[] for _ in self.windows]
        return seq.tables

    def _take_free(self) -> int:
        block_id = self.free.popleft()
        self.free_set.discard(block_id)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get((block.group, block.hash)) == block_id:
            del self.cached[(block.group, block.hash)]  # its old contents are about to be overwritten
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def _hold(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self.free.remove(block_id)
            self.free_set.discard(block_id)
        block.ref_count += 1

    def _drop(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"block {block_id} released twice"
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free.append(block_id)
            self.free_set.add(block_id)

    @staticmethod
    def chain_hash(prev: Optional[int], token_ids: tuple) -> int:
        return hash((prev, token_ids))

    def _cached(self, group: int, h: int, tokens: tuple) -> Optional[int]:
        block_id = self.cached.get((group, h))
        return block_id if block_id is not None and self.blocks[block_id].token_ids == tokens else None

    def match_prefix(self, seq) -> None:
        """Give a fresh sequence the cached pages of its longest cached prefix. At least one token is left to
        compute, since the last prompt token's logits are needed."""
        assert not seq.block_table and seq.num_computed == 0
        tables = self._tables(seq)
        if not self.enable_prefix_caching:
            return
        bs, prev, found, hashes = self.block_size, None, [], []
        self.prefix_queries += seq.num_tokens
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            prev = self.chain_hash(prev, tokens)
            pages = [self._cached(g, prev, tokens) for g in range(len(self.windows))]
            if any(p is None for p, w in zip(pages, self.windows) if w is None):
                break
            found.append(pages)
            hashes.append(prev)
        k = len(found)  # the longest prefix where each sliding group holds the blocks its window needs
        while k and any(found[i][g] is None for g, w in enumerate(self.windows) if w is not None
                        for i in range(self._dead(k * bs, w), k)):
            k -= 1
        for g, (w, table) in enumerate(zip(self.windows, tables)):
            dead = self._dead(k * bs, w)
            for i in range(k):
                if i < dead:
                    table.append(NULL)
                else:
                    self._hold(found[i][g])
                    table.append(found[i][g])
        seq.num_computed = seq.num_cached_tokens = k * bs
        seq.num_hashed_blocks, seq.last_block_hash = k, hashes[k - 1] if k else None
        self.prefix_hits += seq.num_computed

    def _need(self, seq, num_tokens: int) -> int:
        n = self.blocks_for(num_tokens)
        return sum(max(0, n - len(t)) for t in seq.tables) if seq.tables else n * len(self.windows)

    def can_grow(self, seq, num_tokens: int) -> bool:
        return self._need(seq, num_tokens) <= self.num_free

    def grow(self, seq, num_tokens: int) -> bool:
        """Make seq's block tables cover num_tokens tokens; False (and no change) if pages are short."""
        if self._need(seq, num_tokens) > self.num_free:
            return False
        n = self.blocks_for(num_tokens)
        for table in self._tables(seq):
            while len(table) < n:
                table.append(self._take_free())
        return True

    def commit(self, seq) -> None:
        """Register seq's computed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(seq.num_hashed_blocks, seq.num_computed // bs):
            h = self.chain_hash(seq.last_block_hash, tuple(seq.token_ids[i * bs:(i + 1) * bs]))
            for g, table in enumerate(seq.tables):
                block = self.blocks[table[i]]
                if block.hash is None and (g, h) not in self.cached and not (self.sliding and table[i] == NULL):
                    block.hash, block.token_ids, block.group = h, tuple(seq.token_ids[i * bs:(i + 1) * bs]), g
                    self.cached[(g, h)] = block.block_id  # else another page holds the same prefix: keep that one
            seq.last_block_hash, seq.num_hashed_blocks = h, i + 1

    def slide(self, seq) -> None:
        """Give back the pages of the blocks that seq's sliding windows have left (after its computed tokens grew)."""
        if not self.sliding:
            return
        for w, table in zip(self.windows, seq.tables):
            i = min(self._dead(seq.num_computed, w), len(table)) - 1
            while i >= 0 and table[i] != NULL:
                self._drop(table[i])
                table[i] = NULL
                i -= 1

    def release(self, tables: list[list[int]]) -> None:
        """Drop one reference to each page of the tables; the tail is freed first, so shared prefixes stay cached
        longer."""
        for i in reversed(range(max(map(len, tables), default=0))):
            for table in tables:
                if i < len(table) and not (self.sliding and table[i] == NULL):
                    self._drop(table[i])

    def free_seq(self, seq) -> None:
        self.release(seq.tables)
        seq.tables = []
        seq.num_computed = seq.num_hashed_blocks = 0
        seq.last_block_hash = None

    def check(self) -> None:
        """Invariants, for tests: counts match holders, the free queue holds exactly the unheld pages (the null
        page neither)."""
        assert len(self.free) == len(self.free_set)
        for block in self.blocks:
            if self.sliding and block.block_id == NULL:
                assert block.ref_count == 0 and NULL not in self.free_set
                continue
            assert (block.ref_count == 0) == (block.block_id in self.free_set), block.block_id
