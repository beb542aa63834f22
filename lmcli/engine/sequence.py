"""One sequence's state: its tokens, how many have K/V in the cache, its block table, its status."""

import itertools
from enum import Enum
from typing import Optional

from lmcli.engine.sampling_params import SamplingParams

_ids = itertools.count()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, token_ids: list[int], params: SamplingParams, request_id: str = "", index: int = 0,
                 num_prompt_tokens: Optional[int] = None, max_len: Optional[int] = None):
        self.seq_id = next(_ids)  # also the arrival order: larger is newer
        self.request_id = request_id
        self.index = index  # which of the request's n choices
        self.params = params
        self.token_ids = list(token_ids)  # prompt, then output
        self.num_prompt_tokens = len(token_ids) if num_prompt_tokens is None else num_prompt_tokens
        self.max_len = max_len  # the most tokens this sequence may hold (session length)
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache
        self.tables: list[list[int]] = []  # a block table per KV group (BlockManager), none before the first
        self.num_hashed_blocks = 0  # leading blocks already registered in the prefix cache
        self.last_block_hash: Optional[int] = None  # the hash of the last of those
        self.status = Status.WAITING
        self.admitted = False  # scheduled at least once
        self.finish_reason: Optional[str] = None
        self.finish_message: Optional[str] = None
        self.session = None  # the Session this turn belongs to, if any
        self.detok = None  # the engine's Detokenizer for this sequence's output
        self.generator = None  # the sampler's torch.Generator, for a seeded sequence
        self.matcher = None  # with a grammar: its llguidance matcher, which has seen the output so far

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def block_table(self) -> list[int]:
        """The first KV group's block table."""
        return self.tables[0] if self.tables else []

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed}, tables={self.tables})")
