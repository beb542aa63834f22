"""/v1/chat/completions and /v1/completions: OpenAI's wire format over the engine."""

import json
import re
import time
import uuid
from functools import lru_cache
from typing import Optional

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from lmcli.engine.prompt import encode_chat, plain_messages
from lmcli.engine.sampling_params import SamplingParams
from lmcli.errors import UserError
from lmcli.serve import protocol as p
from lmcli.serve.common import (TEMPLATE_ERRORS, check_kwargs, check_messages, collected, merge, parse, sse, sse_error,
                                start)
from lmcli.serve.errors import APIError
from lmcli.serve.metrics import RequestTimer
from lmcli.serve.state import ServerState

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sampling_params(state: ServerState, req: p.SamplingFields, max_tokens: Optional[int], prompt_len: int,
                    logprobs: Optional[int]) -> SamplingParams:
    if prompt_len >= state.max_len:
        raise APIError(400, f"the prompt has {prompt_len} tokens, but this model's context holds {state.max_len} "
                            "(prompt and output together)", "messages", "context_length_exceeded")
    max_tokens = state.output_len(max_tokens)
    if max_tokens is not None and prompt_len + max_tokens > state.max_len:
        raise APIError(400, f"this model's context holds {state.max_len} tokens, but {prompt_len + max_tokens} "
                            f"were asked for ({prompt_len} in the prompt, {max_tokens} to generate); lower "
                            "max_tokens", "max_tokens", "context_length_exceeded")
    defaults = state.generation.sampling
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    try:
        return SamplingParams(
            max_tokens=max_tokens, min_tokens=min_tokens(req), logit_bias=logit_bias(req.logit_bias),
            temperature=_pick(req.temperature, defaults.get("temperature"), 1.0),
            top_p=_pick(req.top_p, defaults.get("top_p"), 1.0), top_k=_pick(req.top_k, defaults.get("top_k"), 0),
            min_p=_pick(req.min_p, defaults.get("min_p"), 0.0), repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, seed=req.seed,
            stop=stop, stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos, n=req.n,
            logprobs=logprobs, skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens)
    except UserError as e:
        raise APIError(400, str(e)) from None


def min_tokens(req: p.SamplingFields) -> int:
    """min_tokens, or LMDeploy's min_new_tokens; both set to different values is a 400."""
    if req.min_new_tokens is not None and req.min_tokens and req.min_new_tokens != req.min_tokens:
        raise APIError(400, f"min_tokens ({req.min_tokens}) and min_new_tokens ({req.min_new_tokens}) disagree; "
                            "send one", "min_new_tokens")
    return req.min_new_tokens if req.min_new_tokens is not None else req.min_tokens


