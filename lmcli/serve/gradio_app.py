"""`lm serve gradio`: a Gradio chat page that talks to an api_server over HTTP (APIClient): one server session
per browser tab, answers streamed from /v1/chat/interactive. No CDN at run time: system fonts, no analytics."""

import random
import time
from typing import Optional

from lmcli.serve.api_client import APIClient, APIClientError

TITLE = "lm chat"


def _new_session() -> dict:
    return {"id": random.randrange(1, 1 << 31), "turns": 0}


def build(url: str, api_key: Optional[str] = None):
    import gradio as gr

    shared = APIClient(url, api_key=api_key)  # one connection pool for every tab (httpx.Client is thread-safe)

    def client() -> APIClient:
        return shared

    try:
        models = client().available_models
    except APIClientError:
        models = []

    def stream_answer(prompt, history, session, temperature, top_p, top_k, max_new_tokens, json_mode):
        """Yield (history, status) while the answer comes in."""
        shape = {"response_format": {"type": "json_object"}} if json_mode else {}
        history = history + [{"role": "assistant", "content": ""}]
        yield history, ""
        status, counted = "", False
        try:
            for item in client().chat_interactive_v1(prompt, session_id=session["id"], interactive_mode=True,
                                                     stream=True, temperature=temperature, top_p=top_p,
                                                     top_k=int(top_k), request_output_len=int(max_new_tokens),
                                                     **shape):
                if not counted:  # the server took the turn: the system prompt, if any, is in the session now
                    session["turns"], counted = session["turns"] + 1, True
                history[-1]["content"] += item["text"]
                if item.get("message"):
                    status = f"⚠️ {item['message']} (press Reset)"
                yield history, status
        except APIClientError as e:
            yield history, f"⚠️ {e.message}"

    tabs: dict[str, dict] = {}  # gradio's session hash -> that tab's server session, to end it when the tab closes

    def send(message, history, session, system, temperature, top_p, top_k, max_new_tokens, json_mode,
             request: gr.Request):
        tabs[request.session_hash] = session
        if not message.strip():  # nothing to send: leave the page as it is
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        history = history + [{"role": "user", "content": message}]
        prompt = [{"role": "system", "content": system}, {"role": "user", "content": message}] \
            if system.strip() and not session["turns"] else message
        cleared = False
        for h, status in stream_answer(prompt, history, session, temperature, top_p, top_k, max_new_tokens,
                                       json_mode):
            yield (gr.skip() if cleared else ""), h, session, status  # clear the box once: the user may type on
            cleared = True

    def regenerate(history, session, system, temperature, top_p, top_k, max_new_tokens, json_mode,
                   request: gr.Request):
        """A new answer to the last message: the server session restarts with the conversation up to it."""
        while history and history[-1]["role"] == "assistant":
            history = history[:-1]
        if not history:
            yield history, session, ""
            return
        _end(session)
        session = tabs[request.session_hash] = _new_session()
        messages = ([{"role": "system", "content": system}] if system.strip() else []) + \
            [{"role": m["role"], "content": _text(m["content"])} for m in history]
        for h, status in stream_answer(messages, history, session, temperature, top_p, top_k, max_new_tokens,
                                       json_mode):
            yield h, session, status

    def stop(session):
        try:
            client().cancel(session["id"])
        except APIClientError as e:
            return f"⚠️ {e.message}"
        return ""

    def reset(session, request: gr.Request):
        _end(session)
        session = tabs[request.session_hash] = _new_session()
        return [], session, ""

    def closed(request: gr.Request):
        session = tabs.pop(request.session_hash, None)
        if session is not None:
            _end(session)

    def _end(session) -> None:
        """Stop the session's running turn, if any, then end the session (a turn still stopping makes it busy
        for a moment: 409, so try again)."""
        for _ in range(50):
            try:
                client().cancel(session["id"])
                client().end_session(session["id"])
                return
            except APIClientError as e:
                if e.status != 409:
                    return
                time.sleep(0.05)

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "SFMono-Regular", "monospace"])
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        session = gr.State(_new_session)
        with gr.Row():
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(label=models[0] if models else "chat", height=480, elem_id="chat",
                                     feedback_options=None)
                message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                                     elem_id="message", autofocus=True)
                with gr.Row():
                    send_button = gr.Button("Send", variant="primary", elem_id="send")
                    stop_button = gr.Button("Stop", elem_id="stop")
                    regenerate_button = gr.Button("Regenerate", elem_id="regenerate")
                    reset_button = gr.Button("Reset", elem_id="reset")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=1):
                gr.Dropdown(choices=models, value=models[0] if models else None, label="Model",
                            info=f"served at {url}", elem_id="model")
                system = gr.Textbox(label="System prompt", lines=3, placeholder="(the server's default)",
                                    elem_id="system")
                temperature = gr.Slider(0, 2, value=0.5, step=0.05, label="Temperature", elem_id="temperature")
                top_p = gr.Slider(0.05, 1, value=0.8, step=0.05, label="Top p")
                top_k = gr.Slider(0, 100, value=40, step=1, label="Top k (0: off)")
                max_new_tokens = gr.Slider(1, 4096, value=512, step=1, label="Max new tokens",
                                           elem_id="max_new_tokens")
                json_mode = gr.Checkbox(label="JSON output", info="every answer a JSON object, enforced",
                                        elem_id="json_mode")
        knobs = [system, temperature, top_p, top_k, max_new_tokens, json_mode]
        sending = [message.submit(send, [message, chatbot, session, *knobs], [message, chatbot, session, status]),
                   send_button.click(send, [message, chatbot, session, *knobs], [message, chatbot, session, status])]
        # Cancelling an answer first, then acting in a .then(): a cancelled answer's last update would otherwise
        # land after this event's own and undo it (or, after Stop, the text the server sent as it stopped).
        regenerating = regenerate_button.click(None, cancels=sending).then(
            regenerate, [chatbot, session, *knobs], [chatbot, session, status])
        stop_button.click(None, cancels=[*sending, regenerating]).then(stop, [session], [status])
        reset_button.click(None, cancels=[*sending, regenerating]).then(reset, [session], [chatbot, session, status])
        demo.unload(closed)  # a closed or reloaded tab ends its server session
    return demo, theme


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # gradio's message parts
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)
