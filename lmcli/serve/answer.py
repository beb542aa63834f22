"""One path for every generation route. A route checks its request and builds the engine requests; a Job starts
them and keeps one accumulator (Choice) per choice; a formatter per endpoint turns what each output adds (a
Piece) into SSE chunks or NDJSON lines, or the whole answer into one JSON body; respond() streams or collects,
and ends the job (its streams, its claim, its metrics) either way."""

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional

from starlette.requests import Request
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from lmcli.engine.async_engine import TimedOut
from lmcli.engine.engine import Output
from lmcli.engine.sampling_params import SamplingParams
from lmcli.serve import protocol as p
from lmcli.serve.common import collected, merge, start
from lmcli.serve.errors import APIError
from lmcli.serve.metrics import RequestTimer
from lmcli.serve.state import Claim, ServerState
from lmcli.serve.reasoning import ThinkParser
from lmcli.serve.tool_parsers import ToolParser


def check_context(state: ServerState, prompt_len: int, max_tokens: Optional[int], field: str) -> None:
    """A prompt that leaves no room to answer, or an answer asked longer than the context leaves: a 400."""
    if prompt_len >= state.max_len:
        raise APIError(400, f"the prompt has {prompt_len} tokens, but this model's context holds {state.max_len} "
                            "(prompt and output together)", field, "context_length_exceeded")
    if max_tokens is not None and prompt_len + max_tokens > state.max_len:
        raise APIError(400, f"this model's context holds {state.max_len} tokens, but {prompt_len + max_tokens} "
                            f"were asked for ({prompt_len} in the prompt, {max_tokens} to generate); lower "
                            "max_tokens", "max_tokens", "context_length_exceeded")


@dataclass
class Piece:
    """What one engine output adds to a choice: text (content, with a tool parser: what is not a call), tool call
    deltas."""

    text: str
    token_ids: list[int]
    logprobs: list
    finish_reason: Optional[str]
    tool_calls: list = field(default_factory=list)
    reasoning: str = ""


