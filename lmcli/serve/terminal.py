"""The terminal chat of `lm serve api_client`: answers stream from /v1/chat/interactive while the server keeps the
conversation (interactive_mode=true); the terminal only sends each new message. An HTTP client only: no engine."""

import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

from lmcli.serve.api_client import APIClient, APIClientError

HELP = """Enter sends. Esc then Enter, or a line ending in \\, starts a new line.
Ctrl-C stops an answer; Ctrl-C or Ctrl-D at an empty prompt quits.
/reset          start a new conversation (the server forgets this one)
/system TEXT    start a new conversation with this system prompt
/json           answers as JSON objects (enforced), or back to text
/help           this text
/exit, exit     quit"""


class Cancelled(Exception):
    """The user stopped an answer (Ctrl-C); the server was told."""


@dataclass
class Turn:
    text: str
    tokens: int
    seconds: float
    finish_reason: Optional[str]
    message: Optional[str]  # the server's reason for an early end (a full session)


class Conversation:
    def __init__(self, client: APIClient, system: Optional[str] = None, session_id: Optional[int] = None,
                 json_mode: bool = False, **sampling):
        self.client, self.system, self.sampling = client, system, sampling
        self.json_mode = json_mode  # every answer a JSON object (response_format json_object)
        self.session_id = session_id if session_id is not None else _new_id()
        self.turns = 0

    def send(self, text: str, write: Callable[[str], None]) -> Turn:
        """Stream the answer to `text` through write(); raises Cancelled on Ctrl-C (the turn is cancelled on the
        server; what came so far stays in the conversation)."""
        prompt = [{"role": "system", "content": self.system}, {"role": "user", "content": text}] \
            if self.system and not self.turns else text
        shape = {"response_format": {"type": "json_object"}} if self.json_mode else {}
        stream = self.client.chat_interactive_v1(prompt, session_id=self.session_id, interactive_mode=True,
                                                 stream=True, **shape, **self.sampling)
        start, answer, last = time.perf_counter(), "", None
        try:
            for item in stream:
                write(item["text"])
                answer, last = answer + item["text"], item
        except KeyboardInterrupt:
            self.client.cancel(self.session_id)
            raise Cancelled() from None
        finally:
            stream.close()
            self.turns += 1
        return Turn(answer, last["tokens"] if last else 0, time.perf_counter() - start,
                    last["finish_reason"] if last else None, last.get("message") if last else None)

    def reset(self, system: Optional[str] = None) -> None:
        self.end()
        self.system, self.session_id, self.turns = system, _new_id(), 0

    def end(self) -> None:
        """End the session on the server, as well as it goes (when quitting, an error is no news)."""
        try:
            self.client.end_session(self.session_id)
        except APIClientError:
            pass


def _new_id() -> int:
    return random.randrange(1, 1 << 31)


def stats(turn: Turn) -> str:
    rate = turn.tokens / turn.seconds if turn.seconds else 0.0
    return f"{turn.tokens} tokens, {rate:.1f} tokens/s"


def run_piped(conversation: Conversation, lines, out=sys.stdout) -> None:
    """Not a terminal: one prompt per line, each answer one line on stdout (its own newlines become spaces).
    Raises APIClientError for a refused request and for a full session."""
    for line in lines:
        text = line.rstrip("\n")
        if not text.strip():
            continue
        turn = conversation.send(text, lambda t: (out.write(t.replace("\n", " ")), out.flush()))
        if turn.text or not turn.message:
            out.write("\n")
            out.flush()
        if turn.message:
            raise APIClientError(None, turn.message)


def run_terminal(conversation: Conversation, model: str, url: str) -> None:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings
    from rich.console import Console
    from rich.text import Text

    from lmcli.known_models import cache_dir

    console = Console(highlight=False)
    keys = KeyBindings()

    @keys.add("enter")
    def _(event):
        buffer = event.current_buffer
        if buffer.document.text_before_cursor.endswith("\\"):
            buffer.delete_before_cursor(1)
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    @keys.add("escape", "enter")
    def _(event):
        event.current_buffer.insert_text("\n")

    @keys.add("c-c")
    def _(event):
        if event.current_buffer.text:
            event.current_buffer.reset()
        else:
            event.app.exit(exception=EOFError())

    cache_dir().mkdir(parents=True, exist_ok=True)
    session = PromptSession(history=FileHistory(str(cache_dir() / "api_client_history")), multiline=True,
                            key_bindings=keys, prompt_continuation="... ")
    console.print(f"[bold]{model}[/bold] at {url}, session {conversation.session_id}. "
                  "Enter sends; Esc Enter or a trailing \\ for a new line; /help for more.")
    while True:
        try:
            text = session.prompt(">>> ")
        except (EOFError, KeyboardInterrupt):
            break
        command = text.strip()
        if command in ("exit", "/exit", "/quit"):
            break
        if command == "/help":
            console.print(HELP, markup=False)
            continue
        if command == "/reset" or command == "/system" or command.startswith("/system "):
            system = command[len("/system"):].strip() or None if command != "/reset" else None
            try:
                conversation.reset(system)
            except APIClientError as e:
                console.print(Text(f"error: {e.message}", style="red"))
                continue
            console.print(f"[dim](a new conversation{' with that system prompt' if system else ''}, "
                          f"session {conversation.session_id})[/dim]")
            continue
        if command == "/json":
            conversation.json_mode = not conversation.json_mode
            console.print(f"[dim](answers {'as JSON objects' if conversation.json_mode else 'as text'})[/dim]")
            continue
        if command.startswith("/"):
            console.print(Text(f"unknown command {command.split()[0]}; /help lists them", style="yellow"))
            continue
        if not command:
            continue
        written = []
        try:
            turn = conversation.send(text, lambda t: (written.append(t), sys.stdout.write(t), sys.stdout.flush()))
        except Cancelled:
            console.print("\n[dim](stopped)[/dim]")
            continue
        except APIClientError as e:
            if e.status is None:  # the server is gone: nothing more to do here
                if any(written):
                    print()
                raise
            console.print(("\n" if any(written) else "") + f"error: {e.message}", style="red", markup=False)
            continue
        console.print()
        if turn.message:
            console.print(Text(f"{turn.message} (/reset starts a new conversation)", style="yellow"))
        console.print(f"[dim]{stats(turn)}[/dim]")
