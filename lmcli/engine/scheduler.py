"""Continuous batching: which sequences compute how many tokens in the next step.

Each step spends a token budget (max_prefill_token_num) on, first, the running sequences in arrival order
(one token for a decode, a chunk for an unfinished prefill), then on waiting sequences, oldest first, while
the budget, max_batch_size and free blocks allow. When blocks run out, sessions not running a turn give theirs
back first (idle ones before those whose next turn waits),
then the newest running sequence is preempted: its blocks are freed and it waits at the front of the queue to
be recomputed (its tokens are kept, so its output is unchanged).
"""

import bisect
from collections import deque
from typing import Optional

from lmcli.engine.block_manager import BlockManager
from lmcli.engine.config import SchedulerConfig
from lmcli.engine.sequence import Sequence, Status
from lmcli.engine.session import Session


def _arrival(seq: Sequence) -> int:
    return seq.seq_id


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order
        self.sessions: dict[int, Session] = {}
        self.num_preemptions = 0
        self.num_session_evictions = 0
        self.clock = 0  # steps scheduled
        self.dropped: list[Sequence] = []  # finished by the scheduler itself (no room); the engine reports them

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """[(sequence, number of its next tokens to compute)] for one step."""
        self.clock += 1
        budget, out, preempted = self.config.max_prefill_token_num, [], False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.bm.grow(seq, seq.num_computed + n):
                if self._evict_idle_session():
                    continue
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:
                    self._drop(seq)
                    break
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                out.append((seq, n))
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.config.max_batch_size and not preempted:
            seq = self.waiting[0]
            if not seq.block_table:
                if seq.session is not None and seq.session.block_table:
                    seq.session.give_blocks(seq)
                else:
                    self.bm.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.bm.grow(seq, seq.num_computed + n):
                if self._evict_idle_session():
                    continue
                if not self.running and not out:  # nothing will ever free a block for it
                    self._drop(seq)
                    continue
                self._unadmit(seq)
                break
            self.waiting.popleft()
            seq.status, seq.admitted = Status.RUNNING, True
            bisect.insort(self.running, seq, key=_arrival)
            out.append((seq, n))
            budget -= n
        return out

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str, message: Optional[str] = None) -> None:
        """End a sequence (done, stopped or aborted) and let go of its blocks, or hand them to its session."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason, seq.finish_message = Status.FINISHED, reason, message
        session = seq.session
        if session is not None:
            if seq.admitted:  # the turn ran: its tokens join the history
                session.token_ids = list(seq.token_ids)
            self._unadmit(seq)
            if session.num_computed > len(session.token_ids):  # a prefix match reached into a prompt that never ran
                self._drop_blocks(session)
            session.busy, session.last_used = False, self.clock
        else:
            self.bm.free_seq(seq)

    def _drop(self, seq: Sequence) -> None:
        self.finish(seq, "length", "the KV cache is too small to hold this sequence")
        self.dropped.append(seq)

    def _unadmit(self, seq: Sequence) -> None:
        if seq.session is None:
            self.bm.free_seq(seq)
        elif seq.block_table:  # the session gave its blocks to this turn: they go back, with the turn's
            self.bm.commit(seq)
            seq.session.take_blocks(seq)

    def _evict_idle_session(self) -> bool:
        """Take back the blocks of the least recently used session that holds any. A session holds blocks only
        while no turn of it runs (a running turn holds them itself), so this includes sessions whose next turn
        still waits: it will rebuild them."""
        holding = [s for s in self.sessions.values() if s.block_table]
        if not holding:
            return False
        victim = min(holding, key=lambda s: (s.busy, s.last_used))  # idle sessions first
        self._drop_blocks(victim)
        self.num_session_evictions += 1
        return True

    def _drop_blocks(self, session: Session) -> None:
        """A session's blocks go back (hashed full blocks stay findable in the prefix cache); its next turn rebuilds
        them from its history."""
        self.bm.release(session.tables)
        session.tables, session.num_computed = [], 0
        session.num_hashed_blocks, session.last_block_hash = 0, None

    def end_session(self, session_id: int) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None and session.block_table:
            self.bm.release(session.tables)
            session.tables = []
