"""Every request field of both client families, read from their own sources (the installed openai SDK's create
parameters, LMDeploy 0.9's request models from its wheel), is accepted with its default, and with a real value
is answered 200 or refused with a 400 that names it: never refused as unknown, never a 5xx. A field either family
adds later fails here until the server takes it."""

import ast
import typing

import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params
from starlette.testclient import TestClient

from fake_engine import FakeEngine
from test_http_layer import CHAT, make_app

COMPLETION = {"model": "fake-model", "prompt": "Hi"}
FUNCTION = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
# a value that asks for something, for each OpenAI field (some need a companion field, in COMPANIONS)
REAL = {
    "audio": {"voice": "alloy", "format": "wav"}, "best_of": 2, "echo": True, "frequency_penalty": 0.5,
    "function_call": {"name": "f"}, "functions": [FUNCTION["function"]], "logit_bias": {"5": 10},
    "logprobs": True, "max_completion_tokens": 5, "max_tokens": 5, "metadata": {"k": "v"},
    "modalities": ["text", "audio"], "moderation": {"model": "omni-moderation-latest"}, "n": 2,
    "parallel_tool_calls": False, "prediction": {"type": "content", "content": "Hi"}, "presence_penalty": 0.5,
    "prompt_cache_key": "k1", "prompt_cache_options": {"mode": "auto"}, "prompt_cache_retention": "24h",
    "reasoning_effort": "low", "response_format": {"type": "json_object"}, "safety_identifier": "u1", "seed": 1,
    "service_tier": "flex", "stop": ["x"], "store": True, "stream": True, "stream_options": {"include_usage": True},
    "suffix": "!", "temperature": 0.5, "tool_choice": "required", "tools": [FUNCTION], "top_logprobs": 2,
    "top_p": 0.5, "user": "u1", "verbosity": "low", "web_search_options": {},
}
COMPANIONS = {"stream_options": {"stream": True}, "top_logprobs": {"logprobs": True}}
REQUIRED = {"model", "messages", "prompt"}


def openai_fields(params) -> list[str]:
    return sorted(set(params.CompletionCreateParamsBase.__annotations__) - REQUIRED)


@pytest.fixture(scope="module")
def client():
    app, _ = make_app(FakeEngine(max_len=4096))  # room for the tools' description in the prompt
    with TestClient(app) as c:
        yield c


def answered(r, field: str) -> None:
    assert r.status_code == 200 or (r.status_code == 400 and r.json()["error"]["param"] == field), (field, r.text)
    if r.status_code == 400:  # refused for its value, with the reason; not as a field the server does not know
        assert "does not accept it" not in r.json()["error"]["message"], (field, r.text)


@pytest.mark.parametrize("route,base,params", [("/v1/chat/completions", CHAT, chat_params),
                                               ("/v1/completions", COMPLETION, completion_params)])
def test_every_openai_create_parameter(client, route, base, params):
    fields = openai_fields(params)
    assert len(fields) > 10 and not set(fields) - set(REAL), set(fields) - set(REAL)  # a new field needs a value
    for field in fields:
        r = client.post(route, json={**base, field: None})
        assert r.status_code == 200, (field, r.text)  # null is the default: never refused
        answered(client.post(route, json={**base, **COMPANIONS.get(field, {}), field: REAL[field]}), field)


def lmdeploy_defaults(protocol_source: str, model: str) -> dict:
    """LMDeploy's request model `model`: each field with its default as LMDeploy's server fills it in."""
    tree = ast.parse(protocol_source)
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == model]
    out = {}
    for stmt in cls.body:
        if not isinstance(stmt, ast.AnnAssign) or stmt.value is None:
            continue
        value = stmt.value
        if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "Field":
            value = next((k.value for k in value.keywords if k.arg == "default"), value.args[0] if value.args else None)
            if value is None:
                continue
        out[stmt.target.id] = ast.literal_eval(value)
    return out


@pytest.mark.parametrize("model,route,base", [("ChatCompletionRequest", "/v1/chat/completions", CHAT),
                                              ("CompletionRequest", "/v1/completions", COMPLETION),
                                              ("GenerateRequest", "/v1/chat/interactive", {"prompt": "Hi"}),
                                              ("EncodeRequest", "/v1/encode", {"input": "Hi"})])
def test_every_lmdeploy_request_field_with_its_default(client, lmdeploy_sources, model, route, base):
    defaults = lmdeploy_defaults((lmdeploy_sources / "protocol.py").read_text(), model)
    assert len(defaults) >= 2, defaults
    for field, value in defaults.items():
        if field in base or field == "model":
            continue
        body = {**base, field: value}
        if field == "session_id" and route != "/v1/chat/interactive":
            body[field] = None if value == -1 else value  # -1 in LMDeploy's chat models means none
        r = client.post(route, json=body)
        assert r.status_code == 200, (model, field, value, r.text)
    r = client.post(route, json={**base, **{k: v for k, v in defaults.items() if k not in base and k != "model"
                                             and not (k == "session_id" and route != "/v1/chat/interactive")}})
    assert r.status_code == 200, (model, r.text)  # all of them at once, as LMDeploy's server fills them in


