"""The HTTP layer against the fake engine (fast): formats, errors, keys, CORS, sessions, health, metrics."""

import asyncio
import json
import threading
import time

import httpx
import pytest
from openapi_spec_validator import validate
from starlette.testclient import TestClient

from fake_engine import ANSWER, FakeEngine
from lmcli.engine.async_engine import AsyncEngine
from lmcli.serve import protocol as p
from lmcli.serve.api_server import create_app
from lmcli.serve.state import ServerOptions
from servers import serve_in_thread

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def make_app(engine=None, **options):
    engine = AsyncEngine(engine or FakeEngine())
    return create_app(engine, ServerOptions(**options)), engine


@pytest.fixture
def client():
    app, engine = make_app()
    with TestClient(app) as c:
        c.engine = engine.engine
        yield c


def sse_events(text: str) -> list:
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and text.endswith("data: [DONE]\n\n")
    return [json.loads(e) for e in events[:-1]]


def test_models_health_metrics(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "fake-model" and models["data"][0]["max_model_len"] == 256
    assert set(models["data"][0]) == {"id", "object", "created", "owned_by", "max_model_len"}
    health = client.get("/health").json()
    assert health["status"] == "ok" and len(health["instance"]) == 32
    client.post("/v1/chat/completions", json=CHAT)
    text = client.get("/metrics").text
    for name in ("lm_requests_running", "lm_requests_waiting", "lm_kv_cache_blocks_used", "lm_kv_cache_blocks_total",
                 "lm_prefix_cache_hit_rate 0.5", "lm_prompt_tokens_total", "lm_generation_tokens_total",
                 "lm_time_to_first_token_seconds_bucket", "lm_time_per_output_token_seconds_bucket",
                 "lm_e2e_request_latency_seconds_count 1.0", 'lm_requests_total{endpoint="chat",finish_reason="stop"}'):
        assert name in text, name


def test_docs_work_offline_and_schema_is_valid(client):
    page = client.get("/")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text and "http" not in page.text.split("<body>")[1]
    for asset in ("/swagger/swagger-ui-bundle.js", "/swagger/swagger-ui.css"):
        r = client.get(asset)
        assert r.status_code == 200 and len(r.content) > 10_000, asset
    schema = client.get("/openapi.json").json()
    validate(schema)
    for path in ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/chat/interactive", "/v1/encode",
                 "/health", "/metrics"):
        assert path in schema["paths"], path
    components = schema["components"]["schemas"]
    for model in (p.ChatCompletionRequest, p.CompletionRequest, p.InteractiveRequest, p.EncodeRequest,
                  p.ChatCompletionResponse, p.ChatCompletionChunk, p.InteractiveResponse):
        assert set(components[model.__name__]["properties"]) == set(model.model_fields), model


def test_chat_completion(client):
    r = client.post("/v1/chat/completions", json={**CHAT, "n": 2, "logprobs": True, "top_logprobs": 2,
                                                  "user": "u1"}).json()
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-") and r["model"] == "fake-model"
    assert [c["index"] for c in r["choices"]] == [0, 1]
    for c in r["choices"]:
        assert c["message"] == {"role": "assistant", "content": ANSWER} and c["finish_reason"] == "stop"
        lp = c["logprobs"]["content"]
        assert len(lp) == len(ANSWER) + 1 and lp[0]["token"] == "H" and lp[0]["bytes"] == [72]
        assert [t["token"] for t in lp[0]["top_logprobs"]] == ["H", "?"]
    prompt = len("<user>Hi</user><assistant>")
    assert r["usage"] == {"prompt_tokens": prompt, "completion_tokens": 2 * (len(ANSWER) + 1),
                          "total_tokens": prompt + 2 * (len(ANSWER) + 1), "prompt_tokens_details": {"cached_tokens": 0}}
    capped = client.post("/v1/chat/completions", json={**CHAT, "max_completion_tokens": 5}).json()
    assert capped["choices"][0]["message"]["content"] == ANSWER[:5] and capped["choices"][0]["finish_reason"] == "length"


def test_sampling_fields_reach_the_engine(client):
    body = {**CHAT, "temperature": 0.5, "top_p": 0.9, "top_k": 7, "min_p": 0.1, "max_tokens": 9, "stop": "xyz",
            "stop_token_ids": [5], "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2,
            "seed": 42, "ignore_eos": True, "min_tokens": 2, "skip_special_tokens": False,
            "logit_bias": {"7": -100, "12": 3.5},
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    rid, ids, params, _ = client.engine.added[-1]
    assert "".join(map(chr, ids)) == "<system>Be brief.</system><user>ab</user><assistant>"
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.max_tokens) == (0.5, 0.9, 7, 0.1, 9)
    assert (params.stop, params.stop_token_ids, params.seed, params.ignore_eos) == (("xyz",), (5,), 42, True)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -0.5, 1.2)
    assert (params.min_tokens, params.skip_special_tokens, params.logprobs) == (2, False, None)
    assert params.logit_bias == ((7, -100.0), (12, 3.5))


def test_response_format_reaches_the_engine_as_a_grammar(client):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    formats = [({"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}, "answer"),
               ({"type": "json_object", "json_schema": None, "regex_schema": None}, "object"),  # LMDeploy's nulls
               ({"type": "regex_schema", "regex_schema": "[0-9]+"}, "[0-9]+"),
               ({"type": "text"}, None), (None, None)]
    for route, base in (("/v1/chat/completions", CHAT), ("/v1/completions", {"model": "fake-model", "prompt": "a"}),
                        ("/v1/chat/interactive", {"prompt": "a"})):
        for response_format, part in formats:
            r = client.post(route, json={**base, "response_format": response_format})
            assert r.status_code == 200, r.text
            grammar = client.engine.added[-1][2].grammar
            assert grammar is None if part is None else part in grammar, (response_format, grammar)


def test_developer_role_and_message_names(client):
    msgs = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "ada"},
            {"role": "assistant", "content": "Hello", "name": None}, {"role": "user", "content": "Again"}]
    assert client.post("/v1/chat/completions", json={**CHAT, "messages": msgs}).status_code == 200
    prompt = "".join(map(chr, client.engine.added[-1][1]))
    assert prompt == ("<system>Be brief.</system><user>ada: Hi</user><assistant>Hello</assistant>"
                      "<user>Again</user><assistant>")
    r = client.post("/v1/chat/interactive", json={"prompt": msgs[:2]})
    assert r.status_code == 200, r.text
    assert "".join(map(chr, client.engine.added[-1][1])) == "<system>Be brief.</system><user>ada: Hi</user><assistant>"


