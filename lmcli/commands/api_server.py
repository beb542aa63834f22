from typing import Annotated

import typer

from lmcli.commands.options import fail


def api_server(
    workspace: Annotated[str, typer.Argument(help="The workspace made by `lm convert`.", show_default=False)],
) -> None:
    """Serve a workspace over an OpenAI-compatible HTTP API."""
    raise fail("serve api_server", "not implemented yet: the server lands with the issue 'engine-backed api_server'")
