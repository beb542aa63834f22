"""`lm serve proxy` over api_servers on the fake engine, all on real sockets: forwarding, streams, routing,
node states, sessions, node management."""

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from fake_engine import ANSWER, FakeEngine
from lmcli.engine.async_engine import AsyncEngine
from lmcli.serve.api_server import create_app
from lmcli.serve.nodes import DOWN, READY, SUSPECT, Nodes
from lmcli.serve.proxy import ProxyOptions, create_proxy
from servers import free_port, serve_in_thread

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}


@contextlib.contextmanager
def cluster(count: int, step_delay: float = 0.0, answer: str = ANSWER, strategy: str = "least_outstanding",
            limit: int = 0, health_interval: float = 0.2, **options):
    """count api_servers on fake engines behind a proxy: (the proxy's URL, the nodes' URLs, their engines)."""
    with contextlib.ExitStack() as stack:
        engines = [FakeEngine(step_delay=step_delay, answer=answer, max_len=1 << 20) for _ in range(count)]
        urls = [stack.enter_context(serve_in_thread(create_app(AsyncEngine(e)))) for e in engines]
        nodes = Nodes(strategy, rng=__import__("random").Random(0), limit=limit)
        proxy = stack.enter_context(serve_in_thread(create_proxy(nodes, ProxyOptions(
            health_interval=health_interval, **options))))
        for url in urls:
            assert httpx.post(proxy + "/nodes/add", json={"url": url}).status_code == 200
        yield proxy, urls, engines, nodes