@dataclass
class Choice:
    """One choice's answer so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    finish_message: Optional[str] = None
    num_prompt_tokens: int = 0  # with an interactive session: its history too
    num_output_tokens: int = 0
    parser: Optional[ToolParser] = None  # with tools: finds the calls in the text
    reasoner: Optional[ThinkParser] = None  # with --reasoning-parser: takes the reasoning out of the text
    reasoning: str = ""

    @property
    def tool_calls(self) -> list:
        return self.parser.calls if self.parser is not None else []

    def add(self, out: Output) -> Piece:
        text, calls, reasoning, final = out.text, [], "", out.finish_reason is not None
        if self.reasoner is not None:
            reasoning, text = self.reasoner.feed(text, final)
        if self.parser is not None:
            text, calls = self.parser.feed(text, final)
        reason = out.finish_reason
        if reason == "stop" and self.tool_calls:
            reason = "tool_calls"
        self.text += text
        self.reasoning += reasoning
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs
        self.finish_reason = reason or self.finish_reason
        self.finish_message = out.finish_message or self.finish_message
        self.num_prompt_tokens, self.num_output_tokens = out.num_prompt_tokens, out.num_output_tokens
        return Piece(text, out.token_ids, out.logprobs, reason, calls, reasoning)


def arrival(request: Request) -> Optional[float]:
    """When the request came in (time.monotonic(), kept by admission.py), if it was kept."""
    return request.scope.get("state", {}).get("arrival")


class Job:
    """One HTTP request's engine requests (one per prompt, each with n choices) and what ends with them: the
    claim (its engine request ids, one per prompt), the metrics, callbacks."""

    def __init__(self, state: ServerState, endpoint: str, rid: str, claim: Claim, n: int = 1,
                 parser: Optional[Callable[[], ToolParser]] = None,
                 reasoner: Optional[Callable[[], ThinkParser]] = None, arrival: Optional[float] = None):
        """arrival: the request's time.monotonic() when it came in (admission.py), from which --request-timeout
        counts; None: from start()."""
        self.state, self.endpoint, self.rid, self.claim, self.n = state, endpoint, rid, claim, n
        self.arrival = arrival
        self.parser, self.reasoner = parser, reasoner  # make each choice's tool and reasoning parsers
        self.created = int(time.time())
        self.streams: list = []
        self.choices: list[Choice] = []
        self.prompt_lens: list[int] = []
        self.cached: list[int] = []
        self.timer: Optional[RequestTimer] = None
        self.closing: list[Callable[[], None]] = []
        self.deadline: Optional[asyncio.TimerHandle] = None  # --request-timeout
        self.closed = False

    async def start(self, engine, prompts: list[tuple[list[int], SamplingParams]],
                    session_id: Optional[int] = None) -> None:
        """Start every prompt's request; if one is refused, end those started and the job, and raise."""
        try:
            for k, (ids, params) in enumerate(prompts):
                self.streams.append(await start(engine, ids, params, self.claim.request_ids[k], session_id))
        except BaseException:
            self.close()
            raise
        self.prompt_lens = [len(ids) for ids, _ in prompts]
        self.cached = [0] * len(prompts)
        self.choices = [Choice(i, parser=self.parser() if self.parser else None,
                               reasoner=self.reasoner() if self.reasoner else None)
                        for i in range(len(prompts) * self.n)]
        self.timer = RequestTimer(self.state.metrics, self.endpoint)
        limit = self.state.options.request_timeout
        if limit:  # the request ends there, however long it asked to run, counted from its arrival
            error = TimedOut(f"the request ran past {limit:g} s (--request-timeout)")
            ids = self.claim.request_ids[:len(prompts)]
            left = limit - (time.monotonic() - self.arrival if self.arrival is not None else 0)
            self.deadline = asyncio.get_running_loop().call_later(max(0.0, left),
                                                                  lambda: [engine.fail(i, error) for i in ids])

    async def run(self) -> AsyncIterator[tuple[Choice, Piece]]:
        async for k, out in merge(self.streams):
            self.cached[k] = max(self.cached[k], out.num_cached_tokens)
            self.timer.tokens(len(out.token_ids))
            choice = self.choices[k * self.n + out.index]
            yield choice, choice.add(out)

    def usage(self) -> p.Usage:
        prompt, completion = sum(self.prompt_lens), sum(len(c.token_ids) for c in self.choices)
        return p.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                       prompt_tokens_details=p.PromptTokensDetails(cached_tokens=sum(self.cached)))

    def close(self) -> None:
        """Abort what is unfinished and release everything; once, however often called."""
        if self.closed:
            return
        self.closed = True
        if self.deadline is not None:
            self.deadline.cancel()
        for s in self.streams:
            s.close()
        try:
            for fn in self.closing:
                fn()
        finally:
            self.claim.release()
            if self.timer is not None:
                reasons = [c.finish_reason for c in self.choices if c.finish_reason]
                self.timer.done(reasons[-1] if reasons else None, sum(self.prompt_lens))


class Format:
    """How an endpoint writes its answer. Streamed: head(), then piece() for each output (None: nothing to send),
    then tail(); error() for a failure midway; done last. Not streamed: body()."""

    media_type = "text/event-stream"
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    done: Optional[bytes] = None

    def __init__(self, job: Job):
        self.job = job

    def head(self) -> list[bytes]:
        return []

    def piece(self, choice: Choice, piece: Piece) -> Optional[bytes]:
        raise NotImplementedError

    def tail(self) -> list[bytes]:
        return []

    def error(self, e: Exception) -> bytes:
        raise NotImplementedError

    def body(self):
        raise NotImplementedError


async def respond(request: Request, job: Job, fmt: Format, stream: bool) -> Response:
    if not stream:
        async def collect():
            async for _ in job.run():
                pass
            return fmt.body()

        return await collected(request, collect(), job.close)

    async def events():
        try:
            for event in fmt.head():
                yield event
            async for choice, piece in job.run():
                event = fmt.piece(choice, piece)
                if event is not None:
                    yield event
            for event in fmt.tail():
                yield event
        except Exception as e:
            yield fmt.error(e)
        finally:
            job.close()
        if fmt.done is not None:
            yield fmt.done

    # job.close also as the response's background task: a client gone before the stream's first event leaves the
    # generator unstarted, and its finally would never run (the claim and the engine request kept)
    return StreamingResponse(events(), media_type=fmt.media_type, headers=fmt.headers,
                             background=BackgroundTask(job.close))
