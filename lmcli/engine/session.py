"""A server-kept chat session: its token history and, while memory allows, the K/V blocks of that history."""

from typing import Optional


class Session:
    def __init__(self, session_id: int):
        self.session_id = session_id
        self.token_ids: list[int] = []  # everything so far: prompts and answers
        self.tables: list[list[int]] = []  # the block tables holding K/V of token_ids[:num_computed]
        self.num_computed = 0
        self.num_hashed_blocks = 0
        self.last_block_hash: Optional[int] = None
        self.busy = False  # a turn is running
        self.last_used = 0  # engine step of the last turn's end, for eviction order

    @property
    def block_table(self) -> list[int]:
        """The first KV group's block table."""
        return self.tables[0] if self.tables else []

    def give_blocks(self, seq) -> None:
        """Hand the session's blocks to the turn that continues it."""
        seq.tables, seq.num_computed = self.tables, self.num_computed
        seq.num_cached_tokens = self.num_computed
        seq.num_hashed_blocks, seq.last_block_hash = self.num_hashed_blocks, self.last_block_hash
        self.tables, self.num_computed = [], 0

    def take_blocks(self, seq) -> None:
        """Keep a turn's blocks for the next turn (the caller decides whether its tokens join the history)."""
        self.tables, self.num_computed = seq.tables, seq.num_computed
        self.num_hashed_blocks, self.last_block_hash = seq.num_hashed_blocks, seq.last_block_hash
        seq.tables, seq.num_computed = [], 0
