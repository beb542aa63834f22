"""`lm serve proxy`: one address in front of several api_servers (issue: `lm serve proxy`).

Requests to /v1/chat/completions, /v1/completions, /v1/chat/interactive and /v1/encode go to a node picked by the
node table (serve/nodes.py: the routing strategy, health states, circuits) among those serving the request's
model, over one pooled HTTP client; the answer streams back chunk by chunk as the node sends it. Before the first
byte, a connection error, a 429 or a 5xx is retried on another node, with exponential backoff and jitter; after
it, the client gets what the node sent. A client that disconnects closes the upstream request at once (the node
frees its KV blocks). An interactive session (`session_id`) sticks to the node that holds its history until the
session ends or that node is down. Nodes register themselves (`lm serve api_server --proxy-url`) or are added by
hand (/nodes/add, /nodes/remove, /nodes/status); each is probed on /health."""

import asyncio
import json
import random
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Optional

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lmcli.serve import web
from lmcli.serve.errors import APIError
from lmcli.serve.nodes import DOWN, Node, Nodes

FORWARDED = ("/v1/chat/completions", "/v1/completions", "/v1/chat/interactive", "/v1/encode")
HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "authorization"}


@dataclass(frozen=True)
class ProxyOptions:
    api_keys: tuple = ()  # the proxy's own keys; nodes are called without them
    node_api_key: Optional[str] = None  # sent to the nodes as a Bearer token, if they want one
    retries: int = 2  # other nodes tried before the first byte
    backoff: float = 0.1  # seconds before the first retry, doubled each time, with jitter
    health_interval: float = 5.0  # seconds between probes of each node
    probe_timeout: float = 3.0
    allow_origins: tuple = ()
    allow_credentials: bool = False
    allow_methods: tuple = ("*",)
    allow_headers: tuple = ("*",)


class Proxy:
    def __init__(self, nodes: Nodes, options: ProxyOptions):
        self.nodes, self.options = nodes, options
        self.client: Optional[httpx.AsyncClient] = None
        self.sessions: dict[int, str] = {}  # interactive session id -> the node holding its history

    def headers(self, request: Optional[Request] = None) -> dict:
        out = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS} if request else {}
        if self.options.node_api_key:
            out["authorization"] = f"Bearer {self.options.node_api_key}"
        return out

    async def probe(self, node: Node) -> bool:
        """/health, and the node's models when it has none yet; the outcome moves the node's state."""
        try:
            r = await self.client.get(node.url + "/health", headers=self.headers(), timeout=self.options.probe_timeout)
            ok = r.status_code == 200
            if ok and not node.models:
                models = await self.client.get(node.url + "/v1/models", headers=self.headers(),
                                               timeout=self.options.probe_timeout)
                node.models = [m["id"] for m in models.json()["data"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            ok = False
        (self.nodes.succeeded if ok else self.nodes.failed)(node)
        return ok

    async def watch(self) -> None:
        while True:
            await asyncio.gather(*(self.probe(n) for n in list(self.nodes.nodes.values())))
            await asyncio.sleep(self.options.health_interval)

    async def forward(self, request: Request, path: str) -> Response:
        body = await request.body()
        try:
            fields = json.loads(body or b"{}")
        except ValueError:
            raise APIError(400, "the body is not JSON") from None
        if not isinstance(fields, dict):
            raise APIError(400, "the body must be a JSON object")
        model = fields.get("model") if path != "/v1/chat/interactive" else None
        session = fields.get("session_id") if path == "/v1/chat/interactive" else None
        keep = bool(fields.get("interactive_mode"))  # false: this turn ends the session
        tried, delay = [], self.options.backoff
        for attempt in range(self.options.retries + 1):
            node = self.pick(model, session, tried)
            if node is None:
                break
            self.nodes.dispatched(node)
            try:
                upstream = await self.client.send(self.client.build_request(
                    "POST", node.url + path, content=body, headers=self.headers(request)), stream=True)
            except httpx.HTTPError:
                upstream = None
            if upstream is not None and not (upstream.status_code == 429 or upstream.status_code >= 500):
                return self.relay(upstream, node, session, keep)
            if upstream is not None and attempt == self.options.retries:  # the last try: its answer, as it is
                return self.relay(upstream, node, session, keep)
            if upstream is not None:
                await upstream.aclose()
            self.nodes.finished(node, ok=False)
            tried.append(node.url)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay *= 2
        if model is not None and model not in self.nodes.models():
            raise APIError(404, f"no node serves the model {model!r}; /v1/models lists those that are served",
                           "model", code="model_not_found")
        raise APIError(503, "no node can take the request now (every node is down, or failed it)")

    def pick(self, model, session, tried) -> Optional[Node]:
        owner = self.nodes.nodes.get(self.sessions.get(session, "")) if session is not None else None
        if owner is not None and owner.state != DOWN and owner.url not in tried:
            return owner
        return self.nodes.pick(model, exclude=tuple(tried))

    def relay(self, upstream: httpx.Response, node: Node, session, keep: bool) -> Response:
        if session is not None and keep:
            self.sessions[session] = node.url
        elif session is not None:  # the session ends on its node with this turn: nothing left to stick to
            self.sessions.pop(session, None)
        ok = upstream.status_code < 500 and upstream.status_code != 429

        async def close():
            await upstream.aclose()
            self.nodes.finished(node, ok)

        headers = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "retry-after")}
        return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code, headers=headers,
                                 background=BackgroundTask(close))


