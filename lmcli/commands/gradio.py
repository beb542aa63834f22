from typing import Annotated

import typer

from lmcli.commands.options import fail


def gradio(
    url: Annotated[str, typer.Argument(help="The api_server's URL, e.g. http://127.0.0.1:23333.", show_default=False)],
) -> None:
    """A web chat UI that talks to an api_server."""
    raise fail("serve gradio", "not implemented yet: the web UI lands with its own issue")
