"""The Starlette app: routes, API keys, CORS, errors as OpenAI bodies, the offline Swagger UI. The engine is
loaded in the background, so /health can say 503 "loading" until it is ready."""

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager
from typing import Callable, Union

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from lmcli.engine.async_engine import AsyncEngine
from lmcli.serve import protocol as p
from lmcli.serve.common import TEMPLATE_ERRORS, parse
from lmcli.serve.errors import APIError
from lmcli.serve.interactive import chat_interactive
from lmcli.serve.metrics import CONTENT_TYPE
from lmcli.serve.openai_routes import chat_completions, completions
from lmcli.serve.openapi import openapi_schema
from lmcli.serve.state import ServerOptions, ServerState

log = logging.getLogger("lmcli.serve")


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
    if state.engine is None:
        status = "error" if state.load_error else "loading"
        return JSONResponse({"status": status, "message": state.load_error or "the model is loading"}, 503)
    problem = await state.engine.problem()
    if problem is not None:
        return JSONResponse({"status": "error", "message": problem}, 503)
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(openapi_schema(request.app.state.version))


SWAGGER_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>lm api_server</title>
<link rel="stylesheet" href="/swagger/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/swagger/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>"""


async def docs(request: Request) -> HTMLResponse:
    return HTMLResponse(SWAGGER_PAGE)


class Guard:
    """API keys (Bearer tokens, compared in constant time) for /v1/ paths; /health, /metrics and the docs stay
    open."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state
        self.keys = [k.encode() for k in state.options.api_keys]

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/") or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        if self.keys and not self._authorized(scope):
            error = APIError(401, "a valid API key is needed: send 'Authorization: Bearer <key>'", code="invalid_api_key")
            return await error.response()(scope, receive, send)
        return await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        return any([hmac.compare_digest(token, key) for key in self.keys])  # every key compared: constant time


async def api_error(request: Request, e: APIError) -> Response:
    return e.response()


async def http_error(request: Request, e: HTTPException) -> Response:
    return APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).response()


async def server_error(request: Request, e: Exception) -> Response:
    log.exception("error answering %s", request.url.path)
    return APIError(500, f"internal error: {type(e).__name__}: {e}").response()


def create_app(engine: Union[AsyncEngine, Callable[[], AsyncEngine]], options: ServerOptions = ServerOptions(),
               on_ready: Callable[[ServerState], None] = lambda state: None,
               on_error: Callable[[str], None] = lambda message: None) -> Starlette:
    """engine: a running AsyncEngine, or a function that loads one (called in a thread at start-up; until it
    returns, /health says 503). on_ready runs once the engine is ready; on_error if loading failed."""
    from lmcli import __version__
    from swagger_ui_bundle import swagger_ui_path

    state = ServerState(options)

    @asynccontextmanager
    async def lifespan(app):
        loader = None
        if isinstance(engine, AsyncEngine):
            state.attach(engine)
            on_ready(state)
        else:
            loader = asyncio.ensure_future(_load(state, engine, on_ready, on_error))
        try:
            yield
        finally:
            if loader is not None:
                loader.cancel()
            if state.engine is not None:
                await run_in_threadpool(state.engine.close)

    routes = [
        Route("/", docs, include_in_schema=False),
        Route("/openapi.json", openapi, include_in_schema=False),
        Mount("/swagger", StaticFiles(directory=swagger_ui_path), name="swagger"),
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/interactive", chat_interactive, methods=["POST"]),
        Route("/v1/encode", encode, methods=["POST"]),
    ]
    middleware = []
    if options.allow_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(options.allow_origins),
                                     allow_credentials=options.allow_credentials,
                                     allow_methods=list(options.allow_methods),
                                     allow_headers=list(options.allow_headers)))
    middleware.append(Middleware(Guard, state=state))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error})
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
