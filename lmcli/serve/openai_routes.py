"""/v1/chat/completions and /v1/completions: OpenAI's requests checked and turned into engine requests (their
answers' format: openai_format)."""

import json
import logging
import uuid
from typing import Optional

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from lmcli.engine.prompt import encode_chat, plain_messages
from lmcli.engine.sampling_params import SamplingParams
from lmcli.errors import UserError
from lmcli.serve import protocol as p
from lmcli.serve.answer import Job, arrival, check_context, respond
from lmcli.serve.common import (TEMPLATE_ERRORS, check_kwargs, check_messages, check_prompt_chars, compiled,
                                message_texts, parse, structured_output, user_error)
from lmcli.serve.errors import APIError
from lmcli.serve import tools
from lmcli.serve.openai_format import ChatFormat, CompletionFormat
from lmcli.serve.reasoning import REASONING_PARSERS
from lmcli.serve.tool_parsers import PARSERS
from lmcli.serve.state import ServerState


def sampling_params(state: ServerState, req: p.SamplingFields, max_tokens: Optional[int], prompt_len: int,
                    prompt_field: str, logprobs: Optional[int], grammar: Optional[str]) -> SamplingParams:
    max_tokens = state.output_len(max_tokens)
    check_context(state, prompt_len, max_tokens, prompt_field)
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
            spaces_between_special_tokens=req.spaces_between_special_tokens, grammar=grammar)
    except UserError as e:
        raise user_error(e) from None


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


def check_neutral(req, fields: dict) -> None:
    for field, (neutral, why) in fields.items():
        value = getattr(req, field)
        if not any(value == v and type(value) is type(v) for v in neutral):  # 0 is not false here
            raise APIError(400, f"{field}: {why}; send {' or '.join(json.dumps(v) for v in neutral)}", field)


def check_stream_options(req: p.SamplingFields) -> bool:
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")
    return bool(req.stream_options and req.stream_options.include_usage)


async def opening(request: Request, model):
    """What both routes check first: the body, a loaded engine, the model's name, stream_options."""
    state: ServerState = request.app.state.server
    req = await parse(request, model)
    check_kwargs(req.kwargs)
    check_neutral(req, p.ROUTER_NEUTRAL)
    engine = state.ready()
    state.check_model(req.model)
    return state, req, engine, check_stream_options(req)


def log_user(user: Optional[str], rid: str) -> None:
    if user:
        logging.getLogger("lmcli.serve").info("request %s from user %r", rid, user)


# ---- /v1/chat/completions ----


async def chat_completions(request: Request) -> Response:
    state, req, engine, include_usage = await opening(request, p.ChatCompletionRequest)
    if req.top_logprobs and not req.logprobs:  # 0, LMDeploy's APIClient's default, asks for nothing
        raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    check_neutral(req, p.NEUTRAL)
    check_neutral(req, p.CHAT_ROUTER_NEUTRAL)
    check_messages(req.messages)
    check_prompt_chars(state, message_texts(req.messages, req.tools), "messages")
    template = state.tokenizer.chat_template
    plan = tools.plan(req.tools, req.tool_choice, req.parallel_tool_calls, state.tool_parser)
    if plan.calls_tools and req.response_format not in (None, {"type": "text"}):
        raise APIError(400, "response_format cannot be combined with tools unless tool_choice is \"none\"",
                       "response_format")
    messages = plain_messages([m.model_dump() for m in req.messages], template)
    messages = tools.history(messages, template, plan.parser)
    template_kwargs = {**(req.chat_template_kwargs or {}),
                       **({} if req.enable_thinking is None else {"enable_thinking": req.enable_thinking})}
    if plan.calls_tools and tools.renders_tools(template):
        template_kwargs["tools"] = plan.tools
    elif plan.calls_tools:
        messages = tools.with_tools(messages, plan.tools, state.options.meta_instruction)
    try:
        prompt_ids = await run_in_threadpool(encode_chat, state.tokenizer, messages, state.options.meta_instruction,
                                             template_kwargs)
    except TEMPLATE_ERRORS as e:
        raise APIError(400, f"the chat template refused the messages: {e}", "messages") from None
    if req.max_tokens is not None and req.max_completion_tokens is not None and \
            req.max_tokens != req.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens differ; send one", "max_tokens")
    max_tokens = req.max_completion_tokens or req.max_tokens
    parallel = req.parallel_tool_calls is not False
    forced = tools.forced_grammar(plan, parallel)  # a call, for tool_choice required or a named function
    rules = await compiled(state, forced, "tools") if forced else await structured_output(state, req.response_format)
    params = sampling_params(state, req, max_tokens, len(prompt_ids), "messages",
                             (req.top_logprobs or 0) if req.logprobs else None, rules)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    names = {t["function"]["name"] for t in plan.tools}
    parser = (lambda: PARSERS[plan.parser](single=not parallel, names=names)) if plan.calls_tools else None
    name = state.options.reasoning_parser if req.separate_reasoning else None
    if name and rules is not None:  # a grammar shapes the answer from its first token: reasoning only if it opens
        name = "think"              # with <think> (deepseek_r1 would take a whole JSON answer for reasoning)
    job = Job(state, "chat", rid, state.claim(req.session_id, [rid]), req.n, parser,
              REASONING_PARSERS[name] if name else None, arrival(request))
    await job.start(engine, [(prompt_ids, params)])
    log_user(req.user or req.safety_identifier, rid)
    fmt = ChatFormat(job, state.tokenizer, state.model_name, include_usage, req.logprobs)
    return await respond(request, job, fmt, req.stream)


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
    texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    check_prompt_chars(state, texts, "prompt")  # each prompt's own check comes after tokenizing
    prompts = await run_in_threadpool(prompt_ids_of, state.tokenizer, req.prompt)
    try:  # (before the engine checks the ids against the vocabulary)
        echo = [state.tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts] if req.echo else None
    except (ValueError, OverflowError, IndexError, TypeError):
        raise APIError(400, "the prompt's token ids are not all in the vocabulary", "prompt") from None
    rules = await structured_output(state, req.response_format)  # one grammar for every prompt
    params = [sampling_params(state, req, req.max_tokens, len(ids), "prompt", req.logprobs, rules) for ids in prompts]
    if len(prompts) * req.n > 64:
        raise APIError(400, "at most 64 choices per request (prompts times n)", "prompt")
    rid = f"cmpl-{uuid.uuid4().hex}"
    job = Job(state, "completions", rid, state.claim(req.session_id, [f"{rid}-{k}" for k in range(len(prompts))]),
              req.n, arrival=arrival(request))
    await job.start(engine, list(zip(prompts, params)))
    log_user(req.user, rid)
    fmt = CompletionFormat(job, state.tokenizer, state.model_name, include_usage, req.logprobs is not None, echo)
    return await respond(request, job, fmt, req.stream)


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
