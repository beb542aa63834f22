"""Admission before any work (issue: reliability): a generation request is counted in before its body is parsed
or its prompt tokenized. Past --max-concurrent-requests it waits, first come first served, in a queue of at most
--max-queue-len requests: a full queue is a 429 at once, a wait past --queue-timeout a 503, both with
Retry-After. A body whose Content-Length is over the limit is a 413 before it is read. Control turns of
/v1/chat/interactive (cancel, and ending a session with request_output_len 0) are never held back: they free
what others wait for; to find them, at most CONTROL_BYTES of an interactive body are read before admission (a
longer one is a turn to admit). The request's arrival is kept (scope["state"]["arrival"]): --request-timeout
counts from it."""

import asyncio
import json
import time

from lmcli.serve.common import MAX_BODY
from lmcli.serve.errors import APIError

GENERATE = ("/v1/chat/completions", "/v1/completions", "/v1/chat/interactive")
CONTROL_BYTES = 64 << 10  # what a cancel or an end of session could need, with a long stop list and kwargs


class Admission:
    def __init__(self, app, state):
        self.app, self.state = app, state
        self.admitted = 0  # generation requests being answered
        self.waiters: list = []  # futures of the queued, oldest first
        state.on_drain.append(self.flush)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATE:
            return await self.app(scope, receive, send)
        scope.setdefault("state", {}).setdefault("arrival", time.monotonic())  # unless an outer layer set it
        if self.state.draining:
            return await refuse(APIError(503, "the server is shutting down", code="shutting_down",
                                         headers={"Retry-After": "1"}), scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > MAX_BODY:
            return await refuse(APIError(413, f"the request body is over {MAX_BODY >> 20} MiB", code="body_too_large"),
                                scope, receive, send)
        if scope["path"] == "/v1/chat/interactive":
            body, receive = await read(receive, CONTROL_BYTES)
            if body is not None and is_control(body):
                return await self.app(scope, receive, send)
        try:
            await self.admit()
        except APIError as e:
            return await refuse(e, scope, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            self.admitted -= 1
            self.wake()

    async def admit(self) -> None:
        """Take a place, waiting in the queue if need be; a place that comes free goes to the oldest waiter."""
        options = self.state.options
        limit = options.max_concurrent_requests
        if not limit or (self.admitted < limit and not self.waiters):
            self.admitted += 1
            return
        if len(self.waiters) >= options.max_queue_len:
            raise APIError(429, f"the server is answering {limit} requests (--max-concurrent-requests) and "
                           f"{len(self.waiters)} are waiting (--max-queue-len); try again shortly",
                           code="too_many_requests", headers={"Retry-After": "1"})
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), options.queue_timeout)
        except asyncio.TimeoutError:
            if not waiter.done():  # (a place handed over as the time ran out is taken)
                raise APIError(503, f"no room within {options.queue_timeout:g} s (--queue-timeout)",
                               code="queue_timeout", headers={"Retry-After": "1"}) from None
        except BaseException:  # cancelled (or the drain began): a place handed over meanwhile goes to the next
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.admitted -= 1
                self.wake()
            raise
        finally:
            if waiter in self.waiters:
                self.waiters.remove(waiter)

    def flush(self) -> None:
        """The server is shutting down: every waiting request gets its 503 now."""
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(APIError(503, "the server is shutting down", code="shutting_down",
                                              headers={"Retry-After": "1"}))

    def wake(self) -> None:
        """Places that came free go to the oldest waiters (counted in here, so no newcomer takes them)."""
        limit = self.state.options.max_concurrent_requests
        while self.waiters and (not limit or self.admitted < limit):
            waiter = self.waiters.pop(0)
            if not waiter.done():
                self.admitted += 1
                waiter.set_result(None)


def is_control(body: bytes) -> bool:
    try:
        fields = json.loads(body or b"{}")
    except (ValueError, RecursionError):
        return False
    return isinstance(fields, dict) and (fields.get("cancel") is True or fields.get("request_output_len") == 0)


async def read(receive, limit: int):
    """The whole body if it is at most limit bytes, else None (having read a little past limit, no further); and a
    receive that hands the app what was read, then the rest."""
    chunks, size, more = [], 0, True
    while more and size <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return b"", receive
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        more = message.get("more_body", False)
    body, sent = b"".join(chunks), False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": more}
        return await receive()

    return (None if more or size > limit else body), replay


async def refuse(error: APIError, scope, receive, send) -> None:
    await error.response()(scope, receive, send)
