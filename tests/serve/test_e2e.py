"""The real server (`lm serve api_server`) on the real SmolLM2 workspace, on a real socket, through clients no one
here wrote (the openai SDK, curl) and through APIClient."""

import asyncio
from concurrent.futures import ThreadPoolExecutor
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest

from conftest import REPO
from lmcli.serve.api_client import APIClient, APIClientError
from servers import LmServer

MODEL = "SmolLM2-135M-Instruct"
MAX_OUTPUT = 200
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2_workspace, tmp_path_factory):
    # --max-output-len: the docs' examples sample without a limit, and a small model at temperature 0.8 can ramble
    # to the end of its 8192-token context (minutes on a slow CPU)
    s = LmServer(smollm2_workspace, "--dtype", "bfloat16", "--max-output-len", str(MAX_OUTPUT),
                 log_dir=tmp_path_factory.mktemp("log"))
    try:
        yield s.wait_ready()
    finally:
        assert s.stop() in (0, 130) and "Traceback" not in s.stderr(), s.stderr()  # 130: stopped by Ctrl-C


@pytest.fixture
def sdk(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def metrics(server) -> dict:
    text = httpx.get(server.url + "/metrics").text
    return {m[0]: float(m[1]) for m in re.findall(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def pool_is_full(server, timeout: float = 10) -> dict:
    """Every KV block back in the pool and nothing running (waits a moment for aborts to land)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if m["lm_kv_cache_blocks_used"] == 0 and m["lm_requests_running"] == 0 and m["lm_requests_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.1)


def test_startup_line_names_the_url(server):
    assert f"is ready at {server.url} (open it in a browser" in server.stderr()
    assert httpx.get(server.url + "/").status_code == 200


def test_chat_with_the_openai_sdk(sdk):
    assert [m.id for m in sdk.models.list()] == [MODEL]
    r = sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=32)
    text = r.choices[0].message.content
    assert "Paris" in text and r.choices[0].finish_reason == "stop" and r.object == "chat.completion"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=32)
    assert again.choices[0].message.content == text
    assert again.usage.prompt_tokens_details.cached_tokens == 0  # the prompt is shorter than one block
    stream = sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=32, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    capped = sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=3)
    assert capped.choices[0].finish_reason == "length" and capped.usage.completion_tokens == 3
    assert text.startswith(capped.choices[0].message.content)


def test_stop_seed_n_and_logprobs(sdk):
    base = sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=32)
    text = base.choices[0].message.content
    word = text.split()[3]
    stopped = sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=32, stop=[word])
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].message.content == text[:text.index(word)]
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Write a poem."}], temperature=1.0, max_tokens=16)
    a = sdk.chat.completions.create(**ask, seed=7, n=2)
    b = sdk.chat.completions.create(**ask, seed=7, n=2)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content  # n choices differ
    lp = sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=5, logprobs=True,
                                     top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.token == t.top_logprobs[0].token and t.logprob <= 0 for t in content)  # greedy: the most likely
    assert "".join(t.token for t in content) == lp.choices[0].message.content


def test_logit_bias_bans_and_forces_tokens(sdk, server):
    def one_id(text):
        r = httpx.post(server.url + "/v1/encode", json={"input": text, "add_bos": False}, timeout=30).json()
        assert r["length"] == 1, r
        return r["input_ids"][0]

    ask = dict(model=MODEL, messages=FRANCE, temperature=0, max_tokens=3, logprobs=True)
    first = sdk.chat.completions.create(**ask).choices[0].logprobs.content[0].token
    banned = sdk.chat.completions.create(**ask, logit_bias={str(one_id(first)): -100})
    assert banned.choices[0].logprobs.content[0].token != first
    forced = sdk.chat.completions.create(**ask, logit_bias={str(one_id(" banana")): 100})
    assert [t.token for t in forced.choices[0].logprobs.content] == [" banana"] * 3
    sampled = sdk.completions.create(model=MODEL, prompt="Fruit:", max_tokens=2, temperature=1.0, seed=1,
                                     logit_bias={str(one_id(" banana")): 100})
    assert sampled.choices[0].text.split() == ["banana", "banana"]
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        sdk.chat.completions.create(**ask, logit_bias={"49152": 5})  # past the vocabulary


def test_developer_role_and_names_with_the_openai_sdk(sdk):
    def greedy(messages):
        r = sdk.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
        return r.choices[0].message.content

    rule = "Answer in one word."
    as_system = greedy([{"role": "system", "content": rule}, *FRANCE])
    assert greedy([{"role": "developer", "content": rule}, *FRANCE]) == as_system  # rendered as system
    named = greedy([{"role": "user", "content": "What is my name?", "name": "Ada"}])
    assert named == greedy([{"role": "user", "content": "Ada: What is my name?"}])  # SmolLM2's template has no name
    refused = [*FRANCE, {"role": "assistant", "content": None, "refusal": "I cannot say."},
               {"role": "user", "content": "Why not?"}]
    assert greedy(refused) == greedy([*FRANCE, {"role": "assistant", "content": "I cannot say."}, refused[-1]])
    with pytest.raises(openai.BadRequestError, match="text only"):
        greedy([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/cat.png"}}]}])


def test_lmdeploys_own_api_client(server, lmdeploy_api_client):
    # LMDeploy 0.9's APIClient posts every argument of its methods, defaults included, and its **kwargs as a field
    client = lmdeploy_api_client.APIClient(server.url)
    assert client.available_models == [MODEL]
    (chat,) = client.chat_completions_v1(MODEL, FRANCE, temperature=0, max_tokens=8)
    assert "Paris" in chat["choices"][0]["message"]["content"], chat
    chunks = list(client.chat_completions_v1(MODEL, FRANCE, temperature=0, max_tokens=8, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == \
        chat["choices"][0]["message"]["content"]
    (done,) = client.completions_v1(MODEL, "The capital of France is", temperature=0, max_tokens=4)
    assert done["choices"][0]["text"] and done["usage"]["completion_tokens"] == 4, done
    turns = [t for t in client.chat_interactive_v1("What is the capital of France?", session_id=77,
                                                   interactive_mode=True, temperature=0, request_output_len=8)]
    assert "Paris" in turns[-1]["text"] and turns[-1]["finish_reason"] in ("stop", "length"), turns
    client.end_session(77)
    ids, length = client.encode("Hello")
    assert length == len(ids) > 0
    (refused,) = client.chat_completions_v1(MODEL, FRANCE, max_tokens=4, tools_missing=1)  # into its kwargs
    assert refused["error"]["param"] == "kwargs", refused


def test_completions_with_the_openai_sdk(sdk):
    r = sdk.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8)
    assert r.object == "text_completion" and "Paris" in r.choices[0].text
    many = sdk.completions.create(model=MODEL, prompt=["One, two,", "A, B,"], temperature=0, max_tokens=4, n=2,
                                  echo=True)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text.startswith("One, two,") and many.choices[2].text.startswith("A, B,")
    assert many.choices[0].text == many.choices[1].text  # greedy
    ids = httpx.post(str(sdk.base_url) + "encode", json={"input": "The capital of France is",
                                                                  "add_bos": False}).json()["input_ids"]
    by_ids = sdk.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=8)
    assert by_ids.choices[0].text == r.choices[0].text
    chunks = list(sdk.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8,
                                         stream=True, logprobs=2))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks) == 8


class Person(pydantic.BaseModel):  # strings bounded: a small model may otherwise stay in one until max_tokens
    name: str = pydantic.Field(max_length=30)
    age: int
    city: Literal["Paris", "Rome", "Oslo"]


def test_structured_output_with_the_openai_sdk(sdk, server):
    ask = [{"role": "user", "content": "Describe a person who lives in Europe."}]
    parsed = sdk.chat.completions.parse(model=MODEL, messages=ask, response_format=Person, temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, Person) and parsed.choices[0].finish_reason == "stop"
    schema = Person.model_json_schema()
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    both = sdk.chat.completions.create(model=MODEL, messages=ask, response_format=response_format, n=2,
                                       temperature=1.0, seed=3, max_tokens=80)
    streamed = sdk.chat.completions.create(model=MODEL, messages=ask, response_format=response_format, n=2,
                                           temperature=1.0, seed=4, max_tokens=80, stream=True)
    texts = ["", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    texts += [c.message.content for c in both.choices]
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
    regex = {"type": "regex_schema", "regex_schema": "1[89][0-9]{2}"}  # LMDeploy's, on /v1/completions as vLLM
    year = sdk.completions.create(model=MODEL, prompt="The year the Eiffel Tower was finished:", max_tokens=8,
                                  extra_body={"response_format": regex})
    assert re.fullmatch("1[89][0-9]{2}", year.choices[0].text), year.choices[0].text
    anything = sdk.chat.completions.create(model=MODEL, messages=ask, response_format={"type": "json_object"},
                                           temperature=0, max_tokens=100)
    assert isinstance(json.loads(anything.choices[0].message.content), dict)
    unenforceable = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError, match="uniqueItems") as e:
        sdk.chat.completions.create(model=MODEL, messages=ask, response_format=unenforceable)
    assert e.value.body["param"] == "response_format"
    pool_is_full(server)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city today.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone.",
                                         "parameters": {"type": "object", "properties": {"zone": {"type": "string",
                                                                                                 "maxLength": 30}},
                                                        "required": ["zone"]}}}


def test_tool_calls_with_the_openai_sdk(sdk, server):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        # one call: a small model offered more keeps calling until max_tokens
        done = sdk.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER, TIME], tool_choice=choice,
                                           temperature=0, max_tokens=120, parallel_tool_calls=False)
        c = done.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.tool_calls, c
        for call in c.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        if isinstance(choice, dict):
            assert {call.function.name for call in c.message.tool_calls} == {"get_weather"}
        stream = sdk.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER, TIME], tool_choice=choice,
                                             temperature=0, max_tokens=120, stream=True, parallel_tool_calls=False)
        calls, reasons = {}, []
        for chunk in stream:
            for ch in chunk.choices:
                reasons.append(ch.finish_reason)
                for d in ch.delta.tool_calls or []:
                    if d.id:
                        calls[d.index] = [d.function.name, ""]
                    calls[d.index][1] += d.function.arguments or ""
        assert "tool_calls" in reasons and calls
        assert [[call.function.name, call.function.arguments] for call in c.message.tool_calls] == \
            [calls[i] for i in sorted(calls)]  # greedy: the same calls, streamed or not
    first = c.message.tool_calls[0]
    answer = sdk.chat.completions.create(model=MODEL, temperature=0, max_tokens=40, tools=[WEATHER], messages=ask + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": first.id, "type": "function", "function": {"name": first.function.name,
                                                              "arguments": first.function.arguments}}]},
        {"role": "tool", "tool_call_id": first.id, "content": '{"temperature": 21, "sky": "sunny"}'}])
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls
    pool_is_full(server)


def test_api_client_sends_structured_output_and_tools(server):
    client = APIClient(server.url)
    schema = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
              "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"}}}
    shape = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    (done,) = client.chat_completions_v1(MODEL, "Describe a person.", temperature=0, max_tokens=80,
                                         response_format=shape)
    jsonschema.validate(json.loads(done["choices"][0]["message"]["content"]), schema)
    (called,) = client.chat_completions_v1(MODEL, "Weather in Rome?", temperature=0, max_tokens=80, tools=[WEATHER],
                                           tool_choice="required", parallel_tool_calls=False)
    call = called["choices"][0]["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"])["city"]
    (turn,) = client.chat_interactive_v1("Describe a dog.", temperature=0, request_output_len=200,
                                         response_format={"type": "json_object"})
    assert isinstance(json.loads(turn["text"]), dict), turn


def test_errors_with_the_openai_sdk(sdk, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        sdk.chat.completions.create(model="gpt-4", messages=FRANCE)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=3)
    with pytest.raises(openai.BadRequestError, match="context holds 8192"):
        sdk.completions.create(model=MODEL, prompt=[1] * 9000)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        sdk.chat.completions.create(model=MODEL, messages=FRANCE, logit_bias={"1": 500.0})  # out of [-100, 100]
    with pytest.raises(openai.BadRequestError, match=r"token ids must be in \[0, 49152\)"):
        sdk.completions.create(model=MODEL, prompt=[1, 10**6])
    # values that once reached torch unchecked and killed the engine loop for everyone
    with pytest.raises(openai.BadRequestError, match="seed"):
        sdk.chat.completions.create(model=MODEL, messages=FRANCE, seed=2**64, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="stop_token_ids"):
        sdk.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=3,
                                    extra_body={"min_tokens": 2, "stop_token_ids": [10**8]})
    greedy = sdk.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=6, temperature=0)
    tiny = sdk.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=6, temperature=1e-40)
    assert tiny.choices[0].message.content == greedy.choices[0].message.content  # as greedy, not NaN
    huge_k = sdk.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=6, extra_body={"top_k": 2**63})
    assert huge_k.choices[0].message.content
    bad = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": ', timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    pool_is_full(server)


def test_interactive_session_keeps_its_cache(server):
    client = APIClient(server.url)
    sid, turns = 41, []
    for prompt in ["My name is Ada. Remember it.", "What is my name?", "Say it again.", "Thanks!"]:
        before = metrics(server)["lm_computed_tokens_total"]
        (r,) = client.chat_interactive_v1(prompt, session_id=sid, interactive_mode=True, request_output_len=24,
                                          temperature=0)
        computed = metrics(server)["lm_computed_tokens_total"] - before
        turns.append(r)
        history = sum(t["input_tokens"] + t["tokens"] for t in turns[:-1])
        assert r["history_tokens"] == history and r["session_id"] == sid
        # only this turn's tokens ran: its prompt (and the last answer's final token, never fed back until now)
        assert computed == r["input_tokens"] + r["tokens"] - (1 if len(turns) == 1 else 0), (computed, r)
    # the kept history reads as the conversation: a stateless request resending it answers the same
    prompts = ["My name is Ada. Remember it.", "What is my name?"]
    messages = [{"role": "user", "content": prompts[0]}, {"role": "assistant", "content": turns[0]["text"]},
                {"role": "user", "content": prompts[1]}]
    (stateless,) = client.chat_completions_v1(MODEL, messages, temperature=0, max_tokens=24)
    assert stateless["choices"][0]["message"]["content"] == turns[1]["text"]
    assert stateless["usage"]["prompt_tokens"] == turns[1]["history_tokens"] + turns[1]["input_tokens"]
    streamed = list(client.chat_interactive_v1("And once more?", session_id=sid, interactive_mode=True, stream=True,
                                               request_output_len=8, temperature=0))
    assert streamed[-1]["finish_reason"] in ("stop", "length") and [s["tokens"] for s in streamed][-1] <= 8
    assert metrics(server)["lm_kv_cache_blocks_used"] > 0 and metrics(server)["lm_sessions"] == 1
    client.end_session(sid)
    m = pool_is_full(server)
    assert m["lm_sessions"] == 0


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_engine_options_full_session_and_busy(smollm2_workspace, tmp_path):
    (tmp_path / "chatml.jinja").write_text(CHATML)
    s = LmServer(smollm2_workspace, "--dtype", "bfloat16", "--session-len", "96", "--model-name", "tiny",
                 "--meta-instruction", "You are a pirate.", "--chat-template", tmp_path / "chatml.jinja",
                 "--max-batch-size", "2", "--cache-block-seq-len", "16", "--disable-prefix-caching",
                 "--max-prefill-token-num", "32", "--cache-max-entry-count", "0.05", log_dir=tmp_path).wait_ready()
    try:
        client = APIClient(s.url)
        assert httpx.get(s.url + "/v1/models").json()["data"][0] | {"created": 0} == {
            "id": "tiny", "object": "model", "created": 0, "owned_by": "lm", "max_model_len": 96}
        rendered, _ = client.encode("Hi", do_preprocess=True, add_bos=False)
        text = "<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        assert rendered == client.encode(text, add_bos=False)[0]

        def ask(i):  # prompts longer than --max-prefill-token-num: prefilled in chunks
            return next(client.chat_completions_v1("tiny", f"Number {i}: " + "tell me more " * 8, max_tokens=12,
                                                   ignore_eos=True))

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(ask, i) for i in range(4)]
            seen = []
            while not all(f.done() for f in futures):
                m = metrics(s)
                seen.append((m["lm_requests_running"], m["lm_requests_waiting"]))
                time.sleep(0.02)
            answers = [f.result() for f in futures]
        assert max(r for r, _ in seen) == 2 and max(w for _, w in seen) >= 1  # --max-batch-size 2
        assert all(a["usage"]["completion_tokens"] == 12 for a in answers)
        m = metrics(s)
        assert m["lm_prefix_cache_queries_tokens_total"] == 0 and m['lm_requests_total{endpoint="chat",finish_reason="length"}'] == 4
        reasons = []
        for _ in range(5):
            (r,) = client.chat_interactive_v1("Tell me a long story.", session_id=5, interactive_mode=True,
                                              request_output_len=30, temperature=0)
            reasons.append(r["finish_reason"])
            assert r["history_tokens"] >= 0 and r["tokens"] >= 0
            if r["message"]:
                break
        assert r["finish_reason"] == "length" and "session" in r["message"]  # full at the start or mid-answer
        with httpx.stream("POST", s.url + "/v1/chat/interactive", timeout=60, json={
                "prompt": "Count to a thousand.", "session_id": 6, "interactive_mode": True, "stream": True,
                "ignore_eos": True, "request_output_len": 60}) as running:
            lines = running.iter_lines()
            first = json.loads(next(lines))
            assert first["tokens"] == 1 and first["finish_reason"] is None, first
            with pytest.raises(APIClientError) as busy:
                next(client.chat_interactive_v1("Hi", session_id=6, interactive_mode=True))
            assert busy.value.status == 409
            cancelled = client.cancel(6)
            assert cancelled["finish_reason"] == "abort"
            last = json.loads(list(lines)[-1])
            assert last["finish_reason"] == "abort" and last["tokens"] < 60
        (after,) = client.chat_interactive_v1("Hi", session_id=6, interactive_mode=True, request_output_len=4)
        assert after["history_tokens"] > 0  # the cancelled turn's tokens stayed in the history
        client.end_session(5)
        client.end_session(6)
        pool_is_full(s)
    finally:
        s.stop()


def test_many_streams_some_leaving_and_a_responsive_server(server):
    """64 streaming requests at once, 10 of which disconnect midway: the rest finish, /health and /v1/models keep
    answering while tokens stream (counted between streamed chunks, not timed: a slow CPU is not a failure), and
    afterwards every KV block is back in the pool."""
    streaming = [0]  # streams that have had a token and have not ended

    async def one(client, i):
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Tell me about the number {i}."}],
                "max_tokens": 48, "ignore_eos": True, "stream": True}
        chunks = []
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            try:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        chunks.append(line[6:])
                        streaming[0] += len(chunks) == 1
                        if i < 10 and len(chunks) == 5:
                            return "left"
            finally:
                streaming[0] -= bool(chunks)
        assert chunks[-1] == "[DONE]"
        return json.loads(chunks[-2])["choices"][0]["finish_reason"]

    async def probe(client, answered, done):
        while not done.is_set():
            for path in ("/health", "/v1/models"):
                started_during = streaming[0] > 0
                assert (await client.get(path)).status_code == 200
                answered.append(started_during and streaming[0] > 0)  # sent and answered mid-stream
            await asyncio.sleep(0.05)

    async def main():
        answered, done = [], asyncio.Event()
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client, \
                httpx.AsyncClient(base_url=server.url, timeout=10) as prober:
            probing = asyncio.create_task(probe(prober, answered, done))
            results = await asyncio.gather(*(one(client, i) for i in range(64)))
            done.set()
            await probing
        return results, answered

    results, answered = asyncio.run(main())
    assert results[:10] == ["left"] * 10 and results[10:] == ["length"] * 54
    assert sum(answered) >= 10, answered
    m = pool_is_full(server)
    assert m['lm_requests_total{endpoint="chat",finish_reason="abort"}'] >= 10


def test_docs_curl_examples(server):
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "docs" / "api.md").read_text(), re.S)
    curls = [b for b in blocks if b.lstrip().startswith("curl")]
    assert len(curls) >= 7
    for block in curls:
        done = subprocess.run(["bash", "-c", "set -e\n" + block.replace("127.0.0.1:23333", server.url[7:])],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (block, done.stderr)
        out = done.stdout.strip()
        assert '"error"' not in out and out, (block, out)
        if out.startswith("data: "):  # a stream
            events = [line[6:] for line in out.splitlines() if line]
            assert events[-1] == "[DONE]" and all(json.loads(e)["id"] for e in events[:-1])
            continue
        decoder, rest = json.JSONDecoder(), out
        while rest.startswith("{"):  # one JSON object per curl, then maybe /metrics text
            _, end = decoder.raw_decode(rest)
            rest = rest[end:].lstrip()
        assert not rest or "lm_kv_cache_blocks_total" in rest, rest[:200]
    pool_is_full(server)


def test_max_output_len_ends_an_answer_that_asked_for_no_limit(server):
    turn = httpx.post(server.url + "/v1/chat/interactive", json={"prompt": "Count to a thousand.", "ignore_eos": True},
                      timeout=300).json()
    assert turn["tokens"] == MAX_OUTPUT and turn["finish_reason"] == "length", turn
    chat = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": FRANCE, "max_tokens": 5,
                                                                 "ignore_eos": True}, timeout=300).json()
    assert chat["usage"]["completion_tokens"] == 5, chat


def test_docs_python_examples(server):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "api.md").read_text(), re.S)
    assert len(blocks) >= 5
    for block in blocks:
        done = subprocess.run([sys.executable, "-c", block.replace("127.0.0.1:23333", server.url[7:])],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (block, done.stderr)
        assert done.stdout.strip(), block
    seed_chat = subprocess.run([sys.executable, "-c", blocks[0].replace("127.0.0.1:23333", server.url[7:])],
                               capture_output=True, text=True, timeout=300).stdout
    assert "'object': 'chat.completion'" in seed_chat


@pytest.mark.skipif(shutil.which("java") is None, reason="openapi-generator needs a Java runtime")
def test_openapi_generator_makes_working_clients(server, tmp_path):
    """The real openapi-generator makes Java, Go and Rust clients from /openapi.json, and a Python one that we
    then use against the server."""
    schema = tmp_path / "openapi.json"
    schema.write_text(httpx.get(server.url + "/openapi.json").text)
    generator = [sys.executable, "-m", "openapi_generator_cli"] if not shutil.which("openapi-generator-cli") \
        else ["openapi-generator-cli"]
    done = subprocess.run([*generator, "validate", "-i", schema], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "No validation issues" in done.stdout, done.stdout + done.stderr
    for lang, model_file in (("java", "ChatCompletionRequest.java"), ("go", "model_chat_completion_request.go"),
                             ("rust", "chat_completion_request.rs"), ("python", "chat_completion_request.py")):
        out = tmp_path / lang
        done = subprocess.run([*generator, "generate", "-i", schema, "-g", lang, "-o", out, "--package-name",
                               "lmapi"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert list(out.rglob(model_file)), lang
    script = f"""
import lmapi
from lmapi.models import ChatCompletionRequest, InteractiveRequest, EncodeRequest
with lmapi.ApiClient(lmapi.Configuration(host={server.url!r})) as c:
    api = lmapi.DefaultApi(c)
    print(api.list_models().data[0].id)
    r = api.create_chat_completion(ChatCompletionRequest.from_dict({{"model": {MODEL!r}, "max_tokens": 16,
        "temperature": 0, "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}))
    print(r.choices[0].message.content, r.usage.completion_tokens)
    print(api.chat_interactive(InteractiveRequest.from_dict({{"prompt": "Hi", "request_output_len": 4}})).tokens)
    print(api.encode(EncodeRequest.from_dict({{"input": "hi", "add_bos": False}})).length.actual_instance)
    print(api.health().status)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path / "python", capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == MODEL and "Paris" in lines[1] and lines[2:] == ["4", "1", "ok"]


def test_an_interrupted_turn_keeps_the_session_readable(server):
    """A turn cancelled while its long prompt is still being prefilled (no token yet) still joined the session's
    history in the engine; the next turn must continue that history, not start a second conversation in it."""
    client = APIClient(server.url)
    sid = 77
    (first,) = client.chat_interactive_v1("Hi, I am Ada.", session_id=sid, interactive_mode=True,
                                          request_output_len=8, temperature=0)
    long_prompt = "Summarize this: " + "the quick brown fox jumps over the lazy dog " * 500  # three prefill steps
    results = []
    turn = threading.Thread(target=lambda: results.extend(client.chat_interactive_v1(
        long_prompt, session_id=sid, interactive_mode=True, request_output_len=8)))
    turn.start()
    deadline = time.monotonic() + 30
    while metrics(server)["lm_requests_running"] == 0:  # its first prefill chunk is running
        assert time.monotonic() < deadline
        time.sleep(0.02)
    client.cancel(sid)
    turn.join(60)
    (cut,) = results
    assert cut["finish_reason"] == "abort" and cut["tokens"] == 0
    (third,) = client.chat_interactive_v1("Thanks!", session_id=sid, interactive_mode=True, request_output_len=4,
                                          temperature=0)
    assert third["history_tokens"] == first["input_tokens"] + first["tokens"] + cut["input_tokens"]
    alone = client.encode("<|im_end|>\n<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n", add_bos=False)
    assert third["input_tokens"] == alone[1]  # a continuation, not a conversation rendered afresh
    client.end_session(sid)
    pool_is_full(server)


def test_logprob_bytes_rebuild_multibyte_characters(smollm2_workspace):
    from lmcli.serve.openai_format import token_bytes
    from lmcli.workspace import Workspace

    tok = Workspace.load(smollm2_workspace).tokenizer()
    for text in ["👌👌 fine", "héllo wörld", "日本語のテキスト"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert any("\ufffd" in tok.decode([i]) for i in ids) or text == "héllo wörld"
        assert b"".join(token_bytes(tok, i) for i in ids).decode() == text


def test_a_megabyte_prompt_is_refused_without_tokenizing_it(server):
    """SmolLM2's context (8192 tokens) at its vocabulary's longest token cannot hold 1 MB of text: a 400 from the
    character count, not from tokenizing a megabyte first."""
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": "word " * 200_000}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "1000000 characters" in r.json()["error"]["message"], r.text
    assert httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": FRANCE, "max_tokens": 2}).status_code == 200
