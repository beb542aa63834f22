"""A graceful stop for `lm serve api_server` (issue: reliability): on SIGTERM or SIGINT the server stops accepting
connections (uvicorn's shutdown), new requests on open connections get 503 and /health says 503, and requests in
flight run on for up to `timeout` seconds. Then every request still running is ended: a stream gets an error event
(503 shutting_down) and its [DONE] (NDJSON: an error line), a plain request a 503; their KV blocks are freed. The
process then exits 0, not by the signal. A second Ctrl-C stops at once (uvicorn's force exit). While the model is
still loading there is nothing to drain: the signal ends the process, as it would without this."""

import asyncio
import contextlib
import logging

import uvicorn

from lmcli.serve.state import ServerState

MARGIN = 10.0  # seconds after the drain's end for the ended streams to write their last event and close

log = logging.getLogger("lmcli.serve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, timeout: float):
        config.timeout_graceful_shutdown = timeout + MARGIN
        super().__init__(config)
        self.state, self.timeout = state, timeout
        self.loop = None

    async def serve(self, sockets=None):
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first and self.loop is not None:
            self.state.draining = True
            self.loop.call_soon_threadsafe(self.state.drained)  # requests waiting for a place: 503 now
            self.loop.call_soon_threadsafe(self.loop.call_later, self.timeout, self.end)

    async def _wait_tasks_to_complete(self) -> None:
        """uvicorn waits for every connection to close, idle keep-alive ones too; an idle TLS connection closes
        only when its peer answers the TLS shutdown or asyncio gives up (30 s). The drain waits for requests."""
        while self.server_state.tasks and not self.force_exit:
            await asyncio.sleep(0.1)

    def end(self) -> None:
        engine = self.state.engine
        count = engine.end_all(f"the server is shutting down (its {self.timeout:g} s drain ended)") if engine else 0
        if count:
            log.warning("ended %d request(s) still running after the %g s drain", count, self.timeout)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            if self.state.engine is not None:  # drained: exit 0, not by the signal again
                self._captured_signals.clear()  # (while loading, the signal ends the process: the load cannot wait)
