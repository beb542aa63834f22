"""/v1/chat/interactive: LMDeploy's session API. With interactive_mode=true the engine keeps the session's
history and KV cache, so a turn prefills only its new tokens; interactive_mode=false ends the session and runs
the prompt on its own. Streamed as one JSON object per line (application/x-ndjson)."""

import asyncio
import logging
import random
import uuid
from dataclasses import replace
from typing import Optional

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmcli.engine.prompt import continue_chat, encode_chat, plain_messages, to_messages
from lmcli.engine.sampling_params import SamplingParams
from lmcli.errors import UserError
from lmcli.serve import protocol as p
from lmcli.engine.async_engine import EngineDead
from lmcli.serve.answer import Choice, Format, Job, Piece, arrival, check_context, respond
from lmcli.serve.common import (TEMPLATE_ERRORS, check_kwargs, check_messages, check_prompt_chars, message_texts,
                                parse, structured_output, user_error)
from lmcli.serve.errors import APIError
from lmcli.serve.state import History, ServerState


async def chat_interactive(request: Request) -> Response:
    state: ServerState = request.app.state.server
    req = await parse(request, p.InteractiveRequest)
    check_kwargs(req.kwargs)
    if req.image_url is not None:
        raise APIError(400, "this server's models read text only; send no image_url", "image_url")
    if req.adapter_name is not None:
        raise APIError(400, "no LoRA adapters are loaded on this server; send no adapter_name", "adapter_name")
    engine = state.ready()
    if isinstance(req.prompt, list):  # every field checked, even on a turn that only ends a session
        check_messages(req.prompt, "prompt")
    params = await sampling(state, req)
    sid = req.session_id
    if req.cancel:
        if sid == -1:
            raise APIError(400, "cancel needs the session_id of the running turn", "session_id")
        running = state.sessions_in_use.get(sid)
        for rid in running.request_ids if running else []:
            engine.abort(rid)
        history = await engine_call(engine, lambda e: len(e.session_tokens(sid)))
        return JSONResponse(p.InteractiveResponse(text="", tokens=0, input_tokens=0, history_tokens=history,
                                                  finish_reason="abort", session_id=sid).model_dump())
    if req.interactive_mode and sid == -1:
        sid = random.randrange(1 << 30, 1 << 31)
    if req.interactive_mode:
        await bound_sessions(state, engine, sid)
    rid = f"interactive-{uuid.uuid4().hex}"
    claim = state.claim(sid if sid != -1 else None, [rid])  # before any await: this session is ours from here on
    try:
        return await _turn(request, state, engine, req, params, sid, rid, claim)
    except BaseException:
        claim.release()
        raise


async def _turn(request, state: ServerState, engine, req, params: SamplingParams, sid: int, rid: str,
                claim) -> Response:
    """Run one turn; from the moment its stream exists, the stream's end releases the claim."""
    if not req.interactive_mode and sid != -1:  # end the session; this request runs on its own
        state.histories.pop(sid, None)
        state.sessions.forget(sid)
        await engine_call(engine, lambda e: e.end_session(sid))  # gone before the answer: /metrics agrees at once
    if req.request_output_len == 0:  # LMDeploy's way to end a session: nothing to generate
        claim.release()
        return JSONResponse(p.InteractiveResponse(text="", tokens=0, input_tokens=0, history_tokens=0,
                                                  finish_reason="stop", session_id=sid).model_dump())
    messages = to_messages([m.model_dump() for m in req.prompt] if isinstance(req.prompt, list) else req.prompt)
    if not messages or not any(m["content"] for m in messages):
        raise APIError(400, "the prompt is empty", "prompt")
    check_prompt_chars(state, message_texts(messages), "prompt")
    messages = plain_messages(messages, state.tokenizer.chat_template)
    history_ids = await engine_call(engine, lambda e: e.session_tokens(sid)) if req.interactive_mode else []
    kept = state.histories.get(sid)
    history_messages = kept.messages(len(history_ids)) if kept and history_ids else []
    try:
        if history_ids:
            prompt_ids = await run_in_threadpool(continue_chat, state.tokenizer, history_ids,
                                                 history_messages + messages)
        else:
            messages = to_messages(messages, state.options.meta_instruction)
            prompt_ids = await run_in_threadpool(encode_chat, state.tokenizer, messages)
    except TEMPLATE_ERRORS as e:
        raise APIError(400, f"the chat template refused the prompt: {e}", "prompt") from None
    max_tokens = state.output_len(req.request_output_len)
    if not history_ids:  # a session's later turns: the engine checks the whole history
        check_context(state, len(prompt_ids), None, "prompt")  # an answer asked too long ends at the context
    try:
        params = replace(params, max_tokens=max_tokens)
    except UserError as e:  # min_new_tokens past request_output_len
        raise sampling_error(e) from None
    job = Job(state, "interactive", rid, claim, arrival=arrival(request))
    await job.start(engine, [(prompt_ids, params)], sid if req.interactive_mode else None)
    if req.interactive_mode:  # idle from the turn's end
        job.closing.append(lambda: state.sessions.touch(sid))
    if req.interactive_mode:  # the next turn sees from the engine's token count whether this one joined
        job.closing.append(lambda: state.histories.__setitem__(sid, History(
            history_messages, history_messages + messages + [{"role": "assistant", "content": job.choices[0].text}],
            len(history_ids))))
    return await respond(request, job, InteractiveFormat(job, sid), req.stream)