def test_defaults_that_lmdeploy_and_openai_clients_send_are_accepted(client):
    chat = {**CHAT, "tools": None, "tool_choice": "auto", "parallel_tool_calls": True, "kwargs": {},
            "response_format": {"type": "text"}, "logprobs": False, "top_logprobs": 0, "do_preprocess": True,
            "spaces_between_special_tokens": True, "min_new_tokens": None, "logit_bias": None, "stream_options": None}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    assert client.post("/v1/chat/completions", json={**CHAT, "tools": [], "tool_choice": "none"}).status_code == 200
    completion = {"model": CHAT["model"], "prompt": "a", "suffix": None, "kwargs": {}, "top_k": 40,
                  "spaces_between_special_tokens": False}
    assert client.post("/v1/completions", json=completion).status_code == 200
    assert client.engine.added[-1][2].spaces_between_special_tokens is False
    interactive = {"prompt": "Hi", "image_url": None, "adapter_name": None, "kwargs": {}, "min_new_tokens": 2,
                   "min_p": 0.05, "spaces_between_special_tokens": True, "request_output_len": None}
    assert client.post("/v1/chat/interactive", json=interactive).status_code == 200
    params = client.engine.added[-1][2]
    assert (params.min_tokens, params.min_p) == (2, 0.05)
    for field, value in [("image_url", "http://x/cat.png"), ("adapter_name", "lora"), ("kwargs", {"a": 1})]:
        r = client.post("/v1/chat/interactive", json={"prompt": "Hi", field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    # what a pydantic client dumps with every field: other roles' and other types' fields as null, [] for no calls
    dumped = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "image_url": None}],
                                    "refusal": None, "tool_calls": [], "tool_call_id": None, "name": None}],
              "response_format": {"type": "text", "json_schema": None, "regex_schema": None}}
    assert client.post("/v1/chat/completions", json=dumped).status_code == 200


def test_enable_thinking_and_chat_template_kwargs_reach_the_template(client):
    body = {**CHAT, "enable_thinking": False, "chat_template_kwargs": {"style": "terse"}}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    prompt = "".join(map(chr, client.engine.added[-1][1]))
    assert prompt == "<user>Hi</user><enable_thinking=False><style=terse><assistant>"


def test_lmdeploy_min_new_tokens_is_min_tokens(client):
    for extra, expected in [({"min_new_tokens": 3}, 3), ({"min_new_tokens": 3, "min_tokens": 3}, 3),
                            ({"min_new_tokens": None, "min_tokens": 2}, 2), ({"min_new_tokens": 0}, 0)]:
        assert client.post("/v1/chat/completions", json={**CHAT, **extra}).status_code == 200
        assert client.engine.added[-1][2].min_tokens == expected
        assert client.post("/v1/completions", json={"model": CHAT["model"], "prompt": "a", **extra}).status_code == 200
        assert client.engine.added[-1][2].min_tokens == expected


def test_meta_instruction_is_the_default_system_prompt():
    app, engine = make_app(meta_instruction="You are terse.")
    with TestClient(app) as c:
        c.post("/v1/chat/completions", json=CHAT)
        assert "".join(map(chr, engine.engine.added[-1][1])).startswith("<system>You are terse.</system><user>Hi")
        c.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "system", "content": "Own."}, CHAT["messages"][0]]})
        assert "".join(map(chr, engine.engine.added[-1][1])).startswith("<system>Own.</system>")


def test_chat_stream_is_openai_sse(client):
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": True, "n": 2})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert len({e["id"] for e in events}) == 1 and all(e["object"] == "chat.completion.chunk" for e in events)
    for i in (0, 1):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == ANSWER
        assert [c.get("finish_reason") for c in mine][-1] == "stop"
        assert all(c.get("finish_reason") is None for c in mine[:-1])
        assert mine[-1]["delta"].get("content") is not None  # the last content chunk carries finish_reason
        assert all("finish_reason" in c and "logprobs" in c for c in mine)  # null, but there, as OpenAI sends
    assert all("usage" not in e for e in events)


def test_stream_include_usage(client):
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": {"include_usage": True},
                                                  "max_tokens": 4})
    events = sse_events(r.text)
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_completions_prompt_forms(client):
    def ask(**body):
        r = client.post("/v1/completions", json={"model": "fake-model", "max_tokens": 3, **body})
        assert r.status_code == 200, r.text
        return r.json()

    one = ask(prompt="two steps")
    assert one["object"] == "text_completion" and one["choices"][0]["text"] == ANSWER[:3]
    assert one["usage"]["prompt_tokens"] == len("two steps")
    many = ask(prompt=["a", "bb"], n=2)
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3] and many["usage"]["prompt_tokens"] == 3
    assert ask(prompt=[104, 105])["usage"]["prompt_tokens"] == 2
    default = client.post("/v1/completions", json={"model": "fake-model", "prompt": "x"}).json()["choices"][0]
    assert default["text"] == ANSWER[:16] and default["finish_reason"] == "length"  # OpenAI's default max_tokens
    assert ask(prompt="x", max_tokens=None)["choices"][0]["text"] == ANSWER  # null: what the context leaves
    assert len(ask(prompt=[[104], [105, 106]])["choices"]) == 2
    assert ask(prompt="ab", echo=True)["choices"][0]["text"] == "ab" + ANSWER[:3]
    lp = ask(prompt="ab", logprobs=1)["choices"][0]["logprobs"]
    assert lp["tokens"] == list(ANSWER[:3]) and lp["text_offset"] == [0, 1, 2] and lp["token_logprobs"] == [-0.25] * 3
    events = sse_events(client.post("/v1/completions", json={"model": "fake-model", "prompt": ["a", "b"],
                                                             "max_tokens": 3, "stream": True}).text)
    assert all(e["object"] == "text_completion" for e in events)
    for i in (0, 1):
        assert "".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == i) == ANSWER[:3]


