"""`lm serve proxy`: one address in front of several api_servers (lmcli/serve/proxy.py)."""

import socket
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmcli.commands.api_server import LogLevel
from lmcli.commands.options import (AllowCredentialsOption, AllowHeadersOption, AllowMethodsOption,
                                    AllowOriginsOption, ApiKeysOption, fail, split_keys)

NAME = "serve proxy"


class Strategy(str, Enum):
    least_outstanding = "least_outstanding"
    random = "random"
    round_robin = "round_robin"
    prefix_aware = "prefix_aware"


def proxy(
    server_name: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    server_port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    routing_strategy: Annotated[Strategy, typer.Option(
        help="Which node takes a request: the one answering the fewest requests (ties at random), random, in "
             "turn, or prefix_aware: the node that last got the prompt's start (its prefix cache holds it) unless "
             "it is 8 requests busier than the least loaded.")] = Strategy.least_outstanding,
    node: Annotated[Optional[list[str]], typer.Option(
        "--node", help="An api_server's URL to start with (repeat). Servers started with --proxy-url add "
        "themselves; /nodes/add and /nodes/remove change the table while running.", show_default=False)] = None,
    config: Annotated[Optional[Path], typer.Option(
        help="A JSON file that keeps the node table across restarts (read at start, written on every change). "
             "Default: none, the table lives in memory.", show_default=False)] = None,
    api_keys: ApiKeysOption = None,
    allow_origins: AllowOriginsOption = None,
    allow_credentials: AllowCredentialsOption = False,
    allow_methods: AllowMethodsOption = None,
    allow_headers: AllowHeadersOption = None,
    node_api_key: Annotated[Optional[str], typer.Option(
        help="The key to send to the nodes, if they were started with --api-keys.", show_default=False)] = None,
    max_outstanding: Annotated[int, typer.Option(
        min=0, help="Requests one node answers at once; beyond, requests wait in the proxy's queue. 0: no limit "
        "(no queue).")] = 256,
    max_queue_len: Annotated[int, typer.Option(
        min=0, help="Requests that may wait for a node with room; beyond, 429 with Retry-After.")] = 256,
    queue_timeout: Annotated[float, typer.Option(
        min=0.0, help="Seconds a request may wait in the queue; then 503.")] = 60.0,
    session_timeout: Annotated[float, typer.Option(
        min=0.0, help="Seconds after its last turn that an interactive session stays bound to its node.")] = 86400.0,
    log_level: Annotated[LogLevel, typer.Option(help="Log level.")] = LogLevel.warning,
) -> None:
    """Spread requests over several api_servers: one address, the same API (sessions stay on their node)."""
    try:
        with socket.create_server((server_name, server_port)):
            pass
    except OSError as e:
        raise fail(NAME, f"cannot listen on {server_name}:{server_port}: {e.strerror or e}")
    import uvicorn

    from lmcli.serve.nodes import Nodes
    from lmcli.serve.proxy import ProxyOptions, create_proxy

    nodes = Nodes(routing_strategy.value, path=config, limit=max_outstanding)
    for url in node or ():
        if not url.startswith(("http://", "https://")):
            raise fail(NAME, f"--node {url}: give the api_server's URL, e.g. http://127.0.0.1:23333")
        nodes.add(url)
    app = create_proxy(nodes, ProxyOptions(
        api_keys=split_keys(api_keys), node_api_key=node_api_key, max_queue=max_queue_len, queue_timeout=queue_timeout,
        session_timeout=session_timeout, allow_origins=tuple(allow_origins or ()), allow_credentials=allow_credentials,
        allow_methods=tuple(allow_methods or ("*",)), allow_headers=tuple(allow_headers or ("*",))))
    shown = "127.0.0.1" if server_name in ("0.0.0.0", "::") else server_name
    print(f"lm proxy: serving at http://{shown}:{server_port} in front of {len(nodes.nodes)} node(s)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=server_name, port=server_port, log_level=log_level.value,
                access_log=log_level in (LogLevel.info, LogLevel.debug))
