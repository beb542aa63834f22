"""Prompts to token ids: chat templates for strings and OpenAI-style message lists, and the tokens that
continue a session."""

from typing import Optional, Union

Prompt = Union[str, list]  # a string, or [{"role": ..., "content": ...}, ...]


def to_messages(prompt: Prompt, system: Optional[str] = None) -> list[dict]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def encode_chat(tokenizer, prompt: Prompt, system: Optional[str] = None) -> list[int]:
    """Apply the chat template (a model without one gets the plain text of a string prompt)."""
    if tokenizer.chat_template is None:
        if not isinstance(prompt, str):
            raise ValueError("this model has no chat template; send a plain string prompt")
        return tokenizer.encode(prompt)
    return tokenizer.encode(render(tokenizer, to_messages(prompt, system)), add_special_tokens=False)


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