BAD = [
    (b"{not json", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, "invalid_json"),
    ({"messages": CHAT["messages"]}, 400, "model", "missing_field"),
    ({**CHAT, "temperature": "hot"}, 400, "temperature", "invalid_value"),
    ({**CHAT, "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ({**CHAT, "top_p": 0}, 400, "top_p", "invalid_value"),
    ({**CHAT, "n": 0}, 400, "n", "invalid_value"),
    ({**CHAT, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({**CHAT, "stream": "yes"}, 400, "stream", "invalid_value"),
    ({**CHAT, "messages": []}, 400, "messages", "invalid_value"),
    ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", "invalid_value"),
    ({**CHAT, "messages": [{"role": "user", "content": "x", "name": 5}]}, 400, "messages.0.name", "invalid_value"),
    ({**CHAT, "messages": [{"role": "user", "content": 1}]}, 400, "messages.0.content", "invalid_value"),
    ({**CHAT, "tools": [{"type": "custom", "custom": {"name": "f"}}]}, 400, "tools.0", None),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "a b"}}]}, 400, "tools.0.function.name", None),
    ({**CHAT, "tools": [TOOL, TOOL]}, 400, "tools", None),
    ({**CHAT, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice",
     None),
    ({**CHAT, "tools": [TOOL], "tool_choice": "sometimes"}, 400, "tool_choice", None),
    ({**CHAT, "tools": [TOOL], "response_format": {"type": "json_object"}}, 400, "response_format", None),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties":
        {"a": {"type": "array", "uniqueItems": True}}}}}], "tool_choice": "required"}, 400, "tools", None),
    ({**CHAT, "messages": [{"role": "function", "name": "f", "content": "1"}]}, 400, "messages.0.role", None),
    ({**CHAT, "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]}, 400,
     "messages.0.tool_calls.0", None),
    ({**CHAT, "audio": {"voice": "alloy", "format": "mp3"}}, 400, "audio", None),
    ({**CHAT, "modalities": ["text", "audio"]}, 400, "modalities", None),
    ({**CHAT, "store": True}, 400, "store", None),
    ({**CHAT, "reasoning_effort": "high"}, 400, "reasoning_effort", None),
    ({**CHAT, "tool_choice": "required"}, 400, "tool_choice", None),
    ({**CHAT, "response_format": {"type": "xml"}}, 400, "response_format.type", None),
    ({**CHAT, "response_format": {"type": "json_object", "schema": {}}}, 400, "response_format", None),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": {"not": {"type": "string"}}}}},
     400, "response_format", None),  # a keyword the grammar cannot enforce: never ignored
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": "x"}}}, 400,
     "response_format.json_schema.schema", None),
    ({**CHAT, "response_format": {"type": "regex_schema", "regex_schema": "(unclosed"}}, 400, "response_format", None),
    ({**CHAT, "response_format": {"type": "json_object"}, "min_tokens": 3}, 400, "min_tokens", None),
    ({**CHAT, "do_preprocess": False}, 400, "do_preprocess", None),
    ({**CHAT, "kwargs": {"session_len": 9}}, 400, "kwargs", None),
    ({**CHAT, "model": "gpt-4"}, 404, "model", "model_not_found"),
    ({**CHAT, "messages": [{"role": "user", "content": "x" * 300}]}, 400, "messages", "context_length_exceeded"),
    ({**CHAT, "max_tokens": 250}, 400, "max_tokens", "context_length_exceeded"),
    ({**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ({**CHAT, "top_logprobs": 2}, 400, "top_logprobs", None),
    ({**CHAT, "min_tokens": 9, "max_tokens": 3}, 400, "min_tokens", None),
    ({**CHAT, "messages": [{"role": "user", "content": "RAISE"}]}, 400, "messages", None),
    ({**CHAT, "seed": 2**64}, 400, "seed", "invalid_value"),
    ({**CHAT, "logit_bias": {"token": 5}}, 400, "logit_bias", None),
    ({**CHAT, "logit_bias": {"5": 101}}, 400, "logit_bias", None),
    ({**CHAT, "logit_bias": {"5": "high"}}, 400, "logit_bias.5", "invalid_value"),
    ({**CHAT, "min_tokens": 2, "min_new_tokens": 3}, 400, "min_new_tokens", None),
    (b"[" * 100_000, 400, None, "invalid_json"),
    # what the fuzz suite found once /openapi.json said each role's fields: each a 400 naming the field
    ({**CHAT, "messages": [{"role": "user", "content": "x", "refusal": "no"}]}, 400, "messages.0.refusal", None),
    ({**CHAT, "messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, 400, "messages.0.tool_call_id",
     None),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]}, 400,
     "messages.0.content.0", None),
    ({**CHAT, "messages": [{"role": "tool", "content": "x", "audio": {}}]}, 400, "messages.0.audio", None),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "x", "file": {}}]}]}, 400,
     "messages.0.content.0.file", None),
    ({**CHAT, "messages": [{"role": "assistant", "tool_calls": [{"id": {}, "type": "function", "function": {
        "name": "f", "arguments": "{}"}}]}]}, 400, "messages.0.tool_calls.0", None),
    ({**CHAT, "return_hidden_states": 0}, 400, "return_hidden_states", None),  # 0 is not false
    ({**CHAT, "response_format": {"type": {}}}, 400, "response_format.type", None),  # was a 500
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": None, "strict": {}}}}, 400,
     "response_format.json_schema.strict", None),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "f", "description": 5}}]}, 400,
     "tools.0.function.description", None),
    ({**CHAT, "seed": 2**63}, 400, "seed", "invalid_value"),
]


