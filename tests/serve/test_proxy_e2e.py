"""`lm serve proxy` in front of three real api_servers on SmolLM2, every one its own process on loopback: load
spreads, sessions stay on their node across ten turns, a killed node loses no request that had not started and is
admitted again after a restart, a disconnect reaches the node, a full queue answers 429, and third-party clients
(the openai SDK, LMDeploy's APIClient) work through the proxy as against one server."""

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from servers import LmProxy, LmServer

MODEL = "SmolLM2-135M-Instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
# a small KV cache each: three servers and the test session share one machine
NODE_ARGS = ("--dtype", "bfloat16", "--cache-max-entry-count", "0.02", "--max-output-len", "1200")


def wait_until(condition, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def gauges(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {m[0]: float(m[1]) for m in re.findall(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def table(proxy) -> dict:
    return {n["url"]: n for n in httpx.get(proxy.url + "/nodes/status", timeout=30).json()["nodes"]}


@pytest.fixture(scope="module")
def cluster(smollm2_workspace, tmp_path_factory):
    """A proxy, and three api_servers that register themselves with it (--proxy-url)."""
    log = tmp_path_factory.mktemp("log")
    proxy = LmProxy(log_dir=log).wait_ready(path="/nodes/status")
    nodes = [LmServer(smollm2_workspace, *NODE_ARGS, "--proxy-url", proxy.url, log_dir=log) for _ in range(3)]
    try:
        for node in nodes:
            node.wait_ready()
        wait_until(lambda: [n["state"] for n in table(proxy).values()] == ["ready"] * 3, "the nodes did not register")
        yield proxy, nodes
    finally:
        for node in nodes:
            node.stop()
        assert proxy.stop() in (0, 130) and "Traceback" not in proxy.stderr(), proxy.stderr()


def test_mixed_load_spreads_over_the_nodes(cluster):
    proxy, nodes = cluster
    before = {url: n["requests"] for url, n in table(proxy).items()}
    sdk = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)

    def one(i):
        if i % 3 == 0:
            return sdk.completions.create(model=MODEL, prompt=f"Count to {i}:", max_tokens=8).choices[0].text
        if i % 3 == 1:
            return sdk.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=8).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
            model=MODEL, messages=FRANCE, max_tokens=8, stream=True) if c.choices)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(12)))
    assert all(answers)
    counts = [table(proxy)[node.url]["requests"] - before[node.url] for node in nodes]
    assert sum(counts) == 12 and min(counts) >= 1, counts  # least outstanding: every node took some


def test_a_session_keeps_its_history_on_one_node_across_ten_turns_under_load(cluster):
    proxy, nodes = cluster
    stop = threading.Event()

    def load():
        with httpx.Client(timeout=300) as client:
            while not stop.is_set():
                r = client.post(proxy.url + "/v1/chat/completions", json={"model": MODEL, "messages": FRANCE,
                                                                          "max_tokens": 8})
                assert r.status_code == 200, r.text

    before = [gauges(n.url)["lm_sessions"] for n in nodes]
    threads = [threading.Thread(target=load) for _ in range(2)]  # other load, all the while
    for t in threads:
        t.start()
    try:
        history = []
        for turn in range(10):
            r = httpx.post(proxy.url + "/v1/chat/interactive", timeout=300, json={
                "prompt": f"Tell me fact number {turn} about Paris.", "session_id": 4242, "interactive_mode": True,
                "request_output_len": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            history.append(r.json()["history_tokens"])
    finally:
        stop.set()
        for t in threads:
            t.join(300)
    assert history[0] == 0 and all(a < b for a, b in zip(history, history[1:])), history
    changed = lambda: sorted(gauges(n.url)["lm_sessions"] - b for n, b in zip(nodes, before))  # noqa: E731
    wait_until(lambda: changed() == [0, 0, 1], "not exactly one node holds the session")
    r = httpx.post(proxy.url + "/v1/chat/interactive", timeout=300, json={
        "prompt": "", "session_id": 4242, "interactive_mode": False, "request_output_len": 0})
    assert r.status_code == 200
    wait_until(lambda: [gauges(n.url)["lm_sessions"] for n in nodes] == before, "the session did not end")


def test_a_client_that_disconnects_through_the_proxy_frees_the_node(cluster):
    proxy, nodes = cluster
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", timeout=300, json={
            "model": MODEL, "messages": FRANCE, "max_tokens": 1000, "ignore_eos": True, "stream": True}) as s:
        lines = s.iter_lines()
        next(lines)
        running = lambda: [gauges(n.url)["lm_requests_running"] for n in nodes]  # noqa: E731
        wait_until(lambda: sum(running()) == 1, "the request is not running on a node")
    wait_until(lambda: sum(running()) == 0, "a node kept generating for a client that left")
    wait_until(lambda: sum(n["outstanding"] for n in table(proxy).values()) == 0, "the proxy still counts it")


