"""Schemathesis over /openapi.json (issue: reliability): generated requests, valid and invalid, on a real socket,
first over the fake engine (the HTTP layer, many cases), then over the real model (fewer, each answer cut short).
The same cases every run; LM_SOAK=1 draws new ones, ten times as many. Each answer is checked: no 5xx, the
documented status codes and content types, the response body against its schema, a schema-violating request
refused, 405 with Allow. A request that hangs fails by the client's timeout."""

import os
import sys
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (allow_header_conformance, content_type_conformance,
                                               negative_data_rejection, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serve"))
from fake_engine import FakeEngine  # noqa: E402
from lmcli.engine.async_engine import AsyncEngine  # noqa: E402
from lmcli.serve.api_server import create_app  # noqa: E402
from servers import LmServer, serve_in_thread  # noqa: E402

CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance, status_code_conformance,
          negative_data_rejection, allow_header_conformance, response_headers_conformance]
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
