"""The `lm` root command. Its subcommands come from the entry-point group "lmcli.commands"."""

from typing import Annotated

import typer

from lmcli import __version__
from lmcli.plugins import mount

COMMANDS_GROUP = "lmcli.commands"

APP_SETTINGS = dict(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"lm {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    app = typer.Typer(help="lm: deploy large language models and serve them over an OpenAI-compatible API.",
                      **APP_SETTINGS)

    @app.callback()
    def root(
        version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                              help="Print the version and exit.")] = False,
    ) -> None:
        pass

    mount(app, COMMANDS_GROUP)
    return app


def main() -> None:
    build_app()(prog_name="lm")
