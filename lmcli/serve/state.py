"""What every route shares: the engine (None while it loads), the model's facts, the server's options, metrics
and the session ids in use."""

import time
import uuid
from dataclasses import dataclass
from typing import Optional

from lmcli.engine.async_engine import AsyncEngine
from lmcli.serve.errors import APIError
from lmcli.serve.metrics import Metrics
from lmcli.serve.sessions import SessionBook
from lmcli.serve.tool_parsers import default_parser


@dataclass(frozen=True)
class ServerOptions:
    model_name: Optional[str] = None  # default: the workspace's
    chat_template: Optional[str] = None  # the template's text, instead of the model's own
    meta_instruction: Optional[str] = None  # the system prompt of requests that have none
    tool_call_parser: Optional[str] = None  # tool_parsers.PARSERS name; default: picked from the chat template
    reasoning_parser: Optional[str] = None  # reasoning.REASONING_PARSERS name; default: none
    api_keys: tuple[str, ...] = ()
    max_concurrent_requests: Optional[int] = 512  # generation requests answered at once (None: no limit)
    max_queue_len: int = 512  # requests that may wait for a place; more get 429 (serve/admission.py)
    queue_timeout: float = 60.0  # seconds one may wait; then 503
    max_output_len: Optional[int] = None  # the most tokens one answer gets, whatever it asks
    request_timeout: float = 600.0  # seconds a generation request may run (0: no limit)
    session_ttl: float = 3600.0  # seconds an idle interactive session is kept (0: for ever)
    max_sessions: int = 1024  # interactive sessions kept at once (0: no cap)
    allow_origins: tuple[str, ...] = ()
    allow_credentials: bool = False
    allow_methods: tuple[str, ...] = ("*",)
    allow_headers: tuple[str, ...] = ("*",)


@dataclass(frozen=True)
class History:
    """An interactive session's conversation as messages, for the chat template. Whether the last turn joined the
    engine's history (it did if it ran at all, even when aborted) shows on the next turn: the engine's token count
    then differs from `tokens_before`."""

    before: list[dict]  # the messages before the last turn
    after: list[dict]  # the messages if the last turn joined: its own and the answer
    tokens_before: int  # the engine's token count for the session before the last turn

    def messages(self, num_tokens: int) -> list[dict]:
        return self.before if num_tokens == self.tokens_before else self.after


class ServerState:
    def __init__(self, options: ServerOptions):
        self.options = options
        self.engine: Optional[AsyncEngine] = None
        self.load_error: Optional[str] = None
        self.metrics = Metrics(lambda: self.engine.stats if self.engine is not None else None)
        self.created = int(time.time())
        self.instance = uuid.uuid4().hex  # /health says it: a proxy sees a restart (its sessions gone) by a new one
        self.sessions_in_use: dict[int, "Claim"] = {}  # session id -> the request running under it
        self.histories: dict[int, History] = {}  # interactive session id -> its conversation
        self.sessions = SessionBook(options.session_ttl, options.max_sessions)
        self.in_flight = 0  # generation requests being answered
        self.max_token_chars = 0  # characters of the vocabulary's longest token (0: unknown)
        self.draining = False  # shutting down: no new requests, /health 503 (serve/drain.py)
        self.on_drain: list = []  # called (on the event loop) when the drain begins

    def attach(self, engine: AsyncEngine) -> None:
        e = engine.engine
        self.tokenizer = e.tokenizer
        if self.options.chat_template:
            self.tokenizer.chat_template = self.options.chat_template
        self.max_len = e.max_len
        vocab = getattr(self.tokenizer, "get_vocab", None)  # the longest token, for prompts too long to tokenize
        self.max_token_chars = max(map(len, vocab()), default=0) if vocab else 0
        self.grammars = getattr(e, "grammars", None)  # structured output (engine/grammar.py)
        self.tool_parser = self.options.tool_call_parser or default_parser(self.tokenizer.chat_template)
        self.generation = e.workspace.generation
        self.model_name = self.options.model_name or e.workspace.model_name
        self.engine = engine

    def drained(self) -> None:
        self.draining = True
        for fn in self.on_drain:
            fn()

    def ready(self) -> AsyncEngine:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "1"})
        if self.engine is None:
            raise APIError(503, self.load_error or "the model is still loading; try again when /health says ok",
                           code="loading")
        return self.engine

    def output_len(self, asked: Optional[int]) -> Optional[int]:
        """The most tokens to generate for a request that asked for `asked` (None: as many as the context holds):
        --max-output-len caps both."""
        cap = self.options.max_output_len
        return asked if cap is None or (asked is not None and asked <= cap) else cap

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server has {self.model_name!r} "
                                "(see /v1/models)", "model", "model_not_found")

    def claim(self, session_id: Optional[int], request_ids: list[str]) -> "Claim":
        """Count a generation request in and hold its session id, if any (409 if held). Synchronous, so two requests
        cannot both pass; Claim.release() undoes it. (--max-concurrent-requests is applied before: admission.py.)"""
        if session_id is not None and session_id in self.sessions_in_use:
            raise APIError(409, f"session {session_id} is busy with another request", "session_id", "session_busy")
        return Claim(self, session_id, request_ids)


class Claim:
    def __init__(self, state: ServerState, session_id: Optional[int], request_ids: list[str]):
        self.state, self.session_id, self.request_ids, self.held = state, session_id, request_ids, True
        if session_id is not None:
            state.sessions_in_use[session_id] = self
        state.in_flight += 1

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self.state.sessions_in_use.get(self.session_id) is self:
            del self.state.sessions_in_use[self.session_id]
        self.state.in_flight -= 1