@pytest.mark.parametrize("body,status,param,code", BAD)
def test_bad_chat_requests(client, body, status, param, code):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = client.post("/v1/chat/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    assert err["param"] == param and err["code"] == code
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200  # still serving
    assert not client.engine.requests


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"model": "fake-model", "prompt": "x", "suffix": "y"}, "suffix"),
    ("/v1/completions", {"model": "fake-model", "prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ("/v1/completions", {"model": "fake-model", "prompt": []}, "prompt"),
    ("/v1/completions", {"model": "fake-model", "prompt": {"a": 1}}, "prompt"),
    ("/v1/completions", {"model": "fake-model", "prompt": "x" * 300}, "prompt"),  # longer than the context
    ("/v1/chat/interactive", {"prompt": "x" * 300}, "prompt"),
    ("/v1/chat/interactive", {"prompt": ""}, "prompt"),
    ("/v1/chat/interactive", {"prompt": "x", "session_id": -5}, "session_id"),
    ("/v1/chat/interactive", {"prompt": "x", "cancel": True}, "session_id"),
    ("/v1/encode", {"input": 5}, "input"),
    ("/v1/encode", {"input": "RAISE", "do_preprocess": True}, "input"),
    ("/v1/chat/interactive", {"prompt": "RAISE"}, "prompt"),
    # a turn that only ends a session (request_output_len 0) checks its fields too
    ("/v1/chat/interactive", {"prompt": "", "request_output_len": 0, "stop": ""}, "stop"),
    ("/v1/chat/interactive", {"prompt": "", "request_output_len": 0,
                              "response_format": {"type": "regex_schema", "regex_schema": ""}}, "response_format"),
    ("/v1/chat/interactive", {"prompt": [{"role": "tool", "content": "", "audio": {}}], "request_output_len": 0},
     "prompt.0.audio"),
    ("/v1/completions", {"model": "fake-model", "prompt": "x", "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ("/v1/chat/interactive", {"prompt": "x", "min_new_tokens": 5, "request_output_len": 2}, "min_new_tokens"),
    ("/v1/chat/interactive", {"prompt": "x", "min_new_tokens": 2, "response_format": {"type": "json_object"}},
     "min_new_tokens"),
])
def test_bad_requests_elsewhere(client, path, body, param):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_path_and_method(client):
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_api_keys():
    app, _ = make_app(api_keys=("k1", "k2"))
    with TestClient(app) as c:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k1"}, {"Authorization": "Basic k1"}):
            r = c.post("/v1/chat/completions", json=CHAT, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/models").status_code == 401
        for key in ("k1", "k2"):
            assert c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        for open_path in ("/health", "/", "/openapi.json", "/metrics", "/swagger/swagger-ui.css"):
            assert c.get(open_path).status_code == 200, open_path


def test_cors():
    app, _ = make_app(allow_origins=("http://ui.example",), allow_credentials=True)
    with TestClient(app) as c:
        r = c.options("/v1/chat/completions", headers={"Origin": "http://ui.example",
                                                       "Access-Control-Request-Method": "POST"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ui.example"
        assert r.headers["access-control-allow-credentials"] == "true"
        r = c.get("/v1/models", headers={"Origin": "http://ui.example"})
        assert r.headers["access-control-allow-origin"] == "http://ui.example"
        assert "access-control-allow-origin" not in c.get("/v1/models", headers={"Origin": "http://evil"}).headers
    app, _ = make_app()
    with TestClient(app) as c:
        assert "access-control-allow-origin" not in c.get("/v1/models", headers={"Origin": "http://ui.example"}).headers


def test_encode(client):
    assert client.post("/v1/encode", json={"input": "hi"}).json() == {"input_ids": [1, 104, 105], "length": 3}
    assert client.post("/v1/encode", json={"input": "hi", "add_bos": False}).json()["input_ids"] == [104, 105]
    both = client.post("/v1/encode", json={"input": ["a", "bc"], "add_bos": False}).json()
    assert both == {"input_ids": [[97], [98, 99]], "length": [1, 2]}
    pre = client.post("/v1/encode", json={"input": "x", "do_preprocess": True, "add_bos": False}).json()
    assert "".join(map(chr, pre["input_ids"])) == "<user>x</user><assistant>"


def test_interactive_session(client):
    def turn(**body):
        r = client.post("/v1/chat/interactive", json={"session_id": 3, "interactive_mode": True, **body})
        assert r.status_code == 200, r.text
        return r.json()

    first = turn(prompt="Hi", request_output_len=4)
    assert first == {"text": ANSWER[:4], "tokens": 4, "input_tokens": len("<user>Hi</user><assistant>"),
                     "history_tokens": 0, "finish_reason": "length", "session_id": 3, "message": None}
    second = turn(prompt="More")
    assert second["history_tokens"] == first["input_tokens"] + first["tokens"]
    assert second["text"] == ANSWER and second["finish_reason"] == "stop"
    third = turn(prompt="Again", request_output_len=2)
    assert third["history_tokens"] == second["history_tokens"] + second["input_tokens"] + second["tokens"]
    assert client.engine.added[-1][3] == 3  # ran in the engine's session
    lines = client.post("/v1/chat/interactive", json={"session_id": 3, "interactive_mode": True, "prompt": "s",
                                                       "stream": True, "request_output_len": 3})
    assert lines.headers["content-type"].startswith("application/x-ndjson")
    items = [json.loads(x) for x in lines.text.splitlines()]
    assert "".join(i["text"] for i in items) == ANSWER[:3] and [i["tokens"] for i in items] == [1, 2, 3]
    assert items[-1]["finish_reason"] == "length" and items[0]["finish_reason"] is None
    # interactive_mode=false ends the session: the next turn starts from nothing
    ended = client.post("/v1/chat/interactive", json={"session_id": 3, "prompt": "Hi", "request_output_len": 1}).json()
    assert ended["history_tokens"] == 0 and 3 not in client.engine.sessions
    assert client.engine.added[-1][3] is None
    picked = client.post("/v1/chat/interactive", json={"prompt": "Hi", "interactive_mode": True,
                                                       "request_output_len": 1}).json()
    assert picked["session_id"] > 0 and picked["session_id"] in client.engine.sessions
    done = client.post("/v1/chat/interactive", json={"prompt": "", "session_id": picked["session_id"],
                                                     "request_output_len": 0})
    assert done.status_code == 200 and picked["session_id"] not in client.engine.sessions


def test_busy_session_409_and_cancel():
    app, engine = make_app(FakeEngine(step_delay=0.02))
    with serve_in_thread(app) as url:
        body = {"session_id": 9, "interactive_mode": True, "prompt": "Hi", "ignore_eos": True,
                "request_output_len": 200}
        results = {}
        t = threading.Thread(target=lambda: results.setdefault("first", httpx.post(url + "/v1/chat/interactive",
                                                                                    json=body, timeout=60)))
        t.start()
        deadline = time.monotonic() + 10
        while 9 not in engine.engine.busy:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        busy = httpx.post(url + "/v1/chat/interactive", json=body, timeout=10)
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "session_busy"
        chat = httpx.post(url + "/v1/chat/completions", json={**CHAT, "session_id": 9}, timeout=10)
        assert chat.status_code == 409
        cancel = httpx.post(url + "/v1/chat/interactive", json={"session_id": 9, "prompt": "", "cancel": True},
                            timeout=10)
        assert cancel.status_code == 200 and cancel.json()["finish_reason"] == "abort"
        t.join(10)
        first = results["first"].json()
        assert first["finish_reason"] == "abort" and 0 < first["tokens"] < 200
        after = httpx.post(url + "/v1/chat/interactive", json={**body, "request_output_len": 2}, timeout=10).json()
        assert after["finish_reason"] == "length" and after["history_tokens"] > 0  # the session goes on


def test_client_disconnect_aborts_at_once():
    app, engine = make_app(FakeEngine(step_delay=0.02))
    long = {**CHAT, "ignore_eos": True, "max_tokens": 200}
    with serve_in_thread(app) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json={**long, "stream": True}, timeout=30) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 4:
                    break
        wait_until(lambda: not engine.engine.requests)
        assert len(engine.engine.aborted) == 1
        with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up
            httpx.post(url + "/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 200,
                                                      "ignore_eos": True}, timeout=0.3)
        wait_until(lambda: not engine.engine.requests)
        assert len(engine.engine.aborted) == 2
        assert engine.engine.steps < 150  # neither ran to its end


def test_max_concurrent_requests():
    app, engine = make_app(FakeEngine(step_delay=0.02), max_concurrent_requests=1, max_queue_len=0)
    with serve_in_thread(app) as url:
        t = threading.Thread(target=httpx.post, args=(url + "/v1/chat/completions",),
                             kwargs={"json": {**CHAT, "ignore_eos": True, "max_tokens": 50}, "timeout": 30})
        t.start()
        wait_until(lambda: engine.engine.requests)
        r = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert r.headers["retry-after"] == "1"
        assert httpx.get(url + "/v1/models").status_code == 200
        t.join()
        assert httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=10).status_code == 200


def test_max_output_len_caps_what_is_asked_and_what_is_not():
    """--max-output-len: a request that asks for more tokens, or for none, stops at the cap with 'length'; one that
    asks for fewer gets what it asked for; on all three generation routes."""
    app, _ = make_app(max_output_len=5)
    long = {"ignore_eos": True}
    with TestClient(app) as c:
        for asked, got in ((None, 5), (100, 5), (3, 3)):
            limit = {} if asked is None else {"max_tokens": asked}
            chat = c.post("/v1/chat/completions", json={**CHAT, **long, **limit}).json()
            assert chat["usage"]["completion_tokens"] == got and chat["choices"][0]["finish_reason"] == "length"
            done = c.post("/v1/completions", json={"model": "fake-model", "prompt": "Hi", **long,
                                                   "max_tokens": asked}).json()
            assert done["usage"]["completion_tokens"] == got, done
            turn = c.post("/v1/chat/interactive", json={"prompt": "Hi", **long, "request_output_len": asked}).json()
            assert turn["tokens"] == got and turn["finish_reason"] == "length"


def test_health_while_loading_and_after_the_engine_died():
    gate = threading.Event()

    def load():
        gate.wait(10)
        return AsyncEngine(FakeEngine(fail_after=3))

    ready = []
    app = create_app(load, on_ready=ready.append)
    with TestClient(app) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        gate.set()
        wait_until(lambda: ready)
        assert c.get("/health").status_code == 200
        events = sse_events(c.post("/v1/chat/completions", json={**CHAT, "stream": True}).text)
        assert "the fake engine broke" in events[-1]["error"]["message"]  # an error after the stream started
        r = c.get("/health")
        assert r.status_code == 503 and "the fake engine broke" in r.json()["message"]
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 503


def test_loading_failure_is_reported():
    errors = []

    def load():
        raise RuntimeError("out of memory")

    with TestClient(create_app(load, on_error=errors.append)) as c:
        wait_until(lambda: errors)
        r = c.get("/health")
        assert r.status_code == 503 and "out of memory" in r.json()["message"]
    assert "out of memory" in errors[0]


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_engine_dying_under_a_plain_request_is_a_503():
    app, _ = make_app(FakeEngine(fail_after=3))
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and "the fake engine broke" in r.json()["error"]["message"]
        assert c.get("/health").json()["status"] == "error"


def test_body_over_the_limit_is_413(client):
    r = client.post("/v1/completions", content=b'{"model": "fake-model", "prompt": "' + b"x" * (33 << 20) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_control_requests_pass_the_limit_and_busy_sessions_refuse_the_rest():
    """cancel and end-session are not counted against --max-concurrent-requests; ending a busy session is a 409;
    cancel stops every engine request of a completions call that holds the session."""
    app, engine = make_app(FakeEngine(step_delay=0.02), max_concurrent_requests=1)
    with serve_in_thread(app) as url:
        body = {"model": "fake-model", "prompt": ["a", "b"], "max_tokens": 200, "ignore_eos": True, "session_id": 12}
        t = threading.Thread(target=lambda: httpx.post(url + "/v1/completions", json=body, timeout=60))
        t.start()
        wait_until(lambda: len(engine.engine.requests) == 2)
        end = httpx.post(url + "/v1/chat/interactive", json={"prompt": "", "session_id": 12, "request_output_len": 0})
        assert end.status_code in (409, 429)  # busy (and over the limit): refused, nothing ended
        cancel = httpx.post(url + "/v1/chat/interactive", json={"prompt": "", "session_id": 12, "cancel": True})
        assert cancel.status_code == 200
        t.join(30)
        assert not engine.engine.requests and len(engine.engine.aborted) == 2 and engine.engine.steps < 190
        assert httpx.post(url + "/v1/chat/interactive", json={"prompt": "", "session_id": 12,
                                                               "request_output_len": 0}).status_code == 200


class SlowStepEngine(FakeEngine):
    """A step that lasts until the test releases it (a long prefill on a slow CPU); records the order of events."""

    def __init__(self):
        super().__init__()
        self.entered, self.release, self.events = threading.Event(), threading.Event(), []

    def step(self):
        self.entered.set()
        self.release.wait(60)
        self.events.append("step ended")
        return super().step()

    def close(self):
        self.events.append("closed")


def test_close_waits_for_the_step_in_flight():
    # A step still running in torch when the interpreter exits aborts the process ("terminate called without an
    # active exception", exit -6): close() gave up after 5 s, then the engine was closed under a running step.
    engine = SlowStepEngine()
    async_engine = AsyncEngine(engine)

    async def ask():
        async for _ in async_engine.generate([ord("H"), ord("i")]):
            pass

    threading.Thread(target=lambda: asyncio.run(ask()), daemon=True).start()  # never answered: the loop stops
    assert engine.entered.wait(30)
    closer = threading.Thread(target=async_engine.close)
    closer.start()
    closer.join(6)  # longer than the old 5 s limit
    assert closer.is_alive() and engine.events == []  # still waiting, nothing closed under the step
    engine.release.set()
    closer.join(60)
    assert not closer.is_alive() and engine.events == ["step ended", "closed"]


CALLING = 'Sure.<tool_call>\n{"name": "f", "arguments": {"x": [1, "}"]}}\n</tool_call>'


def tool_client():
    app, engine = make_app(FakeEngine(max_len=4096, answer=CALLING))
    client = TestClient(app)
    client.engine = engine.engine
    return client


def test_tool_calls_in_the_answer_and_the_history():
    history = [{"role": "user", "content": "Hi"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 2}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    with tool_client() as client:
        r = client.post("/v1/chat/completions", json={**CHAT, "messages": history, "tools": [TOOL]})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Sure."
        (call,) = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"] == {"name": "f", "arguments": '{"x": [1, "}"]}'}
        prompt = "".join(map(chr, client.engine.added[-1][1]))
        assert prompt.startswith("<system>You can call functions") and '"name": "f"' in prompt  # the tools taught
        assert '<assistant><tool_call>\n{"name": "f", "arguments": {"x": 2}}\n</tool_call></assistant>' in prompt
        assert "<user><tool_response>\n42\n</tool_response></user>" in prompt
        plain = client.post("/v1/chat/completions", json={**CHAT, "tools": [TOOL], "tool_choice": "none"}).json()
        assert plain["choices"][0]["message"] == {"role": "assistant", "content": CALLING}  # none: no parsing
        assert "You can call" not in "".join(map(chr, client.engine.added[-1][1]))


def test_streamed_tool_calls_follow_openais_format():
    with tool_client() as client:
        r = client.post("/v1/chat/completions", json={**CHAT, "tools": [TOOL], "stream": True, "n": 2})
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        for i in (0, 1):
            deltas = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["index"] == i]
            assert "".join(d["delta"].get("content") or "" for d in deltas) == "Sure."
            calls = [d["delta"]["tool_calls"] for d in deltas if "tool_calls" in d["delta"]]
            assert all(len(c) == 1 and c[0]["index"] == 0 for c in calls)  # never an empty array
            first, rest = calls[0][0], [c[0] for c in calls[1:]]
            assert first["id"].startswith("call_") and first["type"] == "function"
            assert first["function"] == {"name": "f", "arguments": ""}
            assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in rest)
            assert "".join(c["function"]["arguments"] for c in rest) == '{"x": [1, "}"]}'
            assert len(rest) > 1  # the arguments stream as they come
            assert deltas[-1]["finish_reason"] == "tool_calls"
            assert all("content" not in d["delta"] for d in deltas if "tool_calls" in d["delta"])


def test_forced_tool_choice_sends_a_grammar_and_parallel_false_keeps_one_call():
    with tool_client() as client:
        for choice in ("required", {"type": "function", "function": {"name": "f"}}):
            r = client.post("/v1/chat/completions", json={**CHAT, "tools": [TOOL], "tool_choice": choice,
                                                          "parallel_tool_calls": False})
            assert r.status_code == 200, r.text
            rules = client.engine.added[-1][2].grammar
            assert "<tool_call>" in rules and '"const": "f"' in rules and "call)*" not in rules
        assert client.post("/v1/chat/completions", json={**CHAT, "tools": [TOOL]}).status_code == 200
        assert client.engine.added[-1][2].grammar is None  # auto: the model decides
    app, _ = make_app(FakeEngine(max_len=4096, answer=CALLING + "<tool_call>{\"name\": \"f\", \"arguments\": {}}"
                                                                "</tool_call>"))
    with TestClient(app) as client:
        both = client.post("/v1/chat/completions", json={**CHAT, "tools": [TOOL]}).json()
        one = client.post("/v1/chat/completions", json={**CHAT, "tools": [TOOL], "parallel_tool_calls": False}).json()
        assert len(both["choices"][0]["message"]["tool_calls"]) == 2
        assert len(one["choices"][0]["message"]["tool_calls"]) == 1


def test_reasoning_goes_to_reasoning_content_streamed_or_not():
    answer = '<think>\nThe user wants f.\n</think>\n\nCalling it.<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    app, _ = make_app(FakeEngine(max_len=4096, answer=answer), reasoning_parser="think")
    with TestClient(app) as client:
        message = client.post("/v1/chat/completions", json={**CHAT, "tools": [TOOL]}).json()["choices"][0]["message"]
        assert message["reasoning_content"] == "The user wants f." and message["content"] == "Calling it."
        assert message["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}
        plain = client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]
        assert plain["content"].startswith("Calling it.<tool_call>")  # no tools: the calls stay text
        r = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in r.text.splitlines()
                  if line.startswith("data: {")]
        assert "".join(d.get("reasoning_content") or "" for d in deltas) == "The user wants f."
        assert "".join(d.get("content") or "" for d in deltas) == plain["content"]
        assert all(not (d.get("reasoning_content") and d.get("content")) for d in deltas)
        kept = client.post("/v1/chat/completions", json={**CHAT, "separate_reasoning": False}).json()
        assert kept["choices"][0]["message"] == {"role": "assistant", "content": answer}  # SGLang's switch
    app, _ = make_app(FakeEngine(max_len=4096, answer=answer))  # no --reasoning-parser: all content
    with TestClient(app) as client:
        message = client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]
        assert message == {"role": "assistant", "content": answer}


