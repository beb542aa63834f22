"""Interactive sessions' bounds (issue: reliability): a session idle past its time to live is ended, and past the
cap on their number a new session ends the least recently used idle one. Ending frees the session's history and
KV blocks. The next turn on an ended session's id gets 410 session_expired saying why, once; the turn after it
starts the session afresh. Only the bookkeeping is here; api_server.py and interactive.py end the sessions."""

import time
from collections import OrderedDict
from typing import Callable, Optional

REMEMBERED = 100_000  # ended sessions whose next turn is told why; older ones are forgotten (start afresh)


class SessionBook:
    def __init__(self, ttl: float = 0.0, cap: int = 0, clock: Callable[[], float] = time.monotonic):
        self.ttl, self.cap, self.clock = ttl, cap, clock  # 0: no time to live, no cap
        self.used: OrderedDict[int, float] = OrderedDict()  # session -> last activity, least recent first
        self.ended: OrderedDict[int, str] = OrderedDict()  # session -> why it was ended

    def touch(self, sid: int) -> None:
        self.used[sid] = self.clock()
        self.used.move_to_end(sid)
        self.ended.pop(sid, None)

    def forget(self, sid: int) -> None:
        """The client ended the session."""
        self.used.pop(sid, None)
        self.ended.pop(sid, None)

    def why_ended(self, sid: int) -> Optional[str]:
        """Why this session was ended, once (the next call: None)."""
        return self.ended.pop(sid, None)

    def full(self, sid: int) -> bool:
        """Whether a turn on sid would open a session past the cap."""
        return bool(self.cap) and sid not in self.used and len(self.used) >= self.cap

    def idle(self, busy) -> list[int]:
        """Sessions idle past the time to live, not running a turn."""
        if not self.ttl:
            return []
        oldest = self.clock() - self.ttl
        out = []
        for sid, used in self.used.items():
            if used > oldest:
                break
            if sid not in busy:
                out.append(sid)
        return out

    def least_recent_idle(self, busy) -> Optional[int]:
        return next((sid for sid in self.used if sid not in busy), None)

    def end(self, sid: int, why: str) -> None:
        self.used.pop(sid, None)
        self.ended[sid] = why
        while len(self.ended) > REMEMBERED:
            self.ended.popitem(last=False)
