"""Server options end to end: --tp 2 with HTTPS, API keys and proxy registration in one server; the README's
command that serves the default model."""

import json
import os
import re
import signal
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import openai
import pytest

from conftest import REPO
from lmcli import pipeline
from servers import LmServer, free_port, LM

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
COLORS = [{"role": "user", "content": "Name three primary colors."}]


@pytest.fixture
def proxy():
    """A stand-in for `lm serve proxy` that records what registers with it."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()


def test_tp2_over_https_with_keys_and_a_proxy(smollm2_workspace, tmp_path, proxy):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    trust = ssl.create_default_context(cafile=str(cert))
    proxy_url, registered = proxy
    s = LmServer(smollm2_workspace, "--tp", "2", "--dtype", "float32", "--api-keys", "k1,k2", "--ssl",
                 "--proxy-url", proxy_url, env={"SSL_KEYFILE": str(key), "SSL_CERTFILE": str(cert)},
                 log_dir=tmp_path, scheme="https")
    try:
        s.wait_ready()
        assert f"is ready at {s.url}" in s.stderr()
        deadline = time.monotonic() + 10
        while "registered" not in s.stderr():  # registration runs beside the server
            assert time.monotonic() < deadline, s.stderr()
            time.sleep(0.05)
        assert registered == [("/nodes/add", {"url": s.url})]
        sdk = openai.OpenAI(base_url=s.url + "/v1", api_key="k2", max_retries=0,
                            http_client=openai.DefaultHttpxClient(verify=trust))
        r = sdk.chat.completions.create(model="SmolLM2-135M-Instruct", messages=FRANCE, temperature=0,
                                        max_tokens=24)
        expected = pipeline(smollm2_workspace, dtype="float32")(FRANCE, max_new_tokens=24, temperature=0).text
        assert r.choices[0].message.content == expected and "Paris" in expected
        chunks = list(sdk.chat.completions.create(model="SmolLM2-135M-Instruct", messages=FRANCE, temperature=0,
                                                  max_tokens=24, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
        wrong = openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0,
                              http_client=openai.DefaultHttpxClient(verify=trust))
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert httpx.get(s.url + "/health", verify=trust).json()["status"] == "ok"
        assert "lm_kv_cache_blocks_total" in httpx.get(s.url + "/metrics", verify=trust).text
        # a tensor-parallel worker dies: /health says so, requests get a clear error, nothing hangs
        mine = s.workers()
        assert len(mine) == 1, mine
        os.kill(mine[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while (health := httpx.get(s.url + "/health", verify=trust)).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert health.status_code == 503 and "worker" in health.json()["message"]
        with pytest.raises((openai.APIStatusError, openai.APIError)) as failed:
            sdk.chat.completions.create(model="SmolLM2-135M-Instruct", messages=FRANCE, max_tokens=4)
        assert "worker" in str(failed.value)
    finally:
        code = s.stop()
    assert code in (0, 130), s.stderr()
    assert registered[-1] == ("/nodes/remove", {"url": s.url})  # it left the proxy's table on shutdown


def test_the_readme_command_serves_the_default_model(smollm2_gguf, tmp_path):
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    serve = next(line for b in blocks for line in b.splitlines() if line.startswith("pip install"))
    command = serve.split(" && ", 1)[1]  # the install is what CI did already
    assert command.startswith("lm convert smollm2") and "lm serve api_server ./workspace" in command
    port = free_port()
    command = command.replace("lm ", f"{LM} ") + f" --server-name 127.0.0.1 --server-port {port}"
    log = open(tmp_path / "log", "w")
    proc = subprocess.Popen(["bash", "-c", f"exec {command}" if "&&" not in command else command], cwd=tmp_path,
                            stdout=log, stderr=log, start_new_session=True)
    server = LmServer.__new__(LmServer)
    server.proc, server.url, server.log = proc, f"http://127.0.0.1:{port}", tmp_path / "log"
    try:
        server.wait_ready(timeout=300)
        # the README serves the GGUF's own 4-bit blocks: "What is the capital of France?" is a near tie there
        # (as in bfloat16) between "The capital ..." and "L'...", so the question is one with a wide margin
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": "SmolLM2-135M-Instruct", "messages": COLORS, "temperature": 0, "max_tokens": 24})
        assert "blue" in r.json()["choices"][0]["message"]["content"].lower()
        manifest = json.loads((tmp_path / "workspace" / "lm_workspace.json").read_text())
        assert manifest["quantization"] == "int4"  # the default model as llama.cpp runs it
    finally:
        server.stop()


@pytest.mark.parametrize("option,messages,word", [(["--quantization", "int8"], FRANCE, "paris"),
                                                  (["--quantization", "int4"], COLORS, "blue"),
                                                  (["--quant-policy", "8"], COLORS, "blue")])
def test_quantized_server_answers_with_the_openai_sdk(smollm2_workspace, tmp_path, option, messages, word):
    server = LmServer(smollm2_workspace, *option, "--dtype", "bfloat16", log_dir=tmp_path)
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        model = client.models.list().data[0].id
        answer = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24)
        assert word in answer.choices[0].message.content.lower()
    finally:
        assert server.stop() in (0, 130) and "Traceback" not in server.stderr()  # 130: stopped by Ctrl-C


def test_a_4bit_workspace_is_served_as_it_is(smollm2_int4_workspace, tmp_path):
    """lm convert --quantization int4 then lm serve api_server with no option: the start-up line names the
    workspace's 4-bit blocks, and the answers come through the openai SDK, streamed and not."""
    server = LmServer(smollm2_int4_workspace, "--log-level", "info", log_dir=tmp_path)
    try:
        server.wait_ready()
        assert "4-bit blocks of 32" in server.stderr() and "the workspace's, lm convert --quantization int4" in \
            server.stderr()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        model = client.models.list().data[0].id
        answer = client.chat.completions.create(model=model, messages=COLORS, temperature=0, max_tokens=24)
        assert "blue" in answer.choices[0].message.content.lower()
        stream = client.chat.completions.create(model=model, messages=COLORS, temperature=0, max_tokens=24,
                                                stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == answer.choices[0].message.content
    finally:
        assert server.stop() in (0, 130) and "Traceback" not in server.stderr()


def test_reasoning_parser_splits_a_real_models_think_block(smollm2_workspace, tmp_path):
    """SmolLM2 does not think by itself: a regex response_format makes it write a <think> block, which
    --reasoning-parser think takes out of the content, streamed or not."""
    server = LmServer(smollm2_workspace, "--reasoning-parser", "think", "--dtype", "bfloat16", log_dir=tmp_path)
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        model = client.models.list().data[0].id
        shape = {"type": "regex_schema", "regex_schema": "<think>[a-z ,]{10,60}</think>[A-Z][a-z ,]{10,60}[.]"}
        ask = dict(model=model, messages=FRANCE, temperature=0, max_tokens=60, extra_body={"response_format": shape})
        message = client.chat.completions.create(**ask).choices[0].message
        reasoning, content = message.model_extra["reasoning_content"], message.content
        assert re.fullmatch("[a-z ,]{10,60}", reasoning) and re.fullmatch("[A-Z][a-z ,]{10,60}[.]", content)
        pieces = {"reasoning_content": "", "content": ""}
        for chunk in client.chat.completions.create(**ask, stream=True):
            for c in chunk.choices:
                for key in pieces:
                    pieces[key] += (c.delta.model_extra.get(key) if key == "reasoning_content"
                                    else c.delta.content) or ""
        assert pieces == {"reasoning_content": reasoning, "content": content}  # greedy: the same, streamed
    finally:
        assert server.stop() in (0, 130) and "Traceback" not in server.stderr()


def test_sigterm_lets_requests_finish_then_ends_the_rest_and_exits_0(smollm2_workspace, tmp_path):
    s = LmServer(smollm2_workspace, "--dtype", "bfloat16", "--shutdown-timeout", "5", log_dir=tmp_path).wait_ready()
    chat = {"model": "SmolLM2-135M-Instruct", "messages": FRANCE, "stream": True, "temperature": 0}
    try:
        with httpx.Client(timeout=300) as client:
            with client.stream("POST", s.url + "/v1/chat/completions",  # longer than any CPU runs in 5 s
                               json={**chat, "max_tokens": 4000, "ignore_eos": True}) as long:
                long_lines = long.iter_lines()
                next(long_lines)
                with client.stream("POST", s.url + "/v1/chat/completions", json={**chat, "max_tokens": 30,
                                                                                 "ignore_eos": True}) as short:
                    short_lines = short.iter_lines()
                    next(short_lines)
                    s.proc.send_signal(signal.SIGTERM)
                    rest = [line for line in short_lines if line]
                assert rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in rest[-2], rest[-3:]
                try:  # no new work while draining: the port is closed, or /health says 503
                    assert httpx.get(s.url + "/health", timeout=10).status_code == 503
                except httpx.TransportError:
                    pass
                ended = [line for line in long_lines if line]
        ended_by_the_drain(s, ended, 5)
    finally:
        s.stop()


def ended_by_the_drain(s: LmServer, lines: list, seconds: int) -> None:
    """The stream's last events are the drain's error and [DONE]; the server exited 0, without a traceback."""
    assert lines[-1] == "data: [DONE]", lines[-3:]
    error = json.loads(lines[-2][len("data: "):])["error"]
    assert error["code"] == "shutting_down" and f"{seconds} s drain" in error["message"], lines[-2]
    assert s.proc.wait(60) == 0, s.stderr()
    assert "Traceback" not in s.stderr() and "ended 1 request(s)" in s.stderr(), s.stderr()


def test_shutdown_timeout_0_ends_what_runs_at_once(smollm2_workspace, tmp_path):
    s = LmServer(smollm2_workspace, "--dtype", "bfloat16", "--shutdown-timeout", "0", log_dir=tmp_path).wait_ready()
    try:
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=300, json={
                "model": "SmolLM2-135M-Instruct", "messages": FRANCE, "stream": True, "max_tokens": 4000,
                "ignore_eos": True}) as long:
            lines = long.iter_lines()
            next(lines)
            s.proc.send_signal(signal.SIGTERM)
            ended = [line for line in lines if line]
        ended_by_the_drain(s, ended, 0)
    finally:
        s.stop()


def test_sigterm_stops_a_tensor_parallel_server_and_its_workers(smollm2_workspace, tmp_path):
    s = LmServer(smollm2_workspace, "--tp", "2", "--dtype", "float32", log_dir=tmp_path).wait_ready()
    try:
        mine = s.workers()
        assert len(mine) == 1, mine
        r = httpx.post(s.url + "/v1/chat/completions", timeout=120, json={
            "model": "SmolLM2-135M-Instruct", "messages": FRANCE, "max_tokens": 4})
        assert r.status_code == 200
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(120) == 0, s.stderr()
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{mine[0]}") and "Z" not in _state(mine[0]):  # no worker outlives it
            assert time.monotonic() < deadline, f"worker {mine[0]} survived the server"
            time.sleep(0.1)
        assert "Traceback" not in s.stderr(), s.stderr()
    finally:
        s.stop()


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
