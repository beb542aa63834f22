import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmcli.commands.options import DType, DTypeOption, QuantizationOption, QuantPolicyOption, fail
from lmcli.errors import UserError

HELP = "Type a message and press Enter. /reset starts over, /exit (or exit, Ctrl-D) quits."


def chat(
    workspace: Annotated[Path, typer.Argument(help="The workspace made by `lm convert`.", show_default=False)],
    system: Annotated[Optional[str], typer.Option(help="A system prompt for the conversation.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: keep the most likely tokens up to this mass.")] = 0.9,
    top_k: Annotated[int, typer.Option(help="Keep only the k most likely tokens; 0 is off.")] = 40,
    max_new_tokens: Annotated[int, typer.Option(help="The longest answer, in tokens.")] = 512,
    session_len: Annotated[Optional[int], typer.Option(help="Most tokens the conversation may hold. "
                                                                 "Default: the model's context.")] = None,
    dtype: DTypeOption = DType.auto,
    quantization: QuantizationOption = None,
    quant_policy: QuantPolicyOption = 0,
    tp: Annotated[int, typer.Option(help="Tensor-parallel ranks.")] = 1,
) -> None:
    """Chat with a model in the terminal, on the local engine (no server)."""
    from lmcli.engine.engine import Engine
    from lmcli.engine.prompt import continue_chat, to_messages
    from lmcli.engine.sampling_params import SamplingParams

    try:
        engine = Engine(workspace, dtype=dtype.value, tp=tp, session_len=session_len,
                        quantization=quantization.value if quantization else None, quant_policy=quant_policy)
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_new_tokens)
    except UserError as e:
        raise fail("chat", str(e))
    read = _reader()
    print(f"{engine.workspace.model_name} is ready. {HELP}", file=sys.stderr)
    session_id, messages, turn = 1, to_messages([], system), 0
    while True:
        try:
            text = read()
        except (EOFError, KeyboardInterrupt):
            break
        if text.strip() in ("exit", "/exit", "/quit"):
            break
        if text.strip() == "/reset":
            engine.end_session(session_id)
            session_id, messages = session_id + 1, to_messages([], system)
            print("(a new conversation)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        history = engine.scheduler.sessions[session_id].token_ids if session_id in engine.scheduler.sessions else []
        messages.append({"role": "user", "content": text})
        turn += 1
        ids = continue_chat(engine.tokenizer, history, messages)
        answer, start, n, last = "", time.perf_counter(), 0, None
        try:
            engine.add_request(f"chat-{turn}", ids, params, session_id=session_id)
            while engine.has_work:
                for out in engine.step():
                    print(out.text, end="", flush=True)
                    answer, n = answer + out.text, n + len(out.token_ids)
                    last = out
        except KeyboardInterrupt:
            engine.abort(f"chat-{turn}")  # the partial answer stays in the session, as in the transcript
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        seconds = time.perf_counter() - start
        print()
        if last is not None and last.finish_message:
            print(f"({last.finish_message})", file=sys.stderr)
        print(f"\033[2m[{n} tokens, {n / seconds:.1f} tokens/s]\033[0m" if sys.stdout.isatty()
              else f"[{n} tokens, {n / seconds:.1f} tokens/s, {last.num_cached_tokens if last else 0} cached]",
              file=sys.stderr)
        messages.append({"role": "assistant", "content": answer})
    engine.end_session(session_id)
    engine.close()


def _reader():
    if not sys.stdin.isatty():
        return lambda: input()
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory

    from lmcli.known_models import cache_dir

    cache_dir().mkdir(parents=True, exist_ok=True)
    session = PromptSession(history=FileHistory(str(cache_dir() / "chat_history")))
    return lambda: session.prompt(">>> ")
