"""The engine for an asyncio server: the step loop runs in its own thread; requests go in through a queue and
their outputs come back to each caller's event loop. `async for out in engine.generate(...)`; leaving the loop
early (a client that went away) aborts the request and frees its blocks."""

import asyncio
import queue
import threading
import time
import uuid
from typing import AsyncIterator, Optional

from lmcli.engine.engine import Engine, Output
from lmcli.engine.sampling_params import SamplingParams


class EngineDead(RuntimeError):
    """The engine loop stopped on an error; nothing more will be generated."""


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}
        self.error: Optional[BaseException] = None
        self.last_step = time.monotonic()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="lm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_workspace(cls, workspace, **options) -> "AsyncEngine":
        return cls(Engine(workspace, **options))

    # ---- the engine thread ----

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._drain(block=not self.engine.has_work)
                if self.engine.has_work:
                    outputs = self.engine.step()
                    self.last_step = time.monotonic()
                    for out in outputs:
                        self._deliver(out.request_id, out)
        except BaseException as e:  # a bug or a dead worker: fail every caller, never hang them
            self.error = e
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDead(f"the engine stopped: {type(e).__name__}: {e}"))

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, command: str, *args) -> None:
        if command == "add":
            request_id, prompt_ids, params, session_id = args
            try:
                outputs = self.engine.add_request(request_id, prompt_ids, params, session_id)
            except Exception as e:  # a user error: raised to the caller
                self._deliver(request_id, e)
                return
            for out in outputs:
                self._deliver(request_id, out)
        elif command == "abort":
            self.engine.abort(args[0])
        elif command == "end_session":
            self.engine.end_session(args[0])
        elif command == "call":  # run a function on the engine thread, between steps
            fn, loop, future = args
            try:
                result = fn(self.engine)
            except Exception as e:
                loop.call_soon_threadsafe(_set, future, None, e)
            else:
                loop.call_soon_threadsafe(_set, future, result, None)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, q, _ = stream
            loop.call_soon_threadsafe(q.put_nowait, item)

    # ---- the caller's side ----

    async def generate(self, prompt_ids: list[int], params: SamplingParams = SamplingParams(),
                       request_id: Optional[str] = None, session_id: Optional[int] = None) -> AsyncIterator[Output]:
        """Outputs of all the request's choices as they come; raises UserError for a bad request."""
        if self.error is not None:
            raise EngineDead(f"the engine stopped: {self.error}")
        request_id = request_id or uuid.uuid4().hex
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q, params.n)
        self._inbox.put(("add", request_id, list(prompt_ids), params, session_id))
        unfinished = params.n
        try:
            while unfinished:
                item = await q.get()
                if isinstance(item, BaseException):
                    unfinished = 0
                    raise item
                if item.finish_reason is not None:
                    unfinished -= 1
                yield item
        finally:
            self._streams.pop(request_id, None)
            if unfinished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def end_session(self, session_id: int) -> None:
        self._inbox.put(("end_session", session_id))

    async def call(self, fn, timeout: float = 5.0):
        """fn(engine) on the engine thread between steps; its result here."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put(("call", fn, loop, future))
        return await asyncio.wait_for(future, timeout)

    async def healthy(self, timeout: float = 5.0) -> bool:
        """True when the loop is alive and answers between steps."""
        if self.error is not None or not self._thread.is_alive():
            return False
        try:
            return await self.call(lambda engine: True, timeout)
        except asyncio.TimeoutError:
            return False

    def close(self) -> None:
        self._stop = True  # the loop sees it within half a second
        self._thread.join(timeout=5)
        self.engine.close()


def _set(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
