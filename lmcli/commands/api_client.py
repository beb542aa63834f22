"""`lm serve api_client URL`: chat with an api_server in the terminal (or answer piped lines)."""

import sys
from typing import Annotated, Optional

import typer

from lmcli.commands.options import fail

NAME = "serve api_client"


def api_client(
    url: Annotated[str, typer.Argument(help="The api_server's URL, e.g. http://127.0.0.1:23333.", show_default=False)],
    api_key: Annotated[Optional[str], typer.Option(help="The server's API key (Bearer token), if it needs one.",
                                                   envvar="LM_API_KEY", show_default=False)] = None,
    session_id: Annotated[Optional[int], typer.Option(help="The server session to use. Default: a new one.",
                                                      show_default=False)] = None,
    system: Annotated[Optional[str], typer.Option(help="A system prompt for the conversation.",
                                                  show_default=False)] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: keep the most likely tokens up to this mass.")] = 0.8,
    top_k: Annotated[int, typer.Option(help="Keep only the k most likely tokens; 0 is off.")] = 40,
    max_new_tokens: Annotated[int, typer.Option(help="The longest answer, in tokens.")] = 512,
    json_mode: Annotated[bool, typer.Option("--json", help="Every answer a JSON object, enforced by the server "
                                                          "(response_format json_object); /json toggles it in "
                                                          "the terminal.")] = False,
) -> None:
    """Chat with an api_server in the terminal; the server keeps the conversation.

    Not a terminal (piped input): each line is a message, each answer one line on stdout (its newlines become
    spaces); a refused request or a full session stops with exit code 1."""
    from lmcli.serve.api_client import APIClient, APIClientError
    from lmcli.serve.terminal import Conversation, run_piped, run_terminal

    try:
        client = APIClient(url, api_key=api_key)
        model = client.available_models[0]
    except APIClientError as e:
        raise fail(NAME, _explain(e, url))
    conversation = Conversation(client, system, session_id, json_mode, temperature=temperature, top_p=top_p,
                                top_k=top_k, request_output_len=max_new_tokens)
    try:
        if sys.stdin.isatty():
            run_terminal(conversation, model, url)
        else:
            run_piped(conversation, sys.stdin)
    except APIClientError as e:
        raise fail(NAME, _explain(e, url))
    except KeyboardInterrupt:
        raise typer.Exit(130)
    finally:
        conversation.end()


def _explain(e, url: str) -> str:
    if e.status == 401:
        return f"{url} refused the API key: pass the right one with --api-key (or LM_API_KEY)"
    if e.status == 404:
        return f"{url} is not an lm api_server (no /v1/models there)"
    return str(e.message if e.status is None else e)