async def sampling(state: ServerState, req: p.InteractiveRequest) -> SamplingParams:
    """The turn's sampling (its max_tokens set later, from the session's room), or a 400 naming the field."""
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    try:
        return SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                              repetition_penalty=req.repetition_penalty, ignore_eos=req.ignore_eos, stop=stop,
                              seed=req.seed, min_p=req.min_p, min_tokens=req.min_new_tokens or 0,
                              skip_special_tokens=req.skip_special_tokens,
                              spaces_between_special_tokens=req.spaces_between_special_tokens,
                              grammar=await structured_output(state, req.response_format))
    except UserError as e:
        raise sampling_error(e) from None


OWN_NAMES = {"min_tokens": "min_new_tokens", "max_tokens": "request_output_len"}  # SamplingParams' -> LMDeploy's


def sampling_error(e: UserError) -> APIError:
    """A 400 for a sampling error, in this endpoint's field names."""
    message = " ".join(OWN_NAMES.get(word, word) for word in str(e).split(" "))
    return APIError(400, message, OWN_NAMES.get(e.param, e.param))


class InteractiveFormat(Format):
    """LMDeploy's: one JSON object per line, each with the new text and the counts so far."""

    media_type = "application/x-ndjson"
    headers = {}

    def __init__(self, job: Job, session_id: int):
        super().__init__(job)
        self.session_id = session_id

    def result(self, text: str) -> p.InteractiveResponse:
        c, input_tokens = self.job.choices[0], self.job.prompt_lens[0]
        return p.InteractiveResponse(text=text, tokens=c.num_output_tokens, input_tokens=input_tokens,
                                     history_tokens=max(c.num_prompt_tokens - input_tokens, 0),
                                     finish_reason=c.finish_reason, session_id=self.session_id,
                                     message=c.finish_message)

    def piece(self, choice: Choice, piece: Piece) -> Optional[bytes]:
        if piece.text or piece.finish_reason:
            return (self.result(piece.text).model_dump_json() + "\n").encode()
        return None

    def error(self, e: Exception) -> bytes:
        err = e if isinstance(e, APIError) else user_error(e)
        return JSONResponse(err.body()).body + b"\n"

    def body(self) -> p.InteractiveResponse:
        return self.result(self.job.choices[0].text)


async def bound_sessions(state: ServerState, engine, sid: int) -> None:
    """Before a turn that keeps its session: 410 if the server ended this session (said once); past
    --max-sessions, the least recently used idle session is ended to make room (429 if every one is busy)."""
    book = state.sessions
    why = book.why_ended(sid)
    if why is not None:
        raise APIError(410, f"session {sid} {why}: its history is gone. Send the turn again to start the session "
                       "afresh", "session_id", "session_expired")
    if book.full(sid):
        victim = book.least_recent_idle(state.sessions_in_use)
        if victim is None:
            raise APIError(429, f"all {book.cap} sessions (--max-sessions) are running a turn; try again shortly",
                           "session_id", "too_many_sessions", {"Retry-After": "1"})
        book.touch(sid)  # before the await: the place is this session's
        await end_session(state, engine, victim, f"was ended to make room for a newer one (--max-sessions {book.cap})")
    book.touch(sid)


async def end_session(state: ServerState, engine, sid: int, why: str) -> None:
    """End a session its client left (idle too long, or to make room): its history and KV blocks are freed."""
    state.sessions.end(sid, why)
    state.histories.pop(sid, None)
    await engine_call(engine, lambda e: e.end_session(sid))


async def expire_sessions(state: ServerState) -> None:
    """End sessions idle past --session-ttl, for the server's life."""
    ttl = state.options.session_ttl
    while ttl:
        await asyncio.sleep(min(max(ttl / 4, 0.02), 30.0))
        for sid in state.sessions.idle(state.sessions_in_use) if state.engine is not None else []:
            if sid not in state.sessions.idle(state.sessions_in_use):  # a turn came in while an earlier one ended
                continue
            try:
                await end_session(state, state.engine, sid, f"was idle for more than {ttl:g} s (--session-ttl)")
            except APIError:  # the engine is dead: /health says so
                return
            except Exception:  # never the end of the sweep
                logging.getLogger("lmcli.serve").exception("ending idle session %s", sid)


async def engine_call(engine, fn):
    try:
        return await engine.call(fn)
    except EngineDead as e:
        raise user_error(e) from None