def test_a_full_queue_answers_429_with_retry_after(cluster, tmp_path):
    proxy, nodes = cluster
    small = LmProxy("--node", nodes[0].url, "--max-outstanding", "1", "--max-queue-len", "0", log_dir=tmp_path)
    try:
        small.wait_ready()
        with httpx.stream("POST", small.url + "/v1/chat/completions", timeout=300, json={
                "model": MODEL, "messages": FRANCE, "max_tokens": 1000, "ignore_eos": True, "stream": True}) as s:
            lines = s.iter_lines()
            next(lines)  # the node's one place is taken
            r = httpx.post(small.url + "/v1/chat/completions", json={"model": MODEL, "messages": FRANCE}, timeout=60)
            assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
            assert r.json()["error"]["type"] == "rate_limit_error"
        r = httpx.post(small.url + "/v1/chat/completions", timeout=300,
                       json={"model": MODEL, "messages": FRANCE, "max_tokens": 4})
        assert r.status_code == 200  # the place is free again
        assert 'lm_proxy_refused_total{reason="queue_full"} 1.0' in httpx.get(small.url + "/metrics").text
    finally:
        small.stop()


def test_the_openai_sdk_and_apiclient_answer_through_the_proxy_as_directly(cluster, lmdeploy_api_client):
    proxy, nodes = cluster
    ask = dict(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12)
    through = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    direct = openai.OpenAI(base_url=nodes[0].url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in through.models.list()] == [MODEL]
    answer = direct.chat.completions.create(**ask).choices[0].message.content
    assert through.chat.completions.create(**ask).choices[0].message.content == answer
    assert "".join(c.choices[0].delta.content or "" for c in through.chat.completions.create(**ask, stream=True)
                   if c.choices) == answer
    client, own = lmdeploy_api_client.APIClient(proxy.url), lmdeploy_api_client.APIClient(nodes[0].url)
    assert client.available_models == [MODEL]
    (chat,) = client.chat_completions_v1(MODEL, FRANCE, temperature=0, max_tokens=12)
    assert chat["choices"][0]["message"]["content"] == answer
    (done,) = client.completions_v1(MODEL, "The capital of France is", temperature=0, max_tokens=4)
    (same,) = own.completions_v1(MODEL, "The capital of France is", temperature=0, max_tokens=4)
    assert done["choices"][0]["text"] == same["choices"][0]["text"]
    turns = [list(client.chat_interactive_v1(text, session_id=91, interactive_mode=True, temperature=0,
                                             request_output_len=8))[-1] for text in ("Hello.", "And again.")]
    assert turns[0]["history_tokens"] == 0 < turns[1]["history_tokens"], turns
    client.end_session(91)


def test_a_killed_node_loses_no_unstarted_request_and_is_admitted_again(cluster):
    proxy, nodes = cluster
    victim = nodes[1]

    def one(i):
        return httpx.post(proxy.url + "/v1/chat/completions", timeout=300, json={
            "model": MODEL, "messages": FRANCE, "max_tokens": 32, "ignore_eos": True})

    with ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(one, i) for i in range(9)]
        wait_until(lambda: table(proxy)[victim.url]["outstanding"] >= 1, "no request reached the victim")
        victim.kill()  # mid-load: its answers (not streamed, so not started) are retried elsewhere
        answers = [f.result() for f in futures]
    assert [r.status_code for r in answers] == [200] * 9, [r.text for r in answers if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] == 32 for r in answers)
    assert table(proxy)[victim.url]["state"] in ("suspect", "down")
    victim.start().wait_ready()  # the same port; it registers again
    wait_until(lambda: table(proxy)[victim.url]["state"] == "ready", "the restarted node was not admitted again")
    before = table(proxy)[victim.url]["requests"]
    with ThreadPoolExecutor(6) as pool:
        assert all(r.status_code == 200 for r in pool.map(one, range(6)))
    assert table(proxy)[victim.url]["requests"] > before  # it takes requests again
