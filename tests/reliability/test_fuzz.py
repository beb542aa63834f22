"""Schemathesis over /openapi.json (issue: reliability): generated requests, valid and invalid, on a real socket,
first over the fake engine (the HTTP layer, many cases), then over the real model (fewer, each answer cut short).
The same cases every run; LM_SOAK=1 draws new ones, ten times as many. Each answer is checked: no 5xx, the
documented status codes and content types, the response body against its schema, a schema-violating request
refused, a schema-valid one accepted unless it breaks a rule between fields (which OpenAPI 3.0 cannot state), 405
with Allow. A request that hangs fails by the client's timeout."""

import json
import os
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import schemathesis
from schemathesis import Case, Response
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.converter import to_json_schema
from schemathesis.specs.openapi.checks import (allow_header_conformance, content_type_conformance,
                                               negative_data_rejection, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serve"))
from fake_engine import FakeEngine  # noqa: E402
from lmcli.engine.async_engine import AsyncEngine  # noqa: E402
from lmcli.serve.api_server import create_app  # noqa: E402
from servers import LmServer, serve_in_thread  # noqa: E402


# The rules a schema-valid request can still break, by the exact field its 400 names (indexes as N): rules between
# fields, and what only the model knows (its vocabulary, whether it fills in the middle), or a JSON schema or regex
# that cannot be enforced. Each is in the field's description in /openapi.json.
SAMPLING = {"logit_bias",  # token ids in the vocabulary
            "stop_token_ids",  # the same
            "response_format"}  # a schema or regex that can be enforced
OPENAI = SAMPLING | {"stream_options",  # needs stream
                     "min_tokens", "min_new_tokens"}  # at most max_tokens, not with structured output; the same
BETWEEN_FIELDS = {
    "/v1/chat/completions": OPENAI | {"max_tokens",  # max_completion_tokens the same
                                      "top_logprobs",  # needs logprobs
                                      "tool_choice",  # a name among the tools; required needs tools
                                      "tools",  # names unique; parameters that can be enforced
                                      "messages.N.content"},  # an assistant's: content, refusal or tool calls
    "/v1/completions": OPENAI | {"prompt",  # token ids in the vocabulary
                                 "best_of", "echo", "suffix"},  # n; not with logprobs; a model that fills in
    "/v1/chat/interactive": SAMPLING | {"min_new_tokens",  # at most request_output_len, not with structured output
                                        "prompt",  # not empty unless request_output_len is 0
                                        "prompt.N.content",  # an assistant's: content, refusal or tool calls
                                        "session_id"}}  # cancel needs one


@schemathesis.check
def schema_valid_data_accepted(ctx, response: Response, case: Case):
    """schemathesis's positive_data_acceptance, less the 400s that name a rule of BETWEEN_FIELDS."""
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code < 400 \
            or response.status_code == 404:
        return None
    if response.status_code in (409, 429):  # a session in use, a full queue: not about the request's data
        return None
    error = response.json().get("error", {}) if response.status_code == 400 else {}
    param = re.sub(r"\.\d+", ".N", str(error.get("param") or ""))  # messages.0.content: messages.N.content
    if param in BETWEEN_FIELDS.get(case.path, ()):
        return None
    if error.get("code") == "context_length_exceeded":  # the prompt's tokens: only the tokenizer knows
        return None
    raise AssertionError(f"a schema-valid request was refused: {response.status_code} {response.text[:300]}")


VALIDATORS: dict = {}


def json_schema_of(doc: dict, name: str) -> jsonschema.Draft202012Validator:
    """A validator for one component of an OpenAPI 3.0 document, its references kept."""
    if (id(doc), name) in VALIDATORS:
        return VALIDATORS[id(doc), name]
    defs = {k: to_json_schema(v, "nullable", is_response_schema=True, upgrade_legacy_exclusive_bounds=True)
            for k, v in doc["components"]["schemas"].items()}
    text = json.dumps({"$ref": f"#/$defs/{name}", "$defs": defs}).replace("#/components/schemas/", "#/$defs/")
    VALIDATORS[id(doc), name] = jsonschema.Draft202012Validator(json.loads(text))
    return VALIDATORS[id(doc), name]


@schemathesis.check
def response_matches_schema(ctx, response: Response, case: Case):
    """schemathesis's response_schema_conformance, but server-sent events read as an OpenAPI 3.0 document writes
    them (as OpenAI's does): the schema is that of each event's data, the JSON of a chunk or an error, and the
    last event's data is [DONE]. (schemathesis reads the schema as the event's, as OpenAPI 3.2's itemSchema.)"""
    if not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return response_schema_conformance(ctx, response, case)
    chunk = {"/v1/chat/completions": "ChatCompletionChunk", "/v1/completions": "CompletionResponse"}[case.path]
    data = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    if response.stream_cut_short or response.is_truncated:  # schemathesis read only the first events
        data = data[:-1]
    else:
        assert data and data.pop() == "[DONE]", response.text[-300:]
    for item in data:
        event = json.loads(item)
        name = "ErrorResponse" if "error" in event else chunk
        errors = list(json_schema_of(case.operation.schema.raw_schema, name).iter_errors(event))
        assert not errors, f"an event is not a {name}: {errors[0].message}\n{item[:300]}"


CHECKS = [not_a_server_error, response_matches_schema, content_type_conformance, status_code_conformance,
          negative_data_rejection, schema_valid_data_accepted, allow_header_conformance,
          response_headers_conformance]
# field: (kept at most, the schema's own maximum); only values the schema allows are changed, so that a case
# made to break the schema still breaks it
LIMITS = {"max_tokens": (2, None), "max_completion_tokens": (2, None), "request_output_len": (2, 2**31 - 1),
          "n": (2, 16)}
RANDOM = os.environ.get("LM_SOAK") is not None  # the soak profile explores; CI sends the same cases every run
SENT = {"fake-model": 0, "SmolLM2-135M-Instruct": 0}  # cases sent, printed for docs/reliability.md


@pytest.fixture(scope="module")
def fake_url():
    with serve_in_thread(create_app(AsyncEngine(FakeEngine(max_len=4096)))) as url:
        yield url
    print(f"\nschemathesis: {SENT['fake-model']} cases on the fake engine")


@pytest.fixture(scope="module")
def real_url(smollm2_workspace, tmp_path_factory):
    # --max-output-len: a case that asks for nothing (what the context leaves) must not generate 8192 tokens
    server = LmServer(smollm2_workspace, "--dtype", "bfloat16", "--max-output-len", "4",
                      log_dir=tmp_path_factory.mktemp("log"))
    try:
        yield server.wait_ready().url
        print(f"\nschemathesis: {SENT['SmolLM2-135M-Instruct']} cases on SmolLM2")
    finally:
        server.stop()
        assert "Traceback" not in server.stderr(), server.stderr()


@pytest.fixture
def fake_api(fake_url):
    return schemathesis.openapi.from_url(fake_url + "/openapi.json")


@pytest.fixture
def real_api(real_url):
    return schemathesis.openapi.from_url(real_url + "/openapi.json")


def served(case, model: str) -> None:
    """The served model's name where a body names one (else every case stops at 404), answers kept short. Only
    schema-valid values are replaced: a case made to break the schema must stay broken."""
    SENT[model] += 1
    if isinstance(case.body, dict):
        if isinstance(case.body.get("model"), str):
            case.body["model"] = model
        for field, (most, allowed) in LIMITS.items():
            value = case.body.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and most < value <= (allowed or value):
                case.body[field] = most
        if case.path == "/v1/completions" and "max_tokens" not in case.body:
            case.body["max_tokens"] = 2


fake_schema = schemathesis.pytest.from_fixture("fake_api")
real_schema = schemathesis.pytest.from_fixture("real_api")


@fake_schema.parametrize()
@settings(max_examples=60 * (10 if RANDOM else 1), deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=not RANDOM)
def test_the_http_layer_holds_its_contract(case):
    served(case, "fake-model")
    case.call_and_validate(checks=CHECKS, timeout=60)


@real_schema.parametrize()
@settings(max_examples=8 * (10 if RANDOM else 1), deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=not RANDOM)
def test_the_real_server_holds_its_contract(case):
    served(case, "SmolLM2-135M-Instruct")
    case.call_and_validate(checks=CHECKS, timeout=120)