def create_proxy(nodes: Nodes, options: ProxyOptions = ProxyOptions()) -> Starlette:
    proxy = Proxy(nodes, options)

    @asynccontextmanager
    async def lifespan(app):
        proxy.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0),
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        watcher = asyncio.ensure_future(proxy.watch())
        try:
            yield
        finally:
            watcher.cancel()
            await proxy.client.aclose()

    async def health(request: Request) -> JSONResponse:
        usable = sum(n.state != DOWN for n in nodes.nodes.values())
        if usable:
            return JSONResponse({"status": "ok", "nodes": usable})
        return JSONResponse({"status": "error", "message": "no node is up"}, 503)

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "lm"}
                                                        for m in nodes.models()]})

    async def status(request: Request) -> JSONResponse:
        return JSONResponse({"nodes": nodes.status()})

    async def add(request: Request) -> JSONResponse:
        url = await _node_url(request)
        node = nodes.add(url)
        if not await proxy.probe(node):
            nodes.remove(url)
            raise APIError(400, f"{url} does not answer /health with 200: not added", "url")
        return JSONResponse(node.status())

    async def remove(request: Request) -> JSONResponse:
        url = await _node_url(request)
        if not nodes.remove(url):
            raise APIError(404, f"no node {url}", "url")
        return JSONResponse({"removed": url})

    def forward(path):
        async def route(request: Request) -> Response:
            return await proxy.forward(request, path)
        return route

    routes = [Route("/health", health), Route("/v1/models", models), Route("/nodes/status", status),
              Route("/nodes/add", add, methods=["POST"]), Route("/nodes/remove", remove, methods=["POST"]),
              *(Route(path, forward(path), methods=["POST"]) for path in FORWARDED)]
    app = Starlette(routes=routes, middleware=web.middleware(options), lifespan=lifespan,
                    exception_handlers=web.EXCEPTION_HANDLERS)
    app.state.proxy = proxy
    return app


async def _node_url(request: Request) -> str:
    """A node's URL from the body ({"url": ...}, as `lm serve api_server --proxy-url` sends) or, as LMDeploy's
    proxy takes it, the query (?node_url=...)."""
    url = request.query_params.get("node_url")
    if url is None:
        try:
            url = (json.loads(await request.body() or b"{}") or {}).get("url")
        except (ValueError, AttributeError):
            url = None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise APIError(400, "send the node's URL: {\"url\": \"http://host:port\"} or ?node_url=...", "url")
    return url.rstrip("/")