def logit_bias(bias: Optional[dict[str, float]]) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias (token ids as strings) as SamplingParams takes it; a key that is not a token id or a
    bias outside [-100, 100] is a 400 naming the field (ids past the vocabulary: the engine's 400)."""
    pairs = []
    for key, value in (bias or {}).items():
        if not key.strip().isdigit():
            raise APIError(400, f"logit_bias: {key!r} is not a token id (a non-negative integer)", "logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias: the bias of token {key} must be in [-100, 100], not {value}",
                           "logit_bias")
        pairs.append((int(key), value))
    return tuple(pairs)


def _pick(value, default, fallback):
    return value if value is not None else default if default is not None else fallback


# The chat fields of OpenAI and LMDeploy for what this server does not do: the values that ask for nothing
NOT_YET = "not supported by this server yet"
NEUTRAL = {
    "tools": ((None, []), f"tool calling is {NOT_YET}"),
    "tool_choice": ((None, "none", "auto"), f"tool calling is {NOT_YET}"),
    "functions": ((None, []), f"function calling is {NOT_YET}"),
    "function_call": ((None, "none", "auto"), f"function calling is {NOT_YET}"),
    "response_format": ((None, {"type": "text"}), f"structured output (json_object, json_schema) is {NOT_YET}"),
    "do_preprocess": ((True,), "messages always go through the chat template (raw text: /v1/completions)"),
    "audio": ((None,), "audio output is not supported: the models here write text"),
    "modalities": ((None, ["text"]), "the models here write text only"),
    "moderation": ((None,), "this server runs no moderation"),
    "prediction": ((None,), f"predicted outputs are {NOT_YET}"),
    "prompt_cache_options": ((None,), "the prefix cache here has no options per request"),
    "prompt_cache_retention": ((None,), "the prefix cache here keeps what memory allows"),
    "reasoning_effort": ((None,), "the models here do not take a reasoning effort"),
    "service_tier": ((None, "auto", "default"), "this server has one tier"),
    "store": ((None, False), "completions are not stored here"),
    "verbosity": ((None, "medium"), "the models here take no verbosity"),
    "web_search_options": ((None,), "this server does not search the web"),
}


def check_stream_options(req: p.SamplingFields) -> bool:
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")
    return bool(req.stream_options and req.stream_options.include_usage)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> p.Usage:
    return p.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached_tokens))


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def token_bytes(tokenizer, token_id: int) -> bytes:
    """A token's own bytes, also for a piece of a multi-byte character (whose text alone is U+FFFD), so a client
    can join them (OpenAI's `bytes`)."""
    text = token_text(tokenizer, token_id)
    if "\ufffd" not in text:
        return text.encode()
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):  # SentencePiece byte fallback
        return bytes([int(m.group(1), 16)])
    decoder = _byte_level_decoder()
    if all(c in decoder for c in piece):  # byte-level BPE (GPT-2 style): one character per byte
        return bytes(decoder[c] for c in piece)
    return text.encode()


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    # GPT-2's table: printable Latin-1 bytes stand for themselves, the others for 256, 257, ... in byte order
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def chat_logprobs(tokenizer, out) -> p.ChoiceLogprobs:
    content = []
    for tok, lp in zip(out.token_ids, out.logprobs):
        top = [p.TopLogprob(token=token_text(tokenizer, i), logprob=v, bytes=list(token_bytes(tokenizer, i)))
               for i, v in lp.top]
        content.append(p.TokenLogprob(token=token_text(tokenizer, tok), logprob=lp.logprob,
                                      bytes=list(token_bytes(tokenizer, tok)), top_logprobs=top))
    return p.ChoiceLogprobs(content=content)


class Tally:
    """Per request: prompt and cached tokens (the same for every choice of a prompt), output tokens, timings."""

    def __init__(self, state: ServerState, endpoint: str):
        self.timer = RequestTimer(state.metrics, endpoint)
        self.prompt: dict[int, int] = {}
        self.cached: dict[int, int] = {}
        self.completion = 0
        self.finish: Optional[str] = None

    def add(self, k: int, out) -> None:
        self.prompt[k], self.cached[k] = out.num_prompt_tokens, max(self.cached.get(k, 0), out.num_cached_tokens)
        self.completion += len(out.token_ids)
        self.timer.tokens(len(out.token_ids))
        if out.finish_reason:
            self.finish = out.finish_reason

    def usage(self) -> p.Usage:
        return usage(sum(self.prompt.values()), self.completion, sum(self.cached.values()))

    def done(self) -> None:
        self.timer.done(self.finish, sum(self.prompt.values()))


# ---- /v1/chat/completions ----


async def opening(request: Request, model):
    """What both routes check first: the body, a loaded engine, the model's name, stream_options."""
    state: ServerState = request.app.state.server
    req = await parse(request, model)
    check_kwargs(req.kwargs)
    engine = state.ready()
    state.check_model(req.model)
    return state, req, engine, check_stream_options(req)


def chunk_event(body, include_usage: bool) -> bytes:
    """One SSE chunk as OpenAI sends it: logprobs and finish_reason always there, usage null until the last."""
    data = body.model_dump(exclude_none=True)
    for c in data["choices"]:
        c.setdefault("logprobs", None)
        c.setdefault("finish_reason", None)
    if include_usage:
        data["usage"] = body.usage.model_dump() if body.usage else None
    return sse(data)


