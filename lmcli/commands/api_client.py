from typing import Annotated

import typer

from lmcli.commands.options import fail


def api_client(
    url: Annotated[str, typer.Argument(help="The api_server's URL, e.g. http://127.0.0.1:23333.", show_default=False)],
) -> None:
    """Chat with an api_server in the terminal."""
    raise fail("serve api_client", "not implemented yet: the terminal chat lands with its own issue")
