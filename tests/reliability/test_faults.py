"""The real server through faults, under load (issue: reliability); each scenario prints its figures
(docs/reliability.md keeps them):

- Drain: SIGTERM while streams, plain requests and interactive turns run. Each ends either finished or with the
  drain's error (a stream: shutting_down and [DONE]; a plain request: 503), the exit status is 0, no traceback.
- A killed tensor-parallel worker while requests run: every one of them ends with a clear error (no hang), /health
  turns 503 and says why, and new requests get 503.
- Sessions past --max-sessions and past --session-ttl: the number kept never passes the cap, an ended session's
  next turn gets 410 once and the one after starts afresh, and when every session has expired none is left and
  the KV cache is back at its start level."""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serve"))
from servers import LmServer  # noqa: E402
from test_load import CHAT, MODEL, SCALE, gauges, wait_until  # noqa: E402

LONG = {"max_tokens": 4000, "ignore_eos": True}  # runs longer than any drain here


def stream_outcome(lines: list) -> str:
    """'finished' (a finish reason), or the error code of the last event: server-sent events end with [DONE] after
    it, NDJSON (interactive) with it."""
    assert lines, "no answer"
    if lines[0].startswith("data: "):
        assert lines[-1] == "data: [DONE]", lines[-3:]
        body = lines[-2][len("data: "):]
    else:
        body = lines[-1]
    event = json.loads(body)
    if "error" in event:
        return event["error"]["code"]
    assert any(c.get("finish_reason") for c in event.get("choices", [])) or event.get("finish_reason"), body
    return "finished"


def start_load(url: str, n: int) -> tuple[list, dict, threading.Event]:
    """n of each: long chat streams, short chat streams, long plain chats, long interactive streams, in threads.
    Returns (the threads, outcomes by kind, an event set when every stream has its first line)."""
    outcomes, lock, first = {}, threading.Lock(), threading.Barrier(3 * n + 1)

    def record(kind, outcome):
        with lock:
            outcomes.setdefault(kind, []).append(outcome)

    def chat_stream(kind, extra):
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=300,
                          json={"model": MODEL, "messages": CHAT, "stream": True, **extra}) as s:
            lines = s.iter_lines()
            got = [next(lines)]
            first.wait()
            got += list(lines)
        record(kind, stream_outcome([line for line in got if line]))

    def interactive(k):
        with httpx.stream("POST", url + "/v1/chat/interactive", timeout=300, json={
                "prompt": "Tell me a long story.", "session_id": 1000 + k, "interactive_mode": True,
                "stream": True, "request_output_len": 4000, "ignore_eos": True}) as s:
            lines = s.iter_lines()
            got = [next(lines)]
            first.wait()
            got += list(lines)
        record("interactive stream", stream_outcome([line for line in got if line]))

    def plain():
        r = httpx.post(url + "/v1/chat/completions", timeout=300, json={"model": MODEL, "messages": CHAT, **LONG})
        record("plain", "finished" if r.status_code == 200 else f"{r.status_code} {r.json()['error']['code']}")

    threads = [threading.Thread(target=chat_stream, args=("long stream", LONG)) for _ in range(n)]
    threads += [threading.Thread(target=chat_stream, args=("short stream", {"max_tokens": 8})) for _ in range(n)]
    threads += [threading.Thread(target=interactive, args=(k,)) for k in range(n)]
    threads += [threading.Thread(target=plain) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, outcomes, first


def test_a_drain_under_load_ends_every_request_cleanly_and_exits_0(smollm2_workspace, tmp_path):
    n = 2 * SCALE
    s = LmServer(smollm2_workspace, "--dtype", "bfloat16", "--shutdown-timeout", "2", log_dir=tmp_path).wait_ready()
    try:
        threads, outcomes, first = start_load(s.url, n)
        first.wait()  # every stream has begun
        wait_until(lambda: gauges(s.url)["lm_requests_running"] >= 3 * n, "the long requests are not running")
        begun = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(300)
        code = s.proc.wait(120)
        took = time.monotonic() - begun
        print(f"\ndrain under load: {4 * n} requests in flight, SIGTERM with --shutdown-timeout 2: "
              f"{ {k: sorted(v) for k, v in sorted(outcomes.items())} }; exit {code} after {took:.1f} s")
        assert code == 0 and "Traceback" not in s.stderr(), s.stderr()
        assert sum(map(len, outcomes.values())) == 4 * n
        for kind, ends in outcomes.items():
            allowed = {"finished", "shutting_down"} if kind != "plain" else {"finished", "503 shutting_down"}
            assert set(ends) <= allowed, (kind, ends)
        assert set(outcomes["long stream"]) == {"shutting_down"}  # 4000 tokens: past any drain here
    finally:
        s.stop()


def test_a_killed_tensor_parallel_worker_under_load_fails_every_request_clearly(smollm2_workspace, tmp_path):
    n = SCALE
    s = LmServer(smollm2_workspace, "--tp", "2", "--dtype", "bfloat16", log_dir=tmp_path).wait_ready()
    try:
        workers = s.workers()
        assert len(workers) == 1, workers
        threads, outcomes, first = start_load(s.url, n)
        first.wait()
        wait_until(lambda: gauges(s.url)["lm_requests_running"] >= 3 * n, "the long requests are not running")
        begun = time.monotonic()
        os.kill(workers[0], signal.SIGKILL)
        health = None

        def unhealthy():
            nonlocal health
            health = httpx.get(s.url + "/health", timeout=30)
            return health.status_code == 503

        wait_until(unhealthy, "/health still 200")
        to_503 = time.monotonic() - begun
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads), "a request hangs"
        after = httpx.post(s.url + "/v1/chat/completions", timeout=60,
                           json={"model": MODEL, "messages": CHAT, "max_tokens": 4})
        print(f"\nkilled worker under load: {4 * n} requests in flight: "
              f"{ {k: sorted(v) for k, v in sorted(outcomes.items())} }; /health 503 after {to_503:.2f} s "
              f"({health.json()['message'][:60]}...); a new request: {after.status_code}")
        assert "worker" in health.json()["message"]
        assert after.status_code == 503 and "worker" in after.json()["error"]["message"]
        for kind, ends in outcomes.items():
            if kind == "plain":
                assert set(ends) <= {"finished", "503 engine_dead"}, ends
            else:
                assert set(ends) <= {"finished", "engine_dead"}, (kind, ends)
        assert set(outcomes["long stream"]) == {"engine_dead"}
        assert s.proc.poll() is None  # the server goes on answering, with the reason
    finally:
        s.stop()


