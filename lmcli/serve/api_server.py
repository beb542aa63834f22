"""The Starlette app: its routes, with API keys, CORS, errors as OpenAI bodies and the offline Swagger UI from
serve/web.py. The engine is loaded in the background, so /health can say 503 "loading" until it is ready."""

import asyncio
from contextlib import asynccontextmanager
from typing import Callable, Union

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmcli.engine.async_engine import AsyncEngine
from lmcli.serve import protocol as p
from lmcli.serve import web
from lmcli.serve.admission import Admission
from lmcli.serve.common import TEMPLATE_ERRORS, parse
from lmcli.serve.errors import APIError
from lmcli.serve.interactive import chat_interactive, expire_sessions
from lmcli.serve.metrics import CONTENT_TYPE
from lmcli.serve.openai_routes import chat_completions, completions
from lmcli.serve.openapi import openapi_schema
from lmcli.serve.state import ServerOptions, ServerState



async def models(request: Request) -> JSONResponse:
    state: ServerState = request.app.state.server
    state.ready()
    card = p.ModelCard(id=state.model_name, created=state.created, max_model_len=state.max_len)
    return JSONResponse(p.ModelList(data=[card]).model_dump())


async def encode(request: Request) -> JSONResponse:
    state: ServerState = request.app.state.server
    req = await parse(request, p.EncodeRequest)
    state.ready()

    def run(text: str) -> list[int]:
        tok = state.tokenizer
        if req.do_preprocess:
            from lmcli.engine.prompt import render, to_messages

            text = render(tok, to_messages(text, state.options.meta_instruction))
        ids = tok.encode(text, add_special_tokens=False)
        bos = state.generation.bos_token_id
        if req.add_bos and bos is not None and not (ids and ids[0] == bos):
            ids = [bos] + ids
        return ids

    try:
        if isinstance(req.input, str):
            ids = await run_in_threadpool(run, req.input)
            return JSONResponse({"input_ids": ids, "length": len(ids)})
        all_ids = [await run_in_threadpool(run, text) for text in req.input]
    except TEMPLATE_ERRORS as e:
        raise APIError(400, f"the chat template refused the input: {e}", "input") from None
    return JSONResponse({"input_ids": all_ids, "length": [len(ids) for ids in all_ids]})


async def health(request: Request) -> JSONResponse:
    state: ServerState = request.app.state.server
    if state.draining:
        return JSONResponse({"status": "error", "message": "the server is shutting down"}, 503)
    if state.engine is None:
        status = "error" if state.load_error else "loading"
        return JSONResponse({"status": status, "message": state.load_error or "the model is loading"}, 503)
    problem = await state.engine.problem()
    if problem is not None:
        return JSONResponse({"status": "error", "message": problem}, 503)
    return JSONResponse({"status": "ok", "instance": state.instance})


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(openapi_schema(request.app.state.version))


def create_app(engine: Union[AsyncEngine, Callable[[], AsyncEngine]], options: ServerOptions = ServerOptions(),
               on_ready: Callable[[ServerState], None] = lambda state: None,
               on_error: Callable[[str], None] = lambda message: None) -> Starlette:
    """engine: a running AsyncEngine, or a function that loads one (called in a thread at start-up; until it
    returns, /health says 503). on_ready runs once the engine is ready; on_error if loading failed."""
    from lmcli import __version__

    state = ServerState(options)

    @asynccontextmanager
    async def lifespan(app):
        loader = None
        if isinstance(engine, AsyncEngine):
            state.attach(engine)
            on_ready(state)
        else:
            loader = asyncio.ensure_future(_load(state, engine, on_ready, on_error))
        expiry = asyncio.ensure_future(expire_sessions(state))
        try:
            yield
        finally:
            expiry.cancel()
            if loader is not None:
                loader.cancel()
            if state.engine is not None:
                await run_in_threadpool(state.engine.close)

    routes = [
        *web.docs_routes("lm api_server", Route("/openapi.json", openapi, include_in_schema=False)),
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/interactive", chat_interactive, methods=["POST"]),
        Route("/v1/encode", encode, methods=["POST"]),
    ]
    middleware = [*web.middleware(options), Middleware(Admission, state=state)]  # keys first, then a place
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers=web.EXCEPTION_HANDLERS)
    app.state.server = state
    app.state.version = __version__
    return app


async def _load(state: ServerState, load: Callable[[], AsyncEngine], on_ready, on_error) -> None:
    try:
        engine = await run_in_threadpool(load)
    except Exception as e:  # /health says why; the command line stops the server
        state.load_error = f"loading the model failed: {e}"
        on_error(state.load_error)
        return
    state.attach(engine)
    on_ready(state)