def test_a_template_that_renders_tools_gets_them_as_a_variable():
    app, engine = make_app(FakeEngine(max_len=4096, answer=CALLING), chat_template="{% for tool in tools %}{% endfor %}")
    with TestClient(app) as client:
        history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 2}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
        r = client.post("/v1/chat/completions", json={**CHAT, "messages": history, "tools": [TOOL]})
        assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "f"
        prompt = "".join(map(chr, engine.engine.added[-1][1]))
        assert "<tools=[{'type': 'function', 'function': {'name': 'f'" in prompt  # the template's variable
        assert "You can call" not in prompt and "<tool>42</tool>" in prompt  # no system text; the role kept
        assert "<call f {'x': 2}>" in prompt  # earlier arguments as an object, as templates take them


def test_deepseek_r1_reasoning_does_not_swallow_a_forced_answer():
    app, _ = make_app(FakeEngine(max_len=4096, answer='<tool_call>{"name": "f", "arguments": {}}</tool_call>'),
                      reasoning_parser="deepseek_r1")
    with TestClient(app) as client:
        free = client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]
        assert free["reasoning_content"].startswith("<tool_call>") and free["content"] == ""  # never closed
        forced = client.post("/v1/chat/completions", json={**CHAT, "tools": [TOOL], "tool_choice": "required"})
        choice = forced.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and "reasoning_content" not in choice["message"], choice


