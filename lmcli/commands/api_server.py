"""`lm serve api_server WORKSPACE`: the OpenAI-compatible HTTP server on uvicorn."""

import os
import socket
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmcli.commands.options import (AllowCredentialsOption, AllowHeadersOption, AllowMethodsOption,
                                    AllowOriginsOption, ApiKeysOption, ChatTemplateOption, DType, DTypeOption,
                                    ModelNameOption, QuantizationOption, QuantPolicyOption, fail, split_keys)
from lmcli.serve.reasoning import REASONING_PARSERS
from lmcli.serve.tool_parsers import PARSERS

ToolCallParser = Enum("ToolCallParser", {name: name for name in PARSERS}, type=str)
ReasoningParser = Enum("ReasoningParser", {name: name for name in REASONING_PARSERS}, type=str)
NAME = "serve api_server"


class LogLevel(str, Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def api_server(
    workspace: Annotated[Path, typer.Argument(help="The workspace made by `lm convert`.", show_default=False)],
    server_name: Annotated[str, typer.Option(help="The address to listen on.")] = "0.0.0.0",
    server_port: Annotated[int, typer.Option(help="The port to listen on.")] = 23333,
    tp: Annotated[int, typer.Option(help="Tensor-parallel ranks (processes), over all --nnodes machines; on GPUs one "
                                         "GPU a rank, from --device's on (cuda:2 with --tp 2: cuda:2 and cuda:3).")
                  ] = 1,
    nnodes: Annotated[int, typer.Option(help="Machines the --tp ranks run on, --tp / --nnodes on each. Run this same "
                                             "command on every one, each with its --node-rank.")] = 1,
    node_rank: Annotated[int, typer.Option(help="This machine's place among --nnodes: 0 serves HTTP and holds rank 0; "
                                                "the others run their ranks' workers only.")] = 0,
    master_addr: Annotated[str, typer.Option(help="Node 0's address, as the other nodes reach it.")] = "127.0.0.1",
    master_port: Annotated[int, typer.Option(help="The port node 0 listens on for the other nodes' ranks (with "
                                                  "--nnodes above 1).")] = 29500,
    session_len: Annotated[Optional[int], typer.Option(
        help="Most tokens a sequence or session may hold (prompt and output). Default: the model's context.",
        show_default=False)] = None,
    max_batch_size: Annotated[int, typer.Option(help="Most sequences computed in one step.")] = 128,
    cache_max_entry_count: Annotated[float, typer.Option(
        help="Share of free memory for the KV cache (on CPU: of available RAM, at most 4 GiB).")] = 0.8,
    num_kv_blocks: Annotated[Optional[int], typer.Option(
        help="A KV cache of exactly this many blocks (a fixed footprint), instead of --cache-max-entry-count's "
             "share. A block holds one KV group's layers: all of them for most models, fewer where sliding-window "
             "layers keep tables of their own (Gemma 3).", show_default=False)] = None,
    cache_block_seq_len: Annotated[int, typer.Option(help="Tokens per KV cache block.")] = 64,
    max_prefill_token_num: Annotated[int, typer.Option(help="Most tokens computed in one step.")] = 2048,
    enable_prefix_caching: Annotated[bool, typer.Option(
        "--enable-prefix-caching/--disable-prefix-caching", help="Reuse the KV cache of prompts' shared "
        "beginnings.")] = True,
    dtype: DTypeOption = DType.auto,
    quantization: QuantizationOption = None,
    quant_policy: QuantPolicyOption = 0,
    device: Annotated[str, typer.Option(help="auto (cuda where torch sees an NVIDIA GPU, else cpu), cpu, cuda or "
                                             "cuda:N.")] = "auto",
    eager: Annotated[bool, typer.Option(help="On GPUs, run decode steps kernel by kernel instead of replaying CUDA "
                                             "graphs (one per batch size, captured at start).")] = False,
    model_name: ModelNameOption = None,
    chat_template: ChatTemplateOption = None,
    meta_instruction: Annotated[Optional[str], typer.Option(
        help="The system prompt of chats that send none.", show_default=False)] = None,
    tool_call_parser: Annotated[Optional[ToolCallParser], typer.Option(
        help="How the model writes tool calls: hermes (<tool_call>{json}</tool_call>: Hermes, Qwen, and what a "
             "model whose chat template has no tool format is taught) or llama3_json (Llama 3.1+'s JSON calls). "
             "Default: picked from the chat template.", show_default=False)] = None,
    reasoning_parser: Annotated[Optional[ReasoningParser], typer.Option(
        help="Put the model's reasoning in reasoning_content: think (a <think>...</think> block opening the answer: "
             "Qwen 3, QwQ) or deepseek_r1 (the answer starts in reasoning until </think>). Default: none, the "
             "reasoning stays in content.", show_default=False)] = None,
    api_keys: ApiKeysOption = None,
    allow_origins: AllowOriginsOption = None,
    allow_credentials: AllowCredentialsOption = False,
    allow_methods: AllowMethodsOption = None,
    allow_headers: AllowHeadersOption = None,
    ssl: Annotated[bool, typer.Option(help="Serve HTTPS with the key and certificate in the files named by "
                                           "SSL_KEYFILE and SSL_CERTFILE.")] = False,
    max_concurrent_requests: Annotated[int, typer.Option(
        min=0, help="Generation requests answered at once; more wait in a queue, before their body is read. 0: no "
        "limit.")] = 512,
    max_queue_len: Annotated[int, typer.Option(
        min=0, help="Requests that may wait for a place; beyond, 429 with Retry-After.")] = 512,
    queue_timeout: Annotated[float, typer.Option(
        min=0.0, help="Seconds a request may wait for a place; then 503 with Retry-After.")] = 60.0,
    max_output_len: Annotated[Optional[int], typer.Option(
        help="The most tokens one answer gets: requests that ask for more, or for nothing (max_tokens, "
             "request_output_len), stop there with finish_reason length. Default: what the context holds.",
        show_default=False)] = None,
    request_timeout: Annotated[float, typer.Option(
        min=0.0, help="Seconds a generation request may take, from its arrival (queued time included); then it "
        "ends (a stream with an error event request_timeout and [DONE], a plain request with 504) and its KV cache "
        "is freed. 0: no limit.")] = 600.0,
    session_ttl: Annotated[float, typer.Option(
        min=0.0, help="Seconds an interactive session may stay idle; then it is ended (history and KV cache freed) "
        "and its next turn gets 410 session_expired. 0: kept for ever.")] = 3600.0,
    max_sessions: Annotated[int, typer.Option(
        min=0, help="Interactive sessions kept at once; a new one past it ends the least recently used idle one "
        "(its next turn: 410). 0: no cap.")] = 1024,
    shutdown_timeout: Annotated[float, typer.Option(
        min=0.0, help="On SIGTERM or Ctrl-C: seconds for the requests in flight to finish (no new ones are taken; "
        "/health says 503); then each still running ends with an error event and the server exits 0. 0: at "
        "once.")] = 30.0,
    log_level: Annotated[LogLevel, typer.Option(help="Server log level; info logs every request.")] = LogLevel.warning,
    proxy_url: Annotated[Optional[str], typer.Option(
        help="Register with this `lm serve proxy` once the model is loaded; leave it on shutdown.",
        show_default=False)] = None,
) -> None:
    """Serve a workspace over an OpenAI-compatible HTTP API (and LMDeploy's /v1/chat/interactive).

    Open the printed URL in a browser for the API docs."""
    from lmcli.engine.config import ParallelConfig, resolve_device, weights_format
    from lmcli.errors import UserError
    from lmcli.workspace import Workspace

    try:
        cpu_only = "--quantization" if quantization else "--quant-policy 8" if quant_policy == 8 else ""
        device = resolve_device(device, cpu_only)
        ws = Workspace.load(workspace)
        weights = weights_format(quantization and quantization.value, ws.quantization, device)
        template = None
        if chat_template:
            from lmcli.convert import read_chat_template

            template = read_chat_template(chat_template)
        parallel = ParallelConfig(tp=tp, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
                                  master_port=master_port)
    except UserError as e:
        raise fail(NAME, str(e))
    if node_rank > 0:  # no HTTP here: this node's ranks, until node 0 ends them
        from lmcli.engine.distributed import run_node

        first, last = node_rank * parallel.local_ranks, (node_rank + 1) * parallel.local_ranks - 1
        print(f"lm api_server: node {node_rank} of {nnodes}: tensor-parallel ranks {first}..{last} of {tp}, for "
              f"node 0 at {master_addr}:{master_port}", file=sys.stderr, flush=True)
        raise typer.Exit(run_node(parallel, str(ws.path)))
    if not 0 < server_port < 65536:
        raise fail(NAME, f"--server-port must be in 1..65535, not {server_port}")
    if max_concurrent_requests is not None and max_concurrent_requests < 1:
        raise fail(NAME, "--max-concurrent-requests must be at least 1")
    if max_output_len is not None and max_output_len < 1:
        raise fail(NAME, "--max-output-len must be at least 1")
    ssl_files = {}
    if ssl:
        for env, key in (("SSL_KEYFILE", "ssl_keyfile"), ("SSL_CERTFILE", "ssl_certfile")):
            path = os.environ.get(env)
            if not path or not os.path.isfile(path):
                raise fail(NAME, f"--ssl needs {env} to name a file" + (f" ({path!r} is not one)" if path else ""))
            ssl_files[key] = path
    try:
        with socket.create_server((server_name, server_port)):  # a clear line now, not a log line later
            pass
    except OSError as e:
        raise fail(NAME, f"cannot listen on {server_name}:{server_port}: {e.strerror or e}")

    import uvicorn

    from lmcli.engine.async_engine import AsyncEngine
    from lmcli.serve.api_server import create_app
    from lmcli.serve.state import ServerOptions

    options = ServerOptions(model_name=model_name, chat_template=template, meta_instruction=meta_instruction,
                            tool_call_parser=tool_call_parser and tool_call_parser.value,
                            reasoning_parser=reasoning_parser and reasoning_parser.value,
                            api_keys=split_keys(api_keys), max_concurrent_requests=max_concurrent_requests or None,
                            max_queue_len=max_queue_len, queue_timeout=queue_timeout,
                            max_output_len=max_output_len, session_ttl=session_ttl, max_sessions=max_sessions,
                            request_timeout=request_timeout,
                            allow_origins=tuple(allow_origins or ()), allow_credentials=allow_credentials,
                            allow_methods=tuple(allow_methods or ("*",)), allow_headers=tuple(allow_headers or ("*",)))
    scheme = "https" if ssl else "http"
    shown = "127.0.0.1" if server_name in ("0.0.0.0", "::") else server_name
    url = f"{scheme}://{shown}:{server_port}"
    failed = []

    def load() -> AsyncEngine:
        return AsyncEngine.from_workspace(
            ws.path, dtype=dtype.value, device=device, tp=tp, session_len=session_len,
            quantization=quantization.value if quantization else None, quant_policy=quant_policy,
            cache_block_seq_len=cache_block_seq_len, cache_max_entry_count=cache_max_entry_count,
            num_blocks=num_kv_blocks, max_batch_size=max_batch_size, max_prefill_token_num=max_prefill_token_num,
            enable_prefix_caching=enable_prefix_caching, eager=eager, nnodes=nnodes, master_addr=master_addr,
            master_port=master_port if nnodes > 1 else 0)  # one node: any free port on loopback

    def on_ready(state) -> None:
        print(f"lm api_server: {state.model_name} is ready at {url} (open it in a browser for the API docs)",
              file=sys.stderr, flush=True)
        if proxy_url:  # in a thread: the event loop keeps serving
            threading.Thread(target=register, args=(proxy_url, url), daemon=True).start()

    def on_error(message: str) -> None:
        failed.append(message)
        server.should_exit = True

    app = create_app(load, options, on_ready, on_error)
    print(f"lm api_server: loading {ws.model_name} from {ws.path}; serving at {url}", file=sys.stderr, flush=True)
    if device != "cpu" and log_level in (LogLevel.info, LogLevel.debug):
        import torch

        steps = "kernel by kernel" + (" (--eager)" if eager else " (CUDA graphs need one GPU)") \
            if eager or tp > 1 else "replayed from CUDA graphs"
        print(f"lm api_server: {torch.cuda.get_device_name(device)}: Triton kernels, decode steps {steps}",
              file=sys.stderr, flush=True)
    if device == "cpu" and log_level in (LogLevel.info, LogLevel.debug):
        from lmcli.kernels import native

        from lmcli.engine.config import describe_formats

        print(f"lm api_server: {native.describe()}", file=sys.stderr, flush=True)
        compute = ws.dtype if dtype is DType.auto else dtype.value
        compute = "float32" if compute == "float16" else compute  # float16 runs as float32 on CPUs
        line = describe_formats(compute, weights, quant_policy, from_workspace=bool(ws.quantization))
        print(f"lm api_server: {line}", file=sys.stderr, flush=True)
    from lmcli.serve.drain import DrainingServer

    config = uvicorn.Config(app, host=server_name, port=server_port, log_level=log_level.value,
                            access_log=log_level in (LogLevel.info, LogLevel.debug), **ssl_files)
    server = DrainingServer(config, app.state.server, shutdown_timeout)
    try:
        server.run()
    finally:
        if proxy_url:
            deregister(proxy_url, url)
    if failed:
        raise fail(NAME, failed[0])


def register(proxy_url: str, url: str) -> None:
    """Tell an `lm serve proxy` about this server (POST /nodes/add), as LMDeploy's api_server does."""
    import httpx

    try:
        httpx.post(proxy_url.rstrip("/") + "/nodes/add", json={"url": url}, timeout=10).raise_for_status()
        print(f"lm api_server: registered {url} with the proxy at {proxy_url}", file=sys.stderr, flush=True)
    except httpx.HTTPError as e:
        print(f"lm api_server: warning: could not register with the proxy at {proxy_url}: {e}", file=sys.stderr,
              flush=True)


def deregister(proxy_url: str, url: str) -> None:
    """Leave the proxy's node table on shutdown (POST /nodes/remove), so that it stops sending requests here."""
    import httpx

    try:
        httpx.post(proxy_url.rstrip("/") + "/nodes/remove", json={"url": url}, timeout=5)
    except httpx.HTTPError:
        pass  # the proxy is gone too, or never knew us: its health probes notice this server is down either way