# each OpenAI message type: a message of it with every field, and for each field a value that asks for something
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
MESSAGES = {
    "ChatCompletionSystemMessageParam": ({"role": "system", "content": "Be brief."}, {"name": "rules"}),
    "ChatCompletionDeveloperMessageParam": ({"role": "developer", "content": "Be brief."}, {"name": "rules"}),
    "ChatCompletionUserMessageParam": ({"role": "user", "content": "Hi"}, {"name": "ada"}),
    "ChatCompletionAssistantMessageParam": ({"role": "assistant", "content": "Hello"}, {
        "name": "bot", "refusal": "I cannot.", "audio": {"id": "a1"}, "tool_calls": [CALL],
        "function_call": {"name": "f", "arguments": "{}"}}),
    "ChatCompletionToolMessageParam": ({"role": "tool", "content": "42"}, {"tool_call_id": "c1"}),
    "ChatCompletionFunctionMessageParam": ({"role": "function", "content": "42", "name": "f"}, {}),
}
PARTS = {"text": {"type": "text", "text": "Hi"}, "image_url": {"type": "image_url", "image_url": {"url": "x"}},
         "input_audio": {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
         "file": {"type": "file", "file": {"file_id": "f1"}}}


def test_every_openai_message_field_and_content_part(client):
    from openai.types import chat

    def send(message):
        return client.post("/v1/chat/completions", json={**CHAT, "messages": [message, CHAT["messages"][0]]})

    for name, (message, real) in MESSAGES.items():
        fields = set(getattr(chat, name).__annotations__)
        assert fields <= set(message) | set(real), (name, fields - set(message) - set(real))  # new: give a value
        plain = send(message)
        refused_role = message["role"] == "function"  # the deprecated functions API
        assert plain.status_code == (400 if refused_role else 200), (name, plain.text)
        if refused_role:
            assert plain.json()["error"]["param"] == "messages.0.role" and "tool" in plain.json()["error"]["message"]
            continue
        for field in fields - {"role", "content"}:
            assert send({**message, field: None}).status_code == 200, (name, field)
            r = send({**message, field: real[field]})
            assert r.status_code == 200 or r.json()["error"]["param"] == f"messages.0.{field}", (name, field, r.text)
    assert send({"role": "assistant", "content": None, "refusal": "I cannot."}).status_code == 200
    assert send({"role": "assistant", "content": None}).json()["error"]["param"] == "messages.0.content"
    assert send({"role": "assistant", "content": None, "tool_calls": [CALL]}).status_code == 200
    parts = {typing.get_args(typing.get_type_hints(cls)["type"])[0]
             for cls in typing.get_args(chat.ChatCompletionContentPartParam)}
    assert parts <= set(PARTS), parts - set(PARTS)
    for kind, part in PARTS.items():
        r = send({"role": "user", "content": [part]})
        if kind == "text":
            assert r.status_code == 200, r.text
        else:
            assert r.json()["error"]["param"] == "messages.0.content.0" and "text only" in r.text, (kind, r.text)


# what vllm-router 0.1.17 (pip install vllm-router) forwarded to a node, captured on the wire: SGLang's and vLLM's
# fields added to every request at these values
ROUTER_CHAT = {"stream": False, "logprobs": False, "no_stop_trim": False, "ignore_eos": False,
               "continue_final_message": False, "skip_special_tokens": True, "separate_reasoning": True,
               "stream_reasoning": True, "return_hidden_states": False, "include_reasoning": True}
ROUTER_COMPLETION = {"stream": False, "echo": False, "no_stop_trim": False, "ignore_eos": False,
                     "skip_special_tokens": True, "return_hidden_states": False}


@pytest.mark.parametrize("route,base,added", [("/v1/chat/completions", CHAT, ROUTER_CHAT),
                                              ("/v1/completions", COMPLETION, ROUTER_COMPLETION)])
def test_what_the_rust_routers_add_is_accepted(client, route, base, added):
    assert client.post(route, json={**base, **added}).status_code == 200
    asks = {"no_stop_trim": True, "return_hidden_states": True, "include_reasoning": False, "stream_reasoning": False,
            "continue_final_message": True}
    for field in set(asks) & set(added):
        r = client.post(route, json={**base, **added, field: asks[field]})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
        assert "send " in r.json()["error"]["message"]
