"""`lm serve gradio`: a Gradio chat page that talks to an api_server over HTTP (APIClient): one server session
per browser tab, answers streamed from /v1/chat/interactive. No CDN at run time: system fonts, no analytics."""

import random
from typing import Optional

from lmcli.serve.api_client import APIClient, APIClientError

TITLE = "lm chat"


def _new_session() -> dict:
    return {"id": random.randrange(1, 1 << 31), "turns": 0}


def build(url: str, api_key: Optional[str] = None):
    import gradio as gr

    def client() -> APIClient:
        return APIClient(url, api_key=api_key)

    try:
        models = client().available_models
    except APIClientError:
        models = []

    def stream_answer(prompt, history, session, temperature, top_p, top_k, max_new_tokens):
        """Yield (history, status) while the answer comes in."""
        history = history + [{"role": "assistant", "content": ""}]
        yield history, ""
        status = ""
        try:
            for item in client().chat_interactive_v1(prompt, session_id=session["id"], interactive_mode=True,
                                                     stream=True, temperature=temperature, top_p=top_p,
                                                     top_k=int(top_k), request_output_len=int(max_new_tokens)):
                history[-1]["content"] += item["text"]
                if item.get("message"):
                    status = f"⚠️ {item['message']} (press Reset)"
                yield history, status
        except APIClientError as e:
            yield history, f"⚠️ {e.message}"
        session["turns"] += 1

    def send(message, history, session, system, temperature, top_p, top_k, max_new_tokens):
        if not message.strip():
            yield "", history, session, ""
            return
        history = history + [{"role": "user", "content": message}]
        prompt = [{"role": "system", "content": system}, {"role": "user", "content": message}] \
            if system.strip() and not session["turns"] else message
        for h, status in stream_answer(prompt, history, session, temperature, top_p, top_k, max_new_tokens):
            yield "", h, session, status

    def regenerate(history, session, system, temperature, top_p, top_k, max_new_tokens):
        """A new answer to the last message: the server session restarts with the conversation up to it."""
        while history and history[-1]["role"] == "assistant":
            history = history[:-1]
        if not history:
            yield history, session, ""
            return
        _end(session)
        session = _new_session()
        messages = ([{"role": "system", "content": system}] if system.strip() else []) + \
            [{"role": m["role"], "content": _text(m["content"])} for m in history]
        for h, status in stream_answer(messages, history, session, temperature, top_p, top_k, max_new_tokens):
            yield h, session, status

    def stop(session):
        try:
            client().cancel(session["id"])
        except APIClientError as e:
            return f"⚠️ {e.message}"
        return ""

    def reset(session):
        _end(session)
        return [], _new_session(), ""

    def _end(session) -> None:
        try:
            client().end_session(session["id"])
        except APIClientError:
            pass

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
        knobs = [system, temperature, top_p, top_k, max_new_tokens]
        sending = [message.submit(send, [message, chatbot, session, *knobs], [message, chatbot, session, status]),
                   send_button.click(send, [message, chatbot, session, *knobs], [message, chatbot, session, status])]
        regenerating = regenerate_button.click(regenerate, [chatbot, session, *knobs], [chatbot, session, status])
        stop_button.click(stop, [session], [status], cancels=[*sending, regenerating])
        reset_button.click(reset, [session], [chatbot, session, status], cancels=[*sending, regenerating])
    return demo, theme


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # gradio's message parts
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)