def test_sessions_past_the_cap_and_the_ttl_leave_nothing(smollm2_workspace, tmp_path):
    cap, opened = 4, 8 * SCALE
    s = LmServer(smollm2_workspace, "--dtype", "bfloat16", "--max-sessions", cap, "--session-ttl", "5",
                 "--num-kv-blocks", "64", log_dir=tmp_path).wait_ready()

    def turn(sid, text="Hello."):
        return httpx.post(s.url + "/v1/chat/interactive", timeout=120, json={
            "prompt": text, "session_id": sid, "interactive_mode": True, "request_output_len": 8})

    try:
        start = gauges(s.url)
        kept = []
        for sid in range(1, opened + 1):
            assert turn(sid).status_code == 200
            kept.append(gauges(s.url)["lm_sessions"])
        assert max(kept) <= cap, kept
        ended = turn(1)  # the first session was ended: past the cap, or idle past its time to live
        assert ended.status_code == 410 and ended.json()["error"]["code"] == "session_expired", ended.text
        why = "cap" if "--max-sessions" in ended.json()["error"]["message"] else "ttl"
        again = turn(1)  # told once; this turn starts the session afresh
        assert again.status_code == 200 and again.json()["history_tokens"] < 40, again.text
        begun = time.monotonic()
        wait_until(lambda: gauges(s.url)["lm_sessions"] == 0, "sessions outlived --session-ttl")
        expired_in = time.monotonic() - begun
        late = turn(opened)
        assert late.status_code == 410 and "--session-ttl" in late.json()["error"]["message"], late.text
        httpx.post(s.url + "/v1/chat/interactive", json={"prompt": "", "session_id": opened,
                                                         "request_output_len": 0})  # ends what late started
        end = gauges(s.url)
        print(f"\nsessions: {opened} opened with --max-sessions {cap}: at most {max(kept):.0f} kept; the first "
              f"ended by the {why}; every session expired {expired_in:.1f} s after the last turn (--session-ttl 5); "
              f"sessions left {end['lm_sessions']:.0f}; KV blocks used {start['lm_kv_cache_blocks_used']:.0f} -> "
              f"{end['lm_kv_cache_blocks_used']:.0f}")
        assert end["lm_sessions"] == 0 and end["lm_kv_cache_blocks_used"] == start["lm_kv_cache_blocks_used"]
    finally:
        s.stop()
