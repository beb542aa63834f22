"""What the routes share: reading a body, starting engine requests, merging their outputs, SSE framing, and
collecting a response while watching for a client that leaves."""

import asyncio
import json
from contextlib import suppress
from typing import AsyncIterator, Optional, TypeVar

from jinja2 import TemplateError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmcli.engine import grammar
from lmcli.engine.async_engine import EngineDead, RequestStream, Stopping, TimedOut
from lmcli.engine.engine import Output, SessionBusy
from lmcli.errors import UserError
from lmcli.serve.errors import APIError, from_validation
from lmcli.serve.protocol import ROLE_FIELDS
from lmcli.serve.state import ServerState

M = TypeVar("M", bound=BaseModel)
TEMPLATE_ERRORS = (ValueError, TemplateError)  # what a chat template raises for messages it refuses
MAX_BODY = 32 << 20  # bytes


async def parse(request: Request, model: type[M]) -> M:
    chunks, size = [], 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_BODY:
            raise APIError(413, f"the request body is over {MAX_BODY >> 20} MiB", code="body_too_large")
    body = b"".join(chunks)
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        message = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise APIError(400, f"the request body is not valid JSON: {message}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise from_validation(e) from None


def check_prompt_chars(state, texts, field: str) -> None:
    """A prompt surely longer than the context is refused before it is tokenized (a 10 MB prompt took 15 s to
    be refused): more characters than the context's tokens could hold, at the vocabulary's longest token."""
    per_token = state.max_token_chars
    if not per_token:
        return
    total = sum(len(t) for t in texts if isinstance(t, str))
    if total > state.max_len * per_token:
        raise APIError(400, f"the prompt has {total} characters, more than this model's context of {state.max_len} "
                       f"tokens can hold (a token is at most {per_token} characters); shorten it", field,
                       "context_length_exceeded")


def message_texts(messages, tools=None) -> list:
    """The text of messages (pydantic models or dicts) that goes into the prompt: each content string and text
    part, the arguments of earlier tool calls, and the tools' definitions as JSON."""
    out = []
    for m in messages:
        field = m.get if isinstance(m, dict) else lambda name: getattr(m, name, None)
        content = field("content")
        parts = content if isinstance(content, list) else [content]
        for part in parts:
            text = part.get("text") if isinstance(part, dict) else getattr(part, "text", part)
            out.append(text)
        for call in field("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            for value in (function.values() if isinstance(function, dict) else ()):  # name, arguments
                out.append(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    for tool in tools or []:
        out.append(json.dumps(tool.model_dump() if hasattr(tool, "model_dump") else tool, ensure_ascii=False))
    return out


def check_messages(messages: list, field: str = "messages") -> None:
    """What the messages ask that this server cannot do, as a 400 naming the part at fault: the deprecated
    function role and function_call, audio, content other than text, a field another role's (protocol.ROLE_FIELDS),
    malformed tool calls. /openapi.json says the same (openapi_requests.py)."""
    for i, m in enumerate(messages):
        at = f"{field}.{i}"
        if m.role == "function":
            raise APIError(400, "function messages belong to the deprecated functions API; send tool messages",
                           f"{at}.role")
        for name in ("function_call", "audio"):
            if getattr(m, name) is not None:
                raise APIError(400, f"{name} in a message is not supported here (the deprecated functions API: "
                                    "use tool_calls; audio: the models read text)", f"{at}.{name}")
        for name, owner in ROLE_FIELDS.items():
            if getattr(m, name) not in (None, []) and m.role != owner:  # [] asks for nothing
                raise APIError(400, f"{m.role} messages have no {name} ({owner} messages do)", f"{at}.{name}")
        for k, call in enumerate(m.tool_calls or []):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                    not isinstance(fn.get("arguments"), str) or call.get("type", "function") != "function" or \
                    not isinstance(call.get("id", ""), (str, type(None))):
                raise APIError(400, "tool_calls are an assistant's: [{\"id\", \"type\": \"function\", "
                                    "\"function\": {\"name\": ..., \"arguments\": \"JSON text\"}}]",
                               f"{at}.tool_calls.{k}")
        if m.content is None and m.refusal is None and not m.tool_calls:
            raise APIError(400, "a message needs content (or, from the assistant, a refusal or tool_calls)",
                           f"{at}.content")
        parts = ("text", "refusal") if m.role == "assistant" else ("text",)
        for k, part in enumerate(m.content if isinstance(m.content, list) else []):
            if part.type not in parts:
                what = f"the models here read text only, not {part.type}" if part.type not in ("text", "refusal") \
                    else f"a {m.role} message has no refusal parts (an assistant's only)"
                raise APIError(400, what, f"{at}.content.{k}")
            if (part.text if part.type == "text" else part.refusal) is None:
                raise APIError(400, f"a {part.type} part needs its {part.type}", f"{at}.content.{k}.{part.type}")
            for key in ("text", "refusal", "image_url", "input_audio", "file"):
                if key != part.type and getattr(part, key) is not None:
                    raise APIError(400, f"a {part.type} part has no {key}", f"{at}.content.{k}.{key}")


def check_kwargs(kwargs: Optional[dict]) -> None:
    """LMDeploy's APIClient posts its **kwargs as a field, `kwargs`; empty it means nothing (its server ignores
    it), anything in it would be lost, so that is a 400."""
    if kwargs:
        raise APIError(400, f"kwargs: {sorted(kwargs)} would be ignored here; send them as fields of the request",
                       "kwargs")


async def structured_output(state: ServerState, response_format: Optional[dict]) -> Optional[str]:
    """The grammar that response_format asks for, compiled; None for plain text."""
    try:
        rules = grammar.grammar_of(response_format)
    except UserError as e:
        raise user_error(e) from None
    return await compiled(state, rules, "response_format")


async def compiled(state: ServerState, rules: Optional[str], field: str) -> Optional[str]:
    """Compile a grammar here (a worker thread, not the engine's loop), so that one that cannot be enforced is a
    400 naming `field` before anything starts."""
    if rules is not None and state.grammars is not None:
        try:
            await run_in_threadpool(state.grammars.compile, rules, field)
        except UserError as e:
            raise user_error(e) from None
    return rules


def user_error(e: Exception) -> APIError:
    if isinstance(e, SessionBusy):
        return APIError(409, str(e), "session_id", "session_busy")
    if isinstance(e, TimedOut):
        return APIError(504, str(e), code="request_timeout")
    if isinstance(e, Stopping):
        return APIError(503, str(e), code="shutting_down", headers={"Retry-After": "1"})
    if isinstance(e, EngineDead):
        return APIError(503, str(e), code="engine_dead")
    return APIError(400, str(e), getattr(e, "param", None))


async def start(engine, prompt_ids, params, request_id, session_id=None) -> RequestStream:
    try:
        return await engine.start(prompt_ids, params, request_id, session_id)
    except (UserError, EngineDead) as e:
        raise user_error(e) from None


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Output]]:
    """(which stream, output) from several requests as they come; closing this closes them all."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            streams[0].close()
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                q.put_nowait((k, out))
        except Exception as e:
            q.put_nowait((k, e))
        q.put_nowait((k, None))

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            k, item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()


def sse(data) -> bytes:
    """One server-sent event: a dict as compact JSON, or a plain string ([DONE])."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def sse_error(e: Exception) -> bytes:
    err = e if isinstance(e, APIError) else user_error(e) if isinstance(e, (UserError, EngineDead)) \
        else APIError(500, f"{type(e).__name__}: {e}")
    return sse(err.body())


async def until_disconnect(request: Request, work) -> Optional[object]:
    """Run the coroutine `work`; if the client goes away first, cancel it (which aborts its requests) and return
    None."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled (the server stops)
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


async def collected(request: Request, work, cleanup) -> Response:
    """The JSON of the model that `work` builds, or 499 if the client left first; cleanup() runs either way."""
    try:
        body = await until_disconnect(request, work)
    except (UserError, EngineDead) as e:  # raised by the engine after it took the request
        return user_error(e).response()
    finally:
        cleanup()
    return JSONResponse(body.model_dump()) if body is not None else Response(status_code=499)
