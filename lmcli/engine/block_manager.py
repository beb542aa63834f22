"""Paged KV bookkeeping: which blocks are free, who holds each (reference counts), and the prefix cache.

No tensors here. A full block whose K/V are computed gets a hash of (previous block's hash, its tokens), so
equal prefixes share blocks. A block whose count drops to zero goes to the back of the free queue but keeps
its hash: until it is handed out again, a request with the same prefix picks it up (least recently freed
blocks are reused first).
"""

from collections import deque
from typing import Optional


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: Optional[int] = None
        self.token_ids: tuple = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: deque[int] = deque(range(num_blocks))  # ref_count 0, oldest first
        self.free_set = set(range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take_free(self) -> int:
        block_id = self.free.popleft()
        self.free_set.discard(block_id)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]  # its old contents are about to be overwritten
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def _hold(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self.free.remove(block_id)
            self.free_set.discard(block_id)
        block.ref_count += 1

    @staticmethod
    def chain_hash(prev: Optional[int], token_ids: tuple) -> int:
        return hash((prev, token_ids))

    def match_prefix(self, seq) -> None:
        """Give a fresh sequence the cached blocks of its longest cached prefix. At least one token is left to
        compute, since the last prompt token's logits are needed."""
        assert not seq.block_table and seq.num_computed == 0
        if not self.enable_prefix_caching:
            return
        bs, prev = self.block_size, None
        limit = (seq.num_tokens - 1) // bs
        self.prefix_queries += seq.num_tokens
        for i in range(limit):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = self.chain_hash(prev, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._hold(block_id)
            seq.block_table.append(block_id)
            prev = h
        seq.num_computed = seq.num_cached_tokens = len(seq.block_table) * bs
        seq.num_hashed_blocks, seq.last_block_hash = len(seq.block_table), prev
        self.prefix_hits += seq.num_computed

    def can_grow(self, seq, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self.num_free

    def grow(self, seq, num_tokens: int) -> bool:
        """Make seq's block table cover num_tokens tokens; False (and no change) if blocks are short."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need > self.num_free:
            return False
        for _ in range(need):
            seq.block_table.append(self._take_free())
        return True

    def commit(self, seq) -> None:
        """Register seq's computed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(seq.num_hashed_blocks, seq.num_computed // bs):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                h = self.chain_hash(seq.last_block_hash, tokens)
                if h not in self.cached:  # else another block holds the same prefix: keep that one
                    block.hash, block.token_ids = h, tokens
                    self.cached[h] = block.block_id
                seq.last_block_hash = h
            else:
                seq.last_block_hash = block.hash
            seq.num_hashed_blocks = i + 1

    def release(self, block_table: list[int]) -> None:
        """Drop one reference to each block; the tail is freed first, so shared prefixes stay cached longer."""
        for block_id in reversed(block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} released twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free.append(block_id)
                self.free_set.add(block_id)

    def free_seq(self, seq) -> None:
        self.release(seq.block_table)
        seq.block_table = []
        seq.num_computed = seq.num_hashed_blocks = 0
        seq.last_block_hash = None

    def check(self) -> None:
        """Invariants, for tests: counts match holders, the free queue holds exactly the unheld blocks."""
        assert len(self.free) == len(self.free_set)
        for block in self.blocks:
            assert (block.ref_count == 0) == (block.block_id in self.free_set), block.block_id
