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
import math
import random
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Optional

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lmcli.serve import web
from lmcli.serve.errors import APIError
from lmcli import __version__
from lmcli.serve.metrics import CONTENT_TYPE
from lmcli.serve.openapi import proxy_openapi
from lmcli.serve.nodes import DOWN, Node, Nodes, prefix_keys
from lmcli.serve.proxy_metrics import ProxyMetrics

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
    max_queue: int = 256  # requests that may wait for a node with room (Nodes.limit); more get 429
    queue_timeout: float = 60.0  # seconds one may wait; then 503
    session_timeout: float = 86400.0  # seconds a session's node is remembered after its last turn
    allow_origins: tuple = ()
    allow_credentials: bool = False
    allow_methods: tuple = ("*",)
    allow_headers: tuple = ("*",)


class Proxy:
    def __init__(self, nodes: Nodes, options: ProxyOptions):
        self.nodes, self.options = nodes, options
        self.client: Optional[aiohttp.ClientSession] = None
        self.sessions: dict[int, tuple] = {}  # interactive session id -> (its node's URL, when last used)
        self.lost: dict[int, tuple] = {}  # the same, for sessions whose node restarted since
        self.queued = 0  # requests waiting for a node with room
        self.waiters: list = []  # futures of queued requests, set when a node may have room
        self.metrics = ProxyMetrics(self)

    def headers(self, request: Optional[Request] = None) -> dict:
        out = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS} if request else {}
        if self.options.node_api_key:
            out["authorization"] = f"Bearer {self.options.node_api_key}"
        return out

    async def probe(self, node: Node) -> bool:
        """/health, and the node's models when it has none yet; the outcome moves the node's state."""
        try:
            timeout = aiohttp.ClientTimeout(total=self.options.probe_timeout)
            async with self.client.get(node.url + "/health", headers=self.headers(), timeout=timeout) as r:
                ok = r.status == 200
                instance = _instance(await r.read()) if ok else None
            if ok and instance != node.instance:
                self.restarted(node, instance)
            if ok and not node.models:
                async with self.client.get(node.url + "/v1/models", headers=self.headers(), timeout=timeout) as r:
                    node.models = [m["id"] for m in (await r.json())["data"]]
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError):
            ok = False
        (self.nodes.succeeded if ok else self.nodes.failed)(node)
        return ok

    def restarted(self, node: Node, instance: Optional[str]) -> None:
        """The node answers as another process than before: the sessions it held are gone, and the next turn of
        each says so (410); its models are asked again."""
        if node.instance is not None:
            for session in [s for s, (url, _) in self.sessions.items() if url == node.url]:
                self.lost[session] = self.sessions.pop(session)
            node.models = []
        node.instance = instance

    async def watch(self) -> None:
        while True:
            await asyncio.gather(*(self.probe(n) for n in list(self.nodes.nodes.values())))
            idle = time.monotonic() - self.options.session_timeout
            for table in (self.sessions, self.lost):
                for session in [s for s, (_, used) in table.items() if used < idle]:
                    del table[session]
            self.wake()  # a node may be back, or a circuit closed
            await asyncio.sleep(self.options.health_interval)

    def wake(self) -> None:
        """A place may have come free (an answer ended, a probe round passed): every waiting request looks again."""
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def forward(self, request: Request, path: str) -> Response:
        body = await request.body()
        try:
            fields = json.loads(body or b"{}")
        except ValueError:
            raise APIError(400, "the body is not JSON") from None
        if not isinstance(fields, dict):
            raise APIError(400, "the body must be a JSON object")
        model = fields.get("model") if path != "/v1/chat/interactive" else None
        session = None
        if path == "/v1/chat/interactive":
            session = fields.get("session_id", -1)
            if session == -1 and fields.get("interactive_mode") is True:  # a new session: named here, so that
                session = fields["session_id"] = random.randrange(1 << 30, 1 << 31)  # its next turn finds it
                body = json.dumps(fields).encode()
            session = None if session == -1 else session
        keys = prefix_keys(prompt_text(fields)) if self.nodes.strategy == "prefix_aware" else []
        owner = self.owner(session)
        attempts = 1 if owner else self.options.retries + 1  # elsewhere, a session's history would be lost
        tried, delay = [], self.options.backoff
        for attempt in range(attempts):
            node = await self.place(model, owner, keys, tried)  # its place taken (dispatched)
            if node is None:
                break
            if await request.is_disconnected():  # gone while queued: nothing to send
                self.nodes.released(node)
                self.wake()
                return Response(status_code=499)
            start = time.perf_counter()
            try:
                upstream = await self.client.post(node.url + path, data=body, headers=self.headers(request))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                upstream = None
            except BaseException:  # cancelled: the place is free again
                self.nodes.released(node)
                self.wake()
                raise
            failed = upstream is None or upstream.status == 429 or upstream.status >= 500
            if not failed or (upstream is not None and attempt == attempts - 1):  # the last try: its answer as it is
                return self.relay(upstream, node, session, fields, start)
            if upstream is not None:
                upstream.close()
            self.nodes.finished(node, ok=False)
            self.wake()
            tried.append(node.url)
            if attempt < attempts - 1:
                self.metrics.retries.inc()
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay *= 2
        self.metrics.refused.labels("no_node").inc()
        if owner is not None:
            raise APIError(503, f"the node holding session {session} ({owner}) does not answer now; the history stays "
                           "there: send the turn again later", "session_id", "session_node_unavailable",
                           {"Retry-After": str(max(1, math.ceil(self.nodes.open_for)))})
        if model is not None and model not in self.nodes.models():
            raise APIError(404, f"no node serves the model {model!r}; /v1/models lists those that are served",
                           "model", code="model_not_found")
        raise APIError(503, "no node can take the request now (every node is down, or failed it)")

    def owner(self, session) -> Optional[str]:
        """The URL of the node holding this session's history, if the proxy placed it. A session whose node is gone,
        down or restarted fails with 410 (its history is lost; the proxy forgets it, so the next turn starts
        afresh)."""
        if session in self.lost:
            url = self.lost.pop(session)[0]
            raise APIError(410, f"session {session} lived on {url}, which restarted: its history is lost. Send the "
                           "turn again to start the session afresh (put the history in the prompt if the answer needs "
                           "it)", "session_id", "session_lost")
        if session is None or session not in self.sessions:
            return None
        url = self.sessions[session][0]
        node = self.nodes.nodes.get(url)
        if node is None or node.state == DOWN:
            del self.sessions[session]
            raise APIError(410, f"session {session} lived on {url}, which is {'gone' if node is None else 'down'}: "
                           "its history is lost. Send the turn again to start the session afresh on another node "
                           "(put the history in the prompt if the answer needs it)", "session_id", "session_lost")
        return url

    def claim(self, model, owner, keys, tried) -> Optional[Node]:
        """A node with room for the request, its place taken at once (no await between the choice and the count,
        so two requests never take one place)."""
        if owner is None:
            node = self.nodes.pick(model, tuple(tried), keys)
        else:
            node = self.nodes.nodes.get(owner)
            usable = node is not None and any(n is node for n in self.nodes.usable())
            node = node if usable and self.nodes.has_room(node) else None
        if node is not None:
            self.nodes.dispatched(node)
        return node

    def could_take(self, model, owner, tried) -> bool:
        """Whether some node could take the request once it has room (else waiting is pointless)."""
        if owner is not None:
            return any(n.url == owner for n in self.nodes.usable())
        return bool(self.nodes.usable(model, tuple(tried)))

    async def place(self, model, owner, keys, tried) -> Optional[Node]:
        """A node for the request, its place taken; while every node that could take it is at its limit, the request
        waits in a bounded queue, first come first served: past max_queue waiting, 429 with Retry-After; past
        queue_timeout, 503. None: no node can take it."""
        if not self.queued or self.queued >= self.options.max_queue:  # nobody waits before it, or no room to wait
            node = self.claim(model, owner, keys, tried)
            if node is not None or not self.could_take(model, owner, tried):
                return node
        if self.queued >= self.options.max_queue:
            self.metrics.refused.labels("queue_full").inc()
            raise APIError(429, f"every node is at its limit of {self.nodes.limit} requests and {self.queued} "
                           "requests are waiting: try again shortly", headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.queue_timeout
        self.queued += 1
        try:
            while True:
                node = self.claim(model, owner, keys, tried)
                if node is not None or not self.could_take(model, owner, tried):
                    return node
                left = deadline - loop.time()
                if left <= 0:
                    self.metrics.refused.labels("queue_timeout").inc()
                    raise APIError(503, f"no node had room within {self.options.queue_timeout:g} s",
                                   headers={"Retry-After": "1"})
                waiter = loop.create_future()
                self.waiters.append(waiter)
                try:
                    await asyncio.wait_for(waiter, left)
                except asyncio.TimeoutError:
                    pass
        finally:
            self.queued -= 1

    def relay(self, upstream: aiohttp.ClientResponse, node: Node, session, fields: dict, start: float) -> Response:
        if session is not None and upstream.status < 400 and not fields.get("cancel"):
            if fields.get("interactive_mode") is True:
                self.sessions[session] = (node.url, time.monotonic())
            else:  # the session ends on its node with this turn: nothing left to stick to
                self.sessions.pop(session, None)
        self.metrics.first_byte.labels(node.url).observe(time.perf_counter() - start)

        broken = []

        async def body():
            try:
                async for chunk in upstream.content.iter_any():
                    yield chunk
            except (aiohttp.ClientError, asyncio.TimeoutError):
                broken.append(True)  # the node broke off mid-answer
                raise

        def done():  # once the answer ended, the client left, or the stream broke; never awaits
            if upstream.content.at_eof():
                upstream.release()  # the connection goes back to the pool
            else:
                upstream.close()  # the client left mid-answer: the node sees its request closed and stops
            self.nodes.finished(node, upstream.status < 500 and upstream.status != 429 and not broken)
            self.metrics.latency.labels(node.url).observe(time.perf_counter() - start)
            self.wake()

        headers = {k: v for k, v in upstream.headers.items()
                   if k.lower() in ("content-type", "content-encoding", "retry-after")}
        return Relay(body(), done, status_code=upstream.status, headers=headers)


class Relay(StreamingResponse):
    """A node's answer as it streams; `done` runs however the response ends (Starlette runs no background task
    when the stream raises, and a generator cancelled before its first chunk never reaches its finally)."""

    def __init__(self, content, done, **kwargs):
        super().__init__(content, **kwargs)
        self.done = done

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.done()


def _instance(health: bytes) -> Optional[str]:
    """The process id in an lm api_server's /health; None from other servers (vLLM's /health is empty)."""
    try:
        found = json.loads(health).get("instance")
    except (ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


def prompt_text(fields: dict) -> str:
    """The part of a request that its node's prefix cache keys on, as text: the messages (role and content) or
    the prompt, in order."""
    messages = fields.get("messages")
    if isinstance(messages, list):
        return "".join(f"{m.get('role')}\n{_text(m.get('content'))}\n" for m in messages if isinstance(m, dict))
    return _text(fields.get("prompt", fields.get("input")))


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def create_proxy(nodes: Nodes, options: ProxyOptions = ProxyOptions()) -> Starlette:
    proxy = Proxy(nodes, options)

    @asynccontextmanager
    async def lifespan(app):
        # aiohttp, not httpx: its C parser and pool cost a third of httpx's CPU per request (docs/benchmarks.md)
        proxy.client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60), auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0))
        watcher = asyncio.ensure_future(proxy.watch())
        try:
            yield
        finally:
            watcher.cancel()
            await proxy.client.close()

    async def health(request: Request) -> JSONResponse:
        usable = sum(n.state != DOWN for n in nodes.nodes.values())
        if usable:
            return JSONResponse({"status": "ok", "nodes": usable})
        return JSONResponse({"status": "error", "message": "no node is up"}, 503)

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "lm"}
                                                        for m in nodes.models()]})

    async def status(request: Request) -> JSONResponse:
        return JSONResponse({"nodes": nodes.status(), "queued": proxy.queued, "sessions": len(proxy.sessions)})

    async def metrics(request: Request) -> Response:
        return Response(proxy.metrics.render(), media_type=CONTENT_TYPE)

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

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(proxy_openapi(__version__))

    routes = [*web.docs_routes("lm proxy", Route("/openapi.json", openapi, include_in_schema=False)),
              Route("/health", health), Route("/metrics", metrics), Route("/v1/models", models),
              Route("/nodes/status", status),
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
