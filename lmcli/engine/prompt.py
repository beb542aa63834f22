"""Prompts to token ids: chat templates for strings and OpenAI-style message lists, and the tokens that
continue a session."""

from typing import Optional, Union

Prompt = Union[str, list]  # a string, or [{"role": ..., "content": ...}, ...]


def to_messages(prompt: Prompt, system: Optional[str] = None) -> list[dict]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def plain_messages(messages: list[dict], template: Optional[str]) -> list[dict]:
    """OpenAI-style messages as chat templates take them: content parts joined into one string; the `developer`
    role (OpenAI's newer name for system) as `system`; a message's `name` passed on where the template reads it,
    else written before the content ("name: ...") so that the model still sees who spoke."""
    reads_name = bool(template) and any(k in template for k in (".name", "['name']", '["name"]'))
    out = []
    for m in messages:
        content = m.get("content")
        if content is None:  # an assistant's refusal stands for its content
            content = m.get("refusal") or ""
        elif not isinstance(content, str):
            content = "".join(part.get("text") or part.get("refusal") or "" for part in content)
        message = {"role": "system" if m["role"] == "developer" else m["role"], "content": content}
        for key in ("tool_calls", "tool_call_id"):  # the tools module writes them as the template takes them
            if m.get(key):
                message[key] = m[key]
        if m.get("name"):
            if reads_name:
                message["name"] = m["name"]
            else:
                message["content"] = f"{m['name']}: {content}"
        out.append(message)
    return out


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                         **template_kwargs)


def encode_chat(tokenizer, prompt: Prompt, system: Optional[str] = None,
                template_kwargs: Optional[dict] = None) -> list[int]:
    """Apply the chat template, with template_kwargs as more of its variables (a model without a template gets the
    plain text of a string prompt)."""
    if tokenizer.chat_template is None:
        if not isinstance(prompt, str):
            raise ValueError("this model has no chat template; send a plain string prompt")
        return tokenizer.encode(prompt)
    text = render(tokenizer, to_messages(prompt, system), **(template_kwargs or {}))
    return tokenizer.encode(text, add_special_tokens=False)


def continue_chat(tokenizer, history_ids: list[int], messages: list[dict]) -> list[int]:
    """The tokens of a session's next turn. history_ids: the session's tokens so far; messages: the whole
    conversation including the new user message. The template's rendering of the conversation, less the text of
    the history, is what is new; if the history does not read back as a prefix of the rendering (a template that
    rewrites earlier answers), the new user message is rendered on its own."""
    full = render(tokenizer, messages)
    done = tokenizer.decode(history_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if history_ids and full.startswith(done):
        return tokenizer.encode(full[len(done):], add_special_tokens=False)
    return tokenizer.encode(render(tokenizer, messages[-1:]), add_special_tokens=False)