async def chat_completions(request: Request) -> Response:
    state, req, engine, include_usage = await opening(request, p.ChatCompletionRequest)
    if req.top_logprobs and not req.logprobs:  # 0, LMDeploy's APIClient's default, asks for nothing
        raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    for field, (neutral, why) in NEUTRAL.items():
        if getattr(req, field) not in neutral:
            raise APIError(400, f"{field}: {why}; send {' or '.join(json.dumps(v) for v in neutral)}", field)
    check_messages(req.messages)
    messages = plain_messages([m.model_dump() for m in req.messages], state.tokenizer.chat_template)
    try:
        template_kwargs = {**(req.chat_template_kwargs or {}),
                           **({} if req.enable_thinking is None else {"enable_thinking": req.enable_thinking})}
        prompt_ids = await run_in_threadpool(encode_chat, state.tokenizer, messages, state.options.meta_instruction,
                                             template_kwargs)
    except TEMPLATE_ERRORS as e:
        raise APIError(400, f"the chat template refused the messages: {e}", "messages") from None
    if req.max_tokens is not None and req.max_completion_tokens is not None and \
            req.max_tokens != req.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens differ; send one", "max_tokens")
    max_tokens = req.max_completion_tokens or req.max_tokens
    params = sampling_params(state, req, max_tokens, len(prompt_ids),
                             (req.top_logprobs or 0) if req.logprobs else None)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    engine_ids = [rid]
    claim = state.claim(req.session_id, engine_ids)
    try:
        stream = await start(engine, prompt_ids, params, rid)
    except BaseException:
        claim.release()
        raise
    created, tally = int(time.time()), Tally(state, "chat")
    log_user(request, req.user or req.safety_identifier, rid)

    def finish() -> None:
        claim.release()
        tally.done()

    if req.stream:
        return StreamingResponse(chat_events(state, req, rid, created, stream, tally, include_usage, finish),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    async def collect() -> p.ChatCompletionResponse:
        texts, reasons, logprobs = [""] * req.n, [None] * req.n, [[] for _ in range(req.n)]
        async for _, out in merge([stream]):
            tally.add(0, out)
            texts[out.index] += out.text
            if req.logprobs:
                logprobs[out.index] += chat_logprobs(state.tokenizer, out).content
            reasons[out.index] = out.finish_reason or reasons[out.index]
        choices = [p.ChatChoice(index=i, message=p.ChatMessage(content=texts[i]), finish_reason=reasons[i],
                                logprobs=p.ChoiceLogprobs(content=logprobs[i]) if req.logprobs else None)
                   for i in range(req.n)]
        return p.ChatCompletionResponse(id=rid, created=created, model=state.model_name, choices=choices,
                                        usage=tally.usage())

    return await collected(request, collect(), lambda: (stream.close(), finish()))


async def chat_events(state, req, rid, created, stream, tally, include_usage, finish):
    def chunk(choices, usage=None) -> bytes:
        return chunk_event(p.ChatCompletionChunk(id=rid, created=created, model=state.model_name, choices=choices,
                                                 usage=usage), include_usage)

    try:
        for i in range(req.n):
            yield chunk([p.ChatChunkChoice(index=i, delta=p.Delta(role="assistant", content=""))])
        async for _, out in merge([stream]):
            tally.add(0, out)
            if out.text or out.finish_reason or (req.logprobs and out.token_ids):
                lp = chat_logprobs(state.tokenizer, out) if req.logprobs else None
                yield chunk([p.ChatChunkChoice(index=out.index, delta=p.Delta(content=out.text), logprobs=lp,
                                               finish_reason=out.finish_reason)])
        if include_usage:
            yield chunk([], tally.usage())
    except Exception as e:
        yield sse_error(e)
    finally:
        stream.close()
        finish()
    yield sse("[DONE]")


def log_user(request: Request, user: Optional[str], rid: str) -> None:
    if user:
        import logging

        logging.getLogger("lmcli.serve").info("request %s from user %r", rid, user)


# ---- /v1/completions ----


async def completions(request: Request) -> Response:
    state, req, engine, include_usage = await opening(request, p.CompletionRequest)
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, f"best_of ({req.best_of}) must equal n ({req.n}) or be null: choices are not ranked "
                            "here; ask for n choices and pick", "best_of")
    if req.suffix is not None:
        raise APIError(400, f"suffix is not supported: {state.model_name} has no fill-in-the-middle tokens",
                       "suffix", "unsupported_field")
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported (prompt logprobs are not computed)", "echo")
    prompts = await run_in_threadpool(prompt_ids_of, state.tokenizer, req.prompt)
    texts = [state.tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts] if req.echo else None
    params = [sampling_params(state, req, req.max_tokens, len(ids), req.logprobs) for ids in prompts]
    if len(prompts) * req.n > 64:
        raise APIError(400, "at most 64 choices per request (prompts times n)", "prompt")
    rid = f"cmpl-{uuid.uuid4().hex}"
    engine_ids = [f"{rid}-{k}" for k in range(len(prompts))]
    claim = state.claim(req.session_id, engine_ids)
    streams = []
    try:
        for k, ids in enumerate(prompts):
            streams.append(await start(engine, ids, params[k], engine_ids[k]))
    except BaseException:
        for s in streams:
            s.close()
        claim.release()
        raise
    created, tally, n = int(time.time()), Tally(state, "completions"), req.n
    log_user(request, req.user, rid)

    def finish() -> None:
        claim.release()
        tally.done()

    def response(choices, usage=None) -> p.CompletionResponse:
        return p.CompletionResponse(id=rid, created=created, model=state.model_name, choices=choices, usage=usage)

    if req.stream:
        async def events():
            try:
                if req.echo:
                    for k, text in enumerate(texts):
                        for j in range(n):
                            yield chunk(response([p.CompletionChoice(index=k * n + j, text=text)]))
                offsets = [0] * (len(prompts) * n)
                async for k, out in merge(streams):
                    tally.add(k, out)
                    if out.text or out.finish_reason or (req.logprobs is not None and out.token_ids):
                        i = k * n + out.index
                        lp = None
                        if req.logprobs is not None:
                            lp = completion_logprobs(state.tokenizer, out, offsets[i])
                            offsets[i] += sum(len(t) for t in lp.tokens)
                        yield chunk(response([p.CompletionChoice(index=i, text=out.text, logprobs=lp,
                                                                 finish_reason=out.finish_reason)]))
                if include_usage:
                    yield chunk(response([], tally.usage()))
            except Exception as e:
                yield sse_error(e)
            finally:
                for s in streams:
                    s.close()
                finish()
            yield sse("[DONE]")

        def chunk(body: p.CompletionResponse) -> bytes:
            return chunk_event(body, include_usage)

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def collect() -> p.CompletionResponse:
        size = len(prompts) * n
        out_texts, reasons = [""] * size, [None] * size
        logprobs = [p.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
                    for _ in range(size)]
        async for k, out in merge(streams):
            tally.add(k, out)
            i = k * n + out.index
            out_texts[i] += out.text
            reasons[i] = out.finish_reason or reasons[i]
            if req.logprobs is not None:
                lp = completion_logprobs(state.tokenizer, out, sum(len(t) for t in logprobs[i].tokens))
                for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    getattr(logprobs[i], name).extend(getattr(lp, name))
        choices = [p.CompletionChoice(index=i, text=(texts[i // n] if req.echo else "") + out_texts[i],
                                      finish_reason=reasons[i],
                                      logprobs=logprobs[i] if req.logprobs is not None else None)
                   for i in range(size)]
        return response(choices, tally.usage())

    return await collected(request, collect(), lambda: ([s.close() for s in streams], finish()))


def prompt_ids_of(tokenizer, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "the prompt is empty", "prompt")
    out = []
    for item in prompt:
        ids = tokenizer(item).input_ids if isinstance(item, str) else list(item)
        if not ids:
            raise APIError(400, "a prompt is empty", "prompt")
        out.append(ids)
    return out


def completion_logprobs(tokenizer, out, offset: int) -> p.CompletionLogprobs:
    tokens, offsets, top = [], [], []
    for tok, lp in zip(out.token_ids, out.logprobs):
        text = token_text(tokenizer, tok)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        top.append({token_text(tokenizer, i): v for i, v in lp.top})
    return p.CompletionLogprobs(tokens=tokens, token_logprobs=[lp.logprob for lp in out.logprobs],
                                top_logprobs=top, text_offset=offsets)
