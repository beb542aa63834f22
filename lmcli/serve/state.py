"""What every route shares: the engine (None while it loads), the model's facts, the server's options, metrics
and the session ids in use."""

import time
from dataclasses import dataclass
from typing import Optional

from lmcli.engine.async_engine import AsyncEngine
from lmcli.serve.errors import APIError
from lmcli.serve.metrics import Metrics


@dataclass(frozen=True)
class ServerOptions:
    model_name: Optional[str] = None  # default: the workspace's
    chat_template: Optional[str] = None  # the template's text, instead of the model's own
    meta_instruction: Optional[str] = None  # the system prompt of requests that have none
    api_keys: tuple[str, ...] = ()
    max_concurrent_requests: Optional[int] = None
    allow_origins: tuple[str, ...] = ()
    allow_credentials: bool = False
    allow_methods: tuple[str, ...] = ("*",)
    allow_headers: tuple[str, ...] = ("*",)


class ServerState:
    def __init__(self, options: ServerOptions):
        self.options = options
        self.engine: Optional[AsyncEngine] = None
        self.load_error: Optional[str] = None
        self.metrics = Metrics(lambda: self.engine.stats if self.engine is not None else None)
        self.created = int(time.time())
        self.sessions_in_use: dict[int, str] = {}  # session id -> the request id running under it
        self.histories: dict[int, list[dict]] = {}  # interactive session id -> its messages so far
        self.in_flight = 0  # generation requests being answered

    def attach(self, engine: AsyncEngine) -> None:
        e = engine.engine
        self.tokenizer = e.tokenizer
        if self.options.chat_template:
            self.tokenizer.chat_template = self.options.chat_template
        self.max_len = e.max_len
        self.generation = e.workspace.generation
        self.model_name = self.options.model_name or e.workspace.model_name
        self.engine = engine

    def ready(self) -> AsyncEngine:
        if self.engine is None:
            raise APIError(503, self.load_error or "the model is still loading; try again when /health says ok",
                           code="loading")
        return self.engine

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server has {self.model_name!r} "
                                "(see /v1/models)", "model", "model_not_found")

    def claim_session(self, session_id: Optional[int], request_id: str) -> None:
        if session_id is None:
            return
        if session_id in self.sessions_in_use:
            raise APIError(409, f"session {session_id} is busy with another request", "session_id", "session_busy")
        self.sessions_in_use[session_id] = request_id

    def release_session(self, session_id: Optional[int], request_id: str) -> None:
        if session_id is not None and self.sessions_in_use.get(session_id) == request_id:
            del self.sessions_in_use[session_id]