def test_a_client_gone_before_the_first_event_releases_its_request():
    """ASGI before 2.4: Starlette cancels a stream whose client left before it started; the job still ends (its
    session id free again, the engine request aborted), through the response's background task."""
    app, engine = make_app(FakeEngine(step_delay=0.05))
    body = json.dumps({**CHAT, "stream": True, "session_id": 5}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        await asyncio.sleep(0)  # a real server's send yields: the cancellation lands before the body starts

    async def run():
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)
            state = app.state.server
            for _ in range(200):  # the abort reaches the engine thread
                if engine.engine.aborted:
                    break
                await asyncio.sleep(0.01)
            return state.in_flight, dict(state.sessions_in_use), list(engine.engine.aborted)

    in_flight, sessions, aborted = asyncio.run(run())
    assert in_flight == 0 and sessions == {} and aborted


def test_a_draining_server_takes_no_new_work_and_its_drain_ends_what_runs():
    from servers import serve_in_thread

    fake = FakeEngine(step_delay=0.01, answer="x" * 100_000, max_len=1 << 20)
    engine = AsyncEngine(fake)
    app = create_app(engine)
    with serve_in_thread(app) as url:
        outcomes = {}

        def plain():
            outcomes["plain"] = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=60)

        thread = threading.Thread(target=plain)
        thread.start()
        with httpx.stream("POST", url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=60) as sse, \
                httpx.stream("POST", url + "/v1/chat/interactive", json={"prompt": "hi", "stream": True},
                              timeout=60) as ndjson:
            sse_lines, ndjson_lines = sse.iter_lines(), ndjson.iter_lines()
            next(sse_lines), next(ndjson_lines)
            while len(engine._streams) < 3:  # all three running
                time.sleep(0.01)
            loop = next(iter(engine._streams.values()))[0]
            app.state.server.draining = True
            assert httpx.get(url + "/health").status_code == 503
            r = httpx.post(url + "/v1/completions", json={"model": "fake-model", "prompt": "Hi"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            loop.call_soon_threadsafe(engine.end_all, "the server is shutting down")
            sse_rest = [line for line in sse_lines if line]
            last = json.loads([line for line in ndjson_lines if line][-1])
        thread.join(60)
        assert sse_rest[-1] == "data: [DONE]"
        assert json.loads(sse_rest[-2][6:])["error"]["code"] == "shutting_down"
        assert "shutting down" in json.dumps(last)
        assert outcomes["plain"].status_code == 503
        assert outcomes["plain"].json()["error"]["code"] == "shutting_down"
        deadline = time.monotonic() + 30
        while len(fake.aborted) < 3 or fake.requests:  # aborted on the engine's thread: their KV freed
            assert time.monotonic() < deadline, (fake.aborted, fake.requests)
            time.sleep(0.01)
    engine.close()


def test_405_names_the_allowed_method_and_request_output_len_is_bounded(client):
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["message"]
    r = client.post("/v1/chat/interactive", json={"prompt": "hi", "request_output_len": 10 ** 12})
    assert r.status_code == 400 and r.json()["error"]["param"] == "request_output_len"
    # LMDeploy's APIClient sends 512 by default, past this fake model's 256-token context: the answer stops there
    r = client.post("/v1/chat/interactive", json={"prompt": "hi", "request_output_len": 512})
    assert r.status_code == 200 and r.json()["finish_reason"] == "stop"


def test_past_max_sessions_the_least_recent_idle_session_ends_and_says_so_once():
    fake = FakeEngine()
    app, _ = make_app(fake, max_sessions=2)
    with TestClient(app) as client:
        def turn(sid):
            return client.post("/v1/chat/interactive", json={"prompt": "hi", "session_id": sid,
                                                             "interactive_mode": True})

        for sid in (1, 2, 1, 3):  # 2 is then the least recently used
            assert turn(sid).status_code == 200
        assert sorted(fake.sessions) == [1, 3]
        r = turn(2)
        assert r.status_code == 410 and r.json()["error"]["code"] == "session_expired"
        assert "--max-sessions 2" in r.json()["error"]["message"]
        r = turn(2)  # afresh, which in turn ends 1
        assert r.status_code == 200 and r.json()["history_tokens"] == 0 and sorted(fake.sessions) == [2, 3]
        end = {"prompt": "", "session_id": 3, "interactive_mode": False, "request_output_len": 0}
        assert client.post("/v1/chat/interactive", json=end).status_code == 200
        assert turn(4).status_code == 200 and sorted(fake.sessions) == [2, 4]  # room without ending any


def test_a_session_idle_past_its_ttl_is_ended():
    fake = FakeEngine()
    app, _ = make_app(fake, session_ttl=0.1)
    with TestClient(app) as client:
        turn = {"prompt": "hi", "session_id": 9, "interactive_mode": True}
        assert client.post("/v1/chat/interactive", json=turn).status_code == 200
        deadline = time.monotonic() + 30
        while 9 in fake.sessions:  # ended by the server's own loop
            assert time.monotonic() < deadline, "the idle session was kept"
            time.sleep(0.02)
        r = client.post("/v1/chat/interactive", json=turn)
        assert r.status_code == 410 and "idle for more than 0.1 s" in r.json()["error"]["message"]
        assert client.post("/v1/chat/interactive", json=turn).json()["history_tokens"] == 0


def test_past_max_sessions_with_every_session_busy_is_a_429():
    from servers import serve_in_thread

    app, engine = make_app(FakeEngine(step_delay=0.01, answer="x" * 100_000, max_len=1 << 20), max_sessions=1)
    with serve_in_thread(app) as url:
        busy = {"prompt": "hi", "session_id": 1, "interactive_mode": True, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/interactive", json=busy, timeout=60) as s:
            lines = s.iter_lines()
            next(lines)
            r = httpx.post(url + "/v1/chat/interactive", json={"prompt": "hi", "session_id": 2,
                                                               "interactive_mode": True})
            assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_sessions"
            assert r.headers["retry-after"] == "1"
    engine.close()


def test_past_the_limit_requests_wait_their_turn_then_429_or_503():
    app, engine = one_place(max_queue_len=1, queue_timeout=60)
    with serve_in_thread(app) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=60) as first:
            lines = first.iter_lines()
            next(lines)  # the one place is taken
            second = []
            t = threading.Thread(target=lambda: second.append(httpx.post(
                url + "/v1/chat/completions", json={**CHAT, "max_tokens": 3}, timeout=60)))
            t.start()
            wait_until(lambda: find_admission(app).waiters)  # queued before its body was read
            r = httpx.post(url + "/v1/completions", json={"model": "fake-model", "prompt": "Hi"})
            assert r.status_code == 429 and r.headers["retry-after"] == "1" and "--max-queue-len" in r.text
            assert announced_too_big(url).startswith(b"HTTP/1.1 413")  # refused before a byte of the body
            assert not second
        t.join(60)  # the first stream closed: its place went to the waiting request
        assert second[0].status_code == 200 and second[0].json()["choices"][0]["message"]["content"] == "xxx"
        assert find_admission(app).admitted == 0
    engine.close()


def test_a_wait_past_the_queue_timeout_is_a_503():
    app, engine = one_place(queue_timeout=0)
    with serve_in_thread(app) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=60) as first:
            lines = first.iter_lines()
            next(lines)
            r = httpx.post(url + "/v1/chat/completions", json=CHAT)
            assert r.status_code == 503 and r.json()["error"]["code"] == "queue_timeout" and r.headers["retry-after"]
            cancel = httpx.post(url + "/v1/chat/interactive", json={"prompt": "", "session_id": 5, "cancel": True})
            assert cancel.status_code == 200  # a control turn is never held back
    engine.close()


def one_place(**options):
    """An app with room for one request at a time, whose answers run for 1000 s unless ended."""
    return make_app(FakeEngine(step_delay=0.01, answer="x" * 100_000, max_len=1 << 20), max_concurrent_requests=1,
                    **options)


def find_admission(app):
    from lmcli.serve.admission import Admission

    layer = app.middleware_stack
    while not isinstance(layer, Admission):
        layer = layer.app
    return layer


def announced_too_big(url: str) -> bytes:
    """The start of the answer to a POST that announces a 64 MiB body and sends none of it."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(64 << 20).encode() + b"\r\n\r\n")
        return sock.recv(4096)


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing():
    fake = FakeEngine()
    calls = []
    encode = fake.tokenizer.encode
    fake.tokenizer.encode = lambda text, **kw: calls.append(len(text)) or encode(text, **kw)
    app, _ = make_app(fake)
    with TestClient(app) as client:
        app.state.server.max_token_chars = 4  # 256 tokens of the fake context hold at most 1024 characters
        long = "x" * 1100
        for route, body, field in (
                ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
                    {"type": "text", "text": long}]}]}, "messages"),
                ("/v1/completions", {"model": "fake-model", "prompt": [long]}, "prompt"),
                ("/v1/chat/interactive", {"prompt": long}, "prompt")):
            r = client.post(route, json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
            assert "1100 characters" in r.json()["error"]["message"]
        # what the chat template adds to the prompt counts too: earlier calls' arguments, the tools' definitions
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": long}}
        tool = {"type": "function", "function": {"name": "f", "description": long, "parameters": {"type": "object"}}}
        for body in ({**CHAT, "messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": None, "tool_calls": [call]},
                                           {"role": "tool", "tool_call_id": "c1", "content": "ok"}]},
                     {**CHAT, "tools": [tool]}):
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert not calls  # never tokenized
        assert client.post("/v1/completions", json={"model": "fake-model", "prompt": "x" * 100}).status_code == 200


def test_a_request_past_the_request_timeout_ends_and_frees_its_blocks():
    fake = FakeEngine(step_delay=0.01, answer="x" * 100_000, max_len=1 << 20)
    app, engine = make_app(fake, request_timeout=0.2)  # the answer would take 1000 s
    with serve_in_thread(app) as url:
        r = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        assert "--request-timeout" in r.json()["error"]["message"]
        with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                "model": "fake-model", "prompt": ["a", "b"], "max_tokens": None, "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["code"] == "request_timeout"
        wait_until(lambda: len(fake.aborted) == 3 and not fake.requests)
    engine.close()


def test_when_the_drain_begins_the_queued_get_503_at_once():
    app, engine = one_place(queue_timeout=600)
    with serve_in_thread(app) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=60) as first:
            lines = first.iter_lines()
            next(lines)
            queued = []
            t = threading.Thread(target=lambda: queued.append(httpx.post(url + "/v1/chat/completions", json=CHAT,
                                                                          timeout=60)))
            t.start()
            wait_until(lambda: find_admission(app).waiters)
            loop = next(iter(engine._streams.values()))[0]
            loop.call_soon_threadsafe(app.state.server.drained)
            t.join(60)  # not the queue's 600 s, nor the first answer's end
            assert queued[0].status_code == 503 and queued[0].json()["error"]["code"] == "shutting_down"
            assert find_admission(app).admitted == 1  # the first still holds its place
    engine.close()


def test_echo_of_token_ids_outside_the_vocabulary_is_a_400(client):
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": [10 ** 12], "echo": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # found by schemathesis: it was a 500


def test_the_request_timeout_counts_from_the_requests_arrival():
    """--request-timeout bounds the whole request: time spent before the engine started it (queued, read,
    tokenized) counts. Here an outer layer says the request came in 601 s ago, with a limit of 600 s: the answer,
    which would take 0.03 s, ends at once with the timeout."""
    import time

    app, engine = make_app(FakeEngine(answer="abc"), request_timeout=600)

    async def late(scope, receive, send):
        if scope["type"] == "http" and (b"x-late", b"1") in scope["headers"]:
            scope.setdefault("state", {})["arrival"] = time.monotonic() - 601
        await app(scope, receive, send)

    with TestClient(late) as c:
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200  # the same request, arrived now
        for path, body in (("/v1/chat/completions", CHAT), ("/v1/chat/interactive", {"prompt": "hi"}),
                           ("/v1/completions", {"model": "fake-model", "prompt": "Hi"})):
            r = c.post(path, json=body, headers={"x-late": "1"})
            assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", (path, r.text)
    engine.close()


def test_an_interactive_turn_is_admitted_before_its_long_body_is_read():
    """At most 64 KiB of an interactive body are read to tell a control turn (cancel, end of session) from a turn
    to admit: with the one place taken and no queue, a long turn is a 429 before the rest of its body arrives."""
    import asyncio

    app, engine = one_place(max_queue_len=0)
    app.middleware_stack = app.build_middleware_stack()
    admission = find_admission(app)
    admission.admitted = 1  # the one place is taken
    sent, rest = [], asyncio.Event()

    async def run():
        chunks = [{"type": "http.request", "body": b'{"prompt": "' + b"x" * (100 << 10), "more_body": True}]

        async def receive():
            if chunks:
                return chunks.pop(0)
            await rest.wait()  # the rest of the body never comes
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/interactive", "headers": [], "query_string": b"",
                 "scheme": "http", "server": ("test", 80), "root_path": "", "http_version": "1.1"}
        await asyncio.wait_for(admission(scope, receive, send), 60)

    asyncio.run(run())
    assert sent[0]["status"] == 429 and any(b"--max-queue-len" in m.get("body", b"") for m in sent[1:])
    engine.close()
