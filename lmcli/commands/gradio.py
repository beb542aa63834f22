"""`lm serve gradio URL`: a web chat page for an api_server."""

import os
import sys
from typing import Annotated, Optional

import typer

from lmcli.commands.options import fail

NAME = "serve gradio"


def gradio(
    url: Annotated[str, typer.Argument(help="The api_server's URL, e.g. http://127.0.0.1:23333.", show_default=False)],
    server_name: Annotated[str, typer.Option(help="The address the web page listens on.")] = "0.0.0.0",
    server_port: Annotated[int, typer.Option(help="The web page's port.")] = 6006,
    share: Annotated[bool, typer.Option(help="Also publish the page through a gradio.live link (needs the "
                                              "internet).")] = False,
    api_key: Annotated[Optional[str], typer.Option(help="The api_server's API key, if it needs one.",
                                                   envvar="LM_API_KEY", show_default=False)] = None,
) -> None:
    """A web chat page (Gradio) that talks to an api_server: streamed answers, Stop, Regenerate, Reset."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    from lmcli.serve.api_client import APIClient, APIClientError

    try:
        APIClient(url, api_key=api_key).available_models
    except APIClientError as e:
        raise fail(NAME, f"{url} refused the API key: pass --api-key" if e.status == 401 else str(e.message))
    from lmcli.serve.gradio_app import build

    demo, theme = build(url, api_key)
    shown = "127.0.0.1" if server_name in ("0.0.0.0", "::") else server_name
    print(f"lm gradio: open http://{shown}:{server_port} (talking to {url})", file=sys.stderr, flush=True)
    try:
        demo.queue(default_concurrency_limit=None).launch(  # tabs answer at once; the server batches
            server_name=server_name, server_port=server_port, share=share, theme=theme, quiet=True, footer_links=[],
            show_error=True)
    except OSError as e:
        raise fail(NAME, f"cannot listen on {server_name}:{server_port}: {e}")
