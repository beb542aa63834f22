"""The engine for an asyncio server: the step loop runs in its own thread; requests go in through a queue and
their outputs come back to each caller's event loop. `async for out in engine.generate(...)`; leaving the loop
early (a client that went away) aborts the request and frees its blocks. A server that must know a request was
accepted before it answers (a 409 or 400 instead of a broken stream) uses `await engine.start(...)`."""

import asyncio
import logging
import queue
import threading
import time
import uuid
from typing import AsyncIterator, Callable, Optional, Union

from lmcli.engine.engine import Engine, Output
from lmcli.engine.sampling_params import SamplingParams


CLOSE_TIMEOUT = 600.0  # seconds close() waits for the step in flight (a hung tensor-parallel peer: not for ever)
WARM_AFTER = 0.05  # seconds without work before a piece of the KV pool's warming (not in the gap between turns)


class EngineDead(RuntimeError):
    """The engine loop stopped on an error; nothing more will be generated."""


class Stopping(EngineDead):
    """The server is shutting down: a request still running when its drain ended."""


class TimedOut(EngineDead):
    """A request ran past its time (the server's --request-timeout)."""


class AsyncEngine:
    def __init__(self, engine: Union[Engine, Callable[[], Engine]]):
        """engine: an Engine, or a function that builds one. Built here, the engine is made on the loop's own
        thread, which matters on CPUs: OpenMP keeps a thread team for each thread that runs parallel torch ops,
        and with a second team (the one that loaded the weights) more OpenMP threads exist than cores, so
        libgomp stops spinning between parallel regions; one decoding stream then took 24.5 ms a step instead
        of 16.3."""
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}
        self.error: Optional[BaseException] = None
        self.last_step = time.monotonic()  # the loop's last round
        self._stop = False
        built, failure = threading.Event(), []
        self._thread = threading.Thread(target=self._run, args=(engine, built, failure), name="lm-engine",
                                        daemon=True)
        self._thread.start()
        built.wait()
        if failure:
            raise failure[0]

    @classmethod
    def from_workspace(cls, workspace, **options) -> "AsyncEngine":
        return cls(lambda: Engine(workspace, **options))

    # ---- the engine thread ----

    def _run(self, engine, built: threading.Event, failure: list) -> None:
        try:
            self.engine = engine() if callable(engine) else engine
            self.stats: dict = self.engine.stats()  # the engine's counters after its latest step, for /metrics
        except BaseException as e:
            failure.append(e)
            close = getattr(getattr(self, "engine", None), "close", None)
            if close is not None:  # built, then failed: tensor-parallel workers must not outlive it
                close()
            return
        finally:
            built.set()
        self._loop()

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._drain(block=not self.engine.has_work, timeout=WARM_AFTER if self.engine.cold else 0.5)
                outputs = self.engine.step() if self.engine.has_work else []
                self.stats = self.engine.stats()  # before the outputs: a caller that got its answer sees it
                self.last_step = time.monotonic()  # idle, the loop comes round every half second
                self._deliver_step(outputs)
                if not self.engine.has_work and self.engine.cold:  # idle: the KV pool's first touch, a piece
                    self.engine.warm()  # at a time (after the stats: they say at once what the step did)
                elif not self.engine.has_work:
                    self.engine.keep_alive()
        except BaseException as e:  # a bug or a dead worker: fail every caller, never hang them
            logging.getLogger("lmcli.engine").exception("the engine loop stopped")
            self.error = e
            dead = EngineDead(f"the engine stopped: {type(e).__name__}: {e}")
            for request_id in list(self._streams):
                self._deliver(request_id, dead)
            while True:  # and those whose requests were still in the inbox
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if item[0] == "call":
                    item[2].call_soon_threadsafe(_set, item[3], None, dead)

    def _drain(self, block: bool, timeout: float) -> None:
        try:
            item = self._inbox.get(timeout=timeout) if block else self._inbox.get_nowait()
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
            self._deliver(request_id, ACCEPTED)
            for out in outputs:
                self._deliver(request_id, out)
        elif command == "abort":  # a caller that still listens (a cancelled session turn) gets the final output
            for out in self.engine.abort(args[0]):
                self._deliver(args[0], out)
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

    def _deliver_step(self, outputs: list[Output]) -> None:
        """A step's outputs: one wake-up of each caller's event loop for all of them, not one per output (64
        streams meant 64 cross-thread calls a step)."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                batches.setdefault(stream[0], []).append((stream[1], out))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    # ---- the caller's side ----

    async def start(self, prompt_ids: list[int], params: SamplingParams = SamplingParams(),
                    request_id: Optional[str] = None, session_id: Optional[int] = None) -> "RequestStream":
        """Queue a request and wait until the engine took it; raises UserError (SessionBusy ...) if it did not.
        The caller must close() the stream (closing an unfinished one aborts the request)."""
        if self.error is not None:
            raise EngineDead(f"the engine stopped: {self.error}")
        request_id = request_id or uuid.uuid4().hex
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q, params.n)
        self._inbox.put(("add", request_id, list(prompt_ids), params, session_id))
        stream = RequestStream(self, request_id, q, params.n)
        try:
            first = await self._answer(q.get)
        except BaseException:  # cancelled while waiting (the request may have started), or the engine died
            stream.close()
            raise
        if isinstance(first, BaseException):
            stream.unfinished = 0
            stream.close()
            raise first
        return stream

    async def generate(self, prompt_ids: list[int], params: SamplingParams = SamplingParams(),
                       request_id: Optional[str] = None, session_id: Optional[int] = None) -> AsyncIterator[Output]:
        """Outputs of all the request's choices as they come; raises UserError for a bad request."""
        stream = await self.start(prompt_ids, params, request_id, session_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def end_all(self, message: str) -> int:
        """End every running request (a drain's end): each is aborted, its blocks freed, and its caller gets
        Stopping(message) instead of its next output. Call it on the callers' event loop. Returns how many."""
        running = list(self._streams)
        for request_id in running:
            self.fail(request_id, Stopping(message))
        return len(running)

    def fail(self, request_id: str, error: BaseException) -> None:
        """End one running request: aborted (its blocks freed), and its caller gets error instead of its next
        output. Call it on the callers' event loop."""
        if request_id in self._streams:
            self._deliver(request_id, error)  # before the abort's own final output can reach the caller
            self.abort(request_id)

    async def call(self, fn, timeout: Optional[float] = None):
        """fn(engine) on the engine thread between steps; its result here."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put(("call", fn, loop, future))
        return await asyncio.wait_for(self._answer(lambda: asyncio.shield(future)), timeout)

    async def _answer(self, get):
        """await get(), but raise EngineDead if the loop dies meanwhile (a step can take seconds: no timeout)."""
        while True:
            try:
                return await asyncio.wait_for(get(), 1.0)
            except asyncio.TimeoutError:
                if self.error is not None or not self._thread.is_alive():
                    raise EngineDead(f"the engine stopped: {self.error}") from None

    async def problem(self, timeout: float = 5.0, stall: float = 120.0) -> Optional[str]:
        """None when the engine can generate, else why not. Alive means: the loop runs and, if busy, steps (a step
        ended within `stall` seconds, so this does not wait for the step running now); if idle, it answers a probe
        that also checks tensor-parallel workers."""
        if self.error is not None:
            return f"the engine stopped: {type(self.error).__name__}: {self.error}"
        if not self._thread.is_alive():
            return "the engine loop is not running"
        if self.engine.has_work:
            return None if time.monotonic() - self.last_step < stall else f"no engine step for {stall:.0f} s"
        try:
            await self.call(lambda engine: engine.check(), timeout)
        except asyncio.TimeoutError:
            return f"the engine did not answer within {timeout:.0f} s"
        except Exception as e:
            return str(e)
        return None

    async def healthy(self, timeout: float = 5.0) -> bool:
        return await self.problem(timeout) is None

    def close(self) -> None:
        self._stop = True
        self._inbox.put(("wake",))  # the loop may be waiting for work
        # The loop ends after the step in flight, which takes seconds on a slow CPU (a 2048-token prefill: about
        # 15 s on a 2-core AVX2 machine). Waited for, not cut short: a thread still inside torch when the
        # interpreter exits aborts the process ("terminate called without an active exception").
        waited = 0.0
        while self._thread.is_alive() and waited < CLOSE_TIMEOUT:
            self._thread.join(timeout=10)
            waited += 10
            if self._thread.is_alive():
                logging.getLogger("lmcli.engine").warning("waiting for the engine's step in flight to end")
        self.engine.close()


ACCEPTED = object()  # the engine's first word on a request it took


class RequestStream:
    """One request's outputs, all choices, as they come; close() aborts it if unfinished."""

    def __init__(self, engine: AsyncEngine, request_id: str, q: asyncio.Queue, n: int):
        self.engine, self.request_id, self.q, self.unfinished = engine, request_id, q, n

    def __aiter__(self):
        return self

    async def __anext__(self) -> Output:
        if not self.unfinished:
            raise StopAsyncIteration
        item = await self.q.get()
        if isinstance(item, BaseException):
            self.unfinished = 0
            raise item
        if item.finish_reason is not None:
            self.unfinished -= 1
        return item

    def close(self) -> None:
        if self.engine._streams.pop(self.request_id, None) is not None and self.unfinished:
            self.engine.abort(self.request_id)
        self.unfinished = 0


def _put_all(items: list) -> None:
    for q, item in items:
        q.put_nowait(item)


def _set(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
