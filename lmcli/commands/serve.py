"""`lm serve`: its subcommands come from the entry-point group "lmcli.serve"."""

import typer

from lmcli.plugins import mount

SERVE_GROUP = "lmcli.serve"

app = typer.Typer(help="Serve a workspace over HTTP, and the clients that talk to it.", no_args_is_help=True,
                  context_settings={"help_option_names": ["-h", "--help"]})
mount(app, SERVE_GROUP)
