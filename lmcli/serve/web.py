"""What every HTTP app of lm shares (the api_server's, and the proxy's): API keys on /v1/ paths, CORS, errors as
OpenAI bodies with their real status, and the Swagger UI served from the package (offline)."""

import hmac
import logging
from typing import Optional

from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from lmcli.serve.errors import APIError

log = logging.getLogger("lmcli.serve")


class Guard:
    """API keys (Bearer tokens, compared in constant time) for /v1/ paths; /health, /metrics and the docs stay
    open. No keys: everything open."""

    def __init__(self, app, keys: tuple = ()):
        self.app = app
        self.keys = [k.encode() for k in keys]

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


def middleware(options) -> list:
    """CORS where options allow origins (allow_origins, allow_credentials, allow_methods, allow_headers), then the
    key guard (options.api_keys)."""
    parts = []
    if options.allow_origins:
        parts.append(Middleware(CORSMiddleware, allow_origins=list(options.allow_origins),
                                allow_credentials=options.allow_credentials, allow_methods=list(options.allow_methods),
                                allow_headers=list(options.allow_headers)))
    parts.append(Middleware(Guard, keys=tuple(options.api_keys)))
    return parts


async def api_error(request: Request, e: APIError) -> Response:
    return e.response()


async def http_error(request: Request, e: HTTPException) -> Response:
    return APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None,
                    headers=e.headers).response()  # 405: Allow


async def server_error(request: Request, e: Exception) -> Response:
    log.exception("error answering %s", request.url.path)
    return APIError(500, f"internal error: {type(e).__name__}: {e}").response()


EXCEPTION_HANDLERS = {APIError: api_error, HTTPException: http_error, Exception: server_error}

SWAGGER_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<link rel="stylesheet" href="/swagger/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/swagger/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui"}});</script>
</body></html>"""


def docs_routes(title: str, openapi: Optional[Route] = None) -> list:
    """The Swagger UI at / (its files from the swagger-ui-bundle package) reading /openapi.json."""
    from swagger_ui_bundle import swagger_ui_path

    page = SWAGGER_PAGE.format(title=title)

    async def docs(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    return [Route("/", docs, include_in_schema=False), *([openapi] if openapi else []),
            Mount("/swagger", StaticFiles(directory=swagger_ui_path), name="swagger")]