def test_chat_and_streams_pass_through_and_models_are_the_union():
    with cluster(2) as (proxy, urls, engines, nodes):
        models = httpx.get(proxy + "/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["fake-model"]
        r = httpx.post(proxy + "/v1/chat/completions", json=CHAT)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ANSWER
        with httpx.stream("POST", proxy + "/v1/chat/completions", json={**CHAT, "stream": True}) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                       for line in lines[:-1] if json.loads(line[6:])["choices"])
        assert text == ANSWER and lines[-1] == "data: [DONE]"
        r = httpx.post(proxy + "/v1/chat/completions", json={**CHAT, "temperature": -1})
        assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]  # the node's own answer
        r = httpx.post(proxy + "/v1/chat/completions", json={**CHAT, "model": "other"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert sum(n["requests"] for n in httpx.get(proxy + "/nodes/status").json()["nodes"]) == 3


def test_least_outstanding_spreads_concurrent_requests():
    with cluster(2, step_delay=0.02) as (proxy, urls, engines, nodes):
        def one():
            assert httpx.post(proxy + "/v1/chat/completions", json=CHAT, timeout=60).status_code == 200

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        counts = sorted(n["requests"] for n in httpx.get(proxy + "/nodes/status").json()["nodes"])
        assert counts[0] >= 2 and sum(counts) == 6  # both nodes answered


def test_a_dead_node_is_skipped_and_marked_down():
    port = free_port()  # nothing listens there
    with cluster(1) as (proxy, urls, engines, nodes):
        dead = nodes.add(f"http://127.0.0.1:{port}", ["fake-model"])
        for _ in range(4):
            assert httpx.post(proxy + "/v1/chat/completions", json=CHAT).status_code == 200
        assert dead.state in (SUSPECT, DOWN) and nodes.nodes[urls[0]].state == READY


def test_interactive_sessions_stick_to_their_node():
    with cluster(3) as (proxy, urls, engines, nodes):
        for turn in range(4):
            r = httpx.post(proxy + "/v1/chat/interactive", json={"prompt": f"turn {turn}", "session_id": 11,
                                                               "interactive_mode": True})
            assert r.status_code == 200
        holders = [e for e in engines if 11 in e.sessions]
        assert len(holders) == 1 and len([a for a in holders[0].added if a[3] == 11]) == 4


def test_nodes_are_added_removed_and_kept_in_the_config_file(tmp_path):
    path = tmp_path / "proxy.json"
    with contextlib.ExitStack() as stack:
        node = stack.enter_context(serve_in_thread(create_app(AsyncEngine(FakeEngine()))))
        proxy = stack.enter_context(serve_in_thread(create_proxy(Nodes(path=path))))
        assert httpx.get(proxy + "/health").status_code == 503  # no node yet
        assert httpx.post(proxy + "/nodes/add", json={"url": "ftp://x"}).status_code == 400
        assert httpx.post(proxy + "/nodes/add", json={"url": node}).status_code == 200
        assert httpx.get(proxy + "/health").json()["status"] == "ok"
        assert json.loads(path.read_text())["nodes"] == [node]
        assert Nodes(path=path).nodes.keys() == {node}  # a restarted proxy knows it
        assert httpx.post(proxy + "/nodes/remove", params={"node_url": node}).status_code == 200
        assert json.loads(path.read_text())["nodes"] == []
        assert httpx.post(proxy + "/nodes/remove", json={"url": node}).status_code == 404


def test_the_proxy_keys_guard_it():
    with cluster(1, api_keys=("k",)) as (proxy, urls, engines, nodes):
        assert httpx.post(proxy + "/v1/chat/completions", json=CHAT).status_code == 401
        r = httpx.post(proxy + "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200


@pytest.mark.parametrize("failures,state", [(1, SUSPECT), (3, DOWN)])
def test_node_states_follow_failures_and_come_back(failures, state):
    clock = [0.0]
    nodes = Nodes(fail_after=3, pass_after=2, open_for=5.0, clock=lambda: clock[0])
    node = nodes.add("http://a", ["m"])
    for _ in range(failures):
        nodes.failed(node)
    assert node.state == state and nodes.pick("m") is None  # the circuit is open
    clock[0] = 6.0
    assert (nodes.pick("m") is node) == (state == SUSPECT)
    nodes.succeeded(node)
    assert node.state == (READY if state == SUSPECT else DOWN)
    nodes.succeeded(node)
    assert node.state == READY and nodes.pick("m") is node


def test_a_client_that_disconnects_ends_the_request_on_its_node():
    with cluster(1, step_delay=0.05) as (proxy, urls, engines, nodes):
        with httpx.stream("POST", proxy + "/v1/chat/completions", json={**CHAT, "stream": True}) as s:
            next(s.iter_lines())  # the answer started
        deadline = time.monotonic() + 30
        while not engines[0].aborted:  # the node saw the proxy's upstream request closed
            assert time.monotonic() < deadline, "the node kept generating"
            time.sleep(0.02)
        while nodes.nodes[urls[0]].outstanding:
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_an_ended_session_is_forgotten():
    """interactive_mode false ends a session on its node: the proxy keeps no mapping for it (no growth per session)."""
    with contextlib.ExitStack() as stack:
        node = stack.enter_context(serve_in_thread(create_app(AsyncEngine(FakeEngine()))))
        app = create_proxy(Nodes())
        proxy = stack.enter_context(serve_in_thread(app))
        assert httpx.post(proxy + "/nodes/add", json={"url": node}).status_code == 200
        turn = {"prompt": "hi", "session_id": 3, "interactive_mode": True}
        assert httpx.post(proxy + "/v1/chat/interactive", json=turn).status_code == 200
        assert {k: v[0] for k, v in app.state.proxy.sessions.items()} == {3: node}
        end = {"prompt": "", "session_id": 3, "interactive_mode": False, "request_output_len": 0}
        assert httpx.post(proxy + "/v1/chat/interactive", json=end).status_code == 200
        assert app.state.proxy.sessions == {}


def wait_until(condition, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def queued(proxy) -> int:
    return httpx.get(proxy + "/nodes/status").json()["queued"]


def test_a_request_waits_for_room_and_a_full_queue_gets_429():
    with cluster(1, step_delay=0.01, answer="x" * 100_000, limit=1, max_queue=1) as (proxy, urls, engines, nodes):
        with httpx.stream("POST", proxy + "/v1/chat/completions", json={**CHAT, "stream": True}) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # the node's one place is taken
            second = []
            t = threading.Thread(target=lambda: second.append(httpx.post(
                proxy + "/v1/chat/completions", json={**CHAT, "max_tokens": 3}, timeout=60)))
            t.start()
            wait_until(lambda: queued(proxy) == 1, "the second request did not queue")
            r = httpx.post(proxy + "/v1/chat/completions", json=CHAT)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error" and "waiting" in r.json()["error"]["message"]
            assert not second  # still waiting
        t.join(60)  # the first stream closed: its place went to the second request
        assert second[0].status_code == 200 and second[0].json()["choices"][0]["message"]["content"] == "xxx"
        metrics = httpx.get(proxy + "/metrics").text
        assert 'lm_proxy_refused_total{reason="queue_full"} 1.0' in metrics
        assert f'lm_proxy_node_requests_total{{node="{urls[0]}"}} 2.0' in metrics
        assert f'lm_proxy_node_state{{node="{urls[0]}",state="ready"}} 1.0' in metrics
        assert "lm_proxy_queue_length 0.0" in metrics and "lm_proxy_request_seconds_count" in metrics


def test_a_wait_past_the_queue_timeout_gets_503():
    with cluster(1, step_delay=0.01, answer="x" * 100_000, limit=1, queue_timeout=0.0) as (proxy, urls, _, nodes):
        with httpx.stream("POST", proxy + "/v1/chat/completions", json={**CHAT, "stream": True}) as first:
            lines = first.iter_lines()
            next(lines)
            r = httpx.post(proxy + "/v1/chat/completions", json=CHAT)
            assert r.status_code == 503 and "within 0 s" in r.json()["error"]["message"]
            assert r.headers["retry-after"] == "1"


def test_a_session_whose_node_is_lost_fails_clearly_once_then_starts_afresh():
    turn = {"prompt": "hi", "session_id": 7, "interactive_mode": True}
    with cluster(2, health_interval=600) as (proxy, urls, engines, nodes):  # no probe undoes the failures below
        assert httpx.post(proxy + "/v1/chat/interactive", json=turn).status_code == 200
        holder = next(n for n in nodes.nodes.values() if n.requests == 1)
        wait_until(lambda: holder.outstanding == 0, "the turn's end was not counted")  # it counts as a success
        nodes.failed(holder)  # suspect, its circuit open: the history is there, but the node cannot take it now
        r = httpx.post(proxy + "/v1/chat/interactive", json=turn)
        assert r.status_code == 503 and r.json()["error"]["code"] == "session_node_unavailable"
        assert "history stays" in r.json()["error"]["message"] and "retry-after" in r.headers
        for _ in range(2):
            nodes.failed(holder)  # down
        r = httpx.post(proxy + "/v1/chat/interactive", json=turn)
        assert r.status_code == 410 and r.json()["error"]["code"] == "session_lost"
        assert r.json()["error"]["param"] == "session_id" and holder.url in r.json()["error"]["message"]
        r = httpx.post(proxy + "/v1/chat/interactive", json=turn)  # afresh, on the other node
        assert r.status_code == 200 and r.json()["history_tokens"] == 0
        assert sum(n.requests for n in nodes.nodes.values() if n is not holder) == 1


def test_prefix_aware_sends_a_shared_start_to_one_node():
    system = {"role": "system", "content": "You are a careful assistant. " * 12}
    with cluster(3, strategy="prefix_aware") as (proxy, urls, engines, nodes):
        for i in range(6):
            chat = {**CHAT, "messages": [system, {"role": "user", "content": f"question {i}"}]}
            assert httpx.post(proxy + "/v1/chat/completions", json=chat).status_code == 200
        assert sorted(n.requests for n in nodes.nodes.values()) == [0, 0, 6]


def test_prefix_aware_falls_back_to_load_when_the_owner_is_busy():
    from lmcli.serve.nodes import prefix_keys

    nodes = Nodes("prefix_aware", balance=2, rng=__import__("random").Random(1))
    a, b = nodes.add("http://a", ["m"]), nodes.add("http://b", ["m"])
    keys = prefix_keys("x" * 200)
    owner = nodes.pick("m", keys=keys)
    assert nodes.pick("m", keys=keys) is owner and nodes.pick("m", keys=prefix_keys("x" * 300)) is owner
    other = b if owner is a else a
    owner.outstanding = 3  # more than balance over the other's 0
    assert nodes.pick("m", keys=keys) is other
    owner.outstanding = 0
    assert nodes.pick("m", keys=keys) is other  # the start now lives there too, last sent there
    assert prefix_keys("x" * 63) == [] and len(prefix_keys("x" * 128)) == 2


def test_the_proxy_serves_its_docs_and_cors():
    with cluster(1, allow_origins=("http://app.example",)) as (proxy, urls, engines, nodes):
        assert "swagger-ui" in httpx.get(proxy + "/").text
        doc = httpx.get(proxy + "/openapi.json").json()
        assert doc["info"]["title"] == "lm proxy" and "/nodes/add" in doc["paths"]
        assert "410" in doc["paths"]["/v1/chat/interactive"]["post"]["responses"]
        r = httpx.options(proxy + "/v1/chat/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
        assert r.headers["access-control-allow-origin"] == "http://app.example"


def test_a_node_never_answers_more_than_its_limit():
    with cluster(2, step_delay=0.01, limit=2, max_queue=64) as (proxy, urls, engines, nodes):
        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(lambda i: httpx.post(proxy + "/v1/chat/completions", json=CHAT,
                                                       timeout=120).status_code, range(12)))
        assert codes == [200] * 12 and max(e.peak for e in engines) <= 2, [e.peak for e in engines]
        wait_until(lambda: all(n.outstanding == 0 for n in nodes.nodes.values()), "a place was kept")
        assert queued(proxy) == 0


def test_a_node_that_breaks_off_mid_stream_frees_its_place():
    async def health(request):
        return JSONResponse({"status": "ok"})

    async def models(request):
        return JSONResponse({"data": [{"id": "fake-model"}]})

    async def chat(request):
        async def chunks():
            yield b"data: {}\n\n"
            raise RuntimeError("the node died")
        return StreamingResponse(chunks(), media_type="text/event-stream")

    broken = Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                               Route("/v1/chat/completions", chat, methods=["POST"])])
    with contextlib.ExitStack() as stack:
        node = stack.enter_context(serve_in_thread(broken))
        nodes = Nodes()
        proxy = stack.enter_context(serve_in_thread(create_proxy(nodes)))
        assert httpx.post(proxy + "/nodes/add", json={"url": node}).status_code == 200
        with pytest.raises(httpx.HTTPError):
            with httpx.stream("POST", proxy + "/v1/chat/completions", json={**CHAT, "stream": True}) as s:
                list(s.iter_lines())  # the answer breaks off
        wait_until(lambda: nodes.nodes[node].errors == 1, "the break was not counted")
        assert nodes.nodes[node].outstanding == 0


def test_a_new_session_is_named_by_the_proxy_and_cancel_or_a_refused_end_keeps_it():
    with cluster(3) as (proxy, urls, engines, nodes):
        r = httpx.post(proxy + "/v1/chat/interactive", json={"prompt": "hi", "interactive_mode": True})
        sid = r.json()["session_id"]
        assert r.status_code == 200 and sid != -1
        turn = {"prompt": "again", "session_id": sid, "interactive_mode": True}
        assert httpx.post(proxy + "/v1/chat/interactive", json=turn).json()["history_tokens"] > 0  # same node
        assert httpx.post(proxy + "/v1/chat/interactive", json={"session_id": sid, "cancel": True,
                                                                 "prompt": ""}).status_code == 200
        assert httpx.post(proxy + "/v1/chat/interactive", json=turn).json()["history_tokens"] > 0
        one_shot = httpx.post(proxy + "/v1/chat/interactive", json={"prompt": "hi"})  # no session to keep
        assert one_shot.status_code == 200 and httpx.get(proxy + "/nodes/status").json()["sessions"] == 1
        assert len([e for e in engines if sid in e.sessions]) == 1


def test_a_session_whose_node_restarted_fails_clearly_once():
    with contextlib.ExitStack() as stack:
        node_app = create_app(AsyncEngine(FakeEngine()))
        node = stack.enter_context(serve_in_thread(node_app))
        nodes = Nodes()
        proxy = stack.enter_context(serve_in_thread(create_proxy(nodes, ProxyOptions(health_interval=0.05))))
        assert httpx.post(proxy + "/nodes/add", json={"url": node}).status_code == 200
        turn = {"prompt": "hi", "session_id": 5, "interactive_mode": True}
        assert httpx.post(proxy + "/v1/chat/interactive", json=turn).status_code == 200
        node_app.state.server.instance = "another process"  # what a restart between two probes looks like
        wait_until(lambda: nodes.nodes[node].instance == "another process", "the probe did not see the restart")
        r = httpx.post(proxy + "/v1/chat/interactive", json=turn)
        assert r.status_code == 410 and r.json()["error"]["code"] == "session_lost"
        assert "restarted" in r.json()["error"]["message"]
        assert httpx.post(proxy + "/v1/chat/interactive", json=turn).status_code == 200  # afresh
