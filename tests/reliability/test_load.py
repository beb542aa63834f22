"""The real server under mixed load, clients that leave, and a flood (issue: reliability). Sized for CI; the soak
profile multiplies every count: LM_SOAK=10 pytest tests/reliability (docs/reliability.md).

- Mixed: workers send, in a seeded random order, plain and streamed chat, completions with every prompt shape
  (text, texts, token ids, lists of token ids; n=2 too), interactive sessions of three turns, streams that
  the client drops after 0 to 3 chunks, and plain requests it gives up on at a random point, in rounds. Every
  answer not dropped must be a 200; afterwards nothing may be left running, no session kept, the KV cache back
  at its start level, no file left open, and the server's memory no larger than after the warm-up rounds (within
  a bound).
- Flood: 8 places and 8 queued, 160 requests at once: each answer is a 200 or a 429 with Retry-After, and the
  server then answers as before. The time to each 429 is printed, not asserted (it depends on the CPU)."""

import os
import random
import re
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serve"))
from servers import LmServer  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
SCALE = int(os.environ.get("LM_SOAK", "1"))
CHAT = [{"role": "user", "content": "Name a colour."}]


def gauges(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {m[0]: float(m[1]) for m in re.findall(r"^(\w+) (\S+)$", text, re.M)}


def wait_until(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(smollm2_workspace, tmp_path_factory):
    s = LmServer(smollm2_workspace, "--dtype", "bfloat16", "--max-output-len", "64", "--num-kv-blocks", "64",
                 log_dir=tmp_path_factory.mktemp("log"))
    try:
        yield s.wait_ready()
    finally:
        s.stop()
        assert "Traceback" not in s.stderr(), s.stderr()


def one(client: httpx.Client, url: str, kind: str, rng: random.Random) -> str:
    """One operation; returns its outcome ('ok', 'dropped') or raises AssertionError with the failure."""
    if kind == "chat":
        r = client.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 8})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None, r.text
    elif kind == "stream":
        with client.stream("POST", url + "/v1/chat/completions", json={
                "model": MODEL, "messages": CHAT, "max_tokens": 8, "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line]
        assert s.status_code == 200 and lines[-1] == "data: [DONE]", lines[-2:]
    elif kind == "completion":
        prompt = rng.choice(["Once upon a time", ["One", "Two"], [1, 2, 3, 4], [[5, 6, 7], [8, 9]]])
        r = client.post(url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 6,
                                                       "n": rng.choice([1, 2])})
        assert r.status_code == 200, r.text
    elif kind == "session":
        sid = rng.randrange(1, 1 << 30)
        for k, text in enumerate(("Hello.", "Tell me more.", "Thanks.")):
            r = client.post(url + "/v1/chat/interactive", json={
                "prompt": text, "session_id": sid, "interactive_mode": k < 2, "request_output_len": 8})
            assert r.status_code == 200, r.text
    elif kind == "drop":
        with client.stream("POST", url + "/v1/chat/completions", json={
                "model": MODEL, "messages": CHAT, "max_tokens": 60, "ignore_eos": True, "stream": True}) as s:
            lines = s.iter_lines()
            for _ in range(rng.randrange(4)):
                next(lines)
        return "dropped"  # leaving the with-block closes the connection mid-answer
    elif kind == "drop-plain":  # a plain request whose client gives up at a random point
        try:
            r = client.post(url + "/v1/chat/completions", timeout=httpx.Timeout(300, read=rng.uniform(0.02, 0.5)),
                            json={"model": MODEL, "messages": CHAT, "max_tokens": 60, "ignore_eos": True})
        except httpx.ReadTimeout:
            return "dropped"  # the timed-out connection is closed mid-answer
        assert r.status_code == 200, r.text
    return "ok"


def mixed(url: str, plan: list) -> tuple[float, dict, list]:
    """Run the plan's operations over 8 workers: (seconds, outcomes counted, failures)."""
    failures, outcomes = [], {}
    lock = threading.Lock()

    def worker(k: int) -> None:
        local = random.Random(k)
        with httpx.Client(timeout=300) as client:
            for i in range(k, len(plan), 8):
                try:
                    outcome = one(client, url, plan[i], local)
                except (AssertionError, httpx.HTTPError) as e:
                    outcome = "failed"
                    with lock:
                        failures.append(f"{plan[i]}: {e}")
                with lock:
                    outcomes[(plan[i], outcome)] = outcomes.get((plan[i], outcome), 0) + 1

    begun = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    wait_until(lambda: gauges(url)["lm_requests_running"] == 0, "requests still running")
    return time.monotonic() - begun, outcomes, failures


def test_mixed_load_and_dropped_clients_leave_nothing_behind(server):
    """The same mix in rounds: the first ones warm the server up (its fixed KV pool, faulted in while idle and as
    blocks are first used, filled twice over; the allocator's arenas; torch's and the tokenizer's caches), and the
    last must leave what it found: KV blocks, sessions, open files, and memory within a bound (a leak of every
    request's state, or of every connection's, would pass it only in a short run; the soak profile runs ten
    times as many)."""
    start = gauges(server.url)
    kinds = ["chat", "stream", "completion", "session", "drop", "drop-plain"]
    rng = random.Random(0)
    plan = [rng.choice(kinds) for _ in range(40 * SCALE)]
    assert start["lm_kv_cache_blocks_total"] == 64  # --num-kv-blocks
    pool_tokens = 64 * 64
    rounds = []
    while not rounds or gauges(server.url)["lm_computed_tokens_total"] < 2 * pool_tokens:
        assert len(rounds) < 20, "the mix computes no tokens"
        rounds.append(mixed(server.url, plan))
    warm = gauges(server.url)
    rounds.append(mixed(server.url, plan))
    end = gauges(server.url)
    mib = 1 << 20
    for k, (took, outcomes, failures) in enumerate(rounds):
        print(f"\nmixed load, round {k + 1}: {len(plan)} operations in {took:.1f} s, {dict(sorted(outcomes.items()))};"
              f" failures {len(failures)}")
    print(f"KV blocks used {start['lm_kv_cache_blocks_used']:.0f} -> {end['lm_kv_cache_blocks_used']:.0f}; "
          f"sessions {end['lm_sessions']:.0f}; server RSS {start['process_resident_memory_bytes'] / mib:.0f} MiB "
          f"-> {warm['process_resident_memory_bytes'] / mib:.0f} after {len(rounds) - 1} rounds -> "
          f"{end['process_resident_memory_bytes'] / mib:.0f} after one more; open files "
          f"{start['process_open_fds']:.0f} -> {warm['process_open_fds']:.0f} -> {end['process_open_fds']:.0f}")
    failures = [f for r in rounds for f in r[2]]
    assert not failures, failures[:5]
    assert end["lm_sessions"] == 0 and end["lm_requests_waiting"] == 0
    assert end["lm_kv_cache_blocks_used"] == start["lm_kv_cache_blocks_used"]
    assert end["process_open_fds"] <= warm["process_open_fds"] + 2  # the clients' connections closed
    assert end["process_resident_memory_bytes"] - warm["process_resident_memory_bytes"] < 32 * mib * SCALE


def test_a_flood_gets_200_or_429_and_the_server_goes_on(smollm2_workspace, tmp_path):
    s = LmServer(smollm2_workspace, "--dtype", "bfloat16", "--max-concurrent-requests", "8", "--max-queue-len", "8",
                 log_dir=tmp_path).wait_ready()
    try:
        client = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=64))  # one, as a load tool's

        def ask(_):
            begun = time.monotonic()
            r = client.post(s.url + "/v1/chat/completions",
                            json={"model": MODEL, "messages": CHAT, "max_tokens": 16, "ignore_eos": True})
            return r, time.monotonic() - begun

        before = gauges(s.url)["process_resident_memory_bytes"]
        with client, ThreadPoolExecutor(64) as pool:
            answers = list(pool.map(ask, range(160 * SCALE)))
        codes = [r.status_code for r, _ in answers]
        refused = sorted(t for r, t in answers if r.status_code == 429)
        print(f"\nflood: {len(codes)} requests, 64 at a time: {codes.count(200)} answered, {len(refused)} refused "
              f"(429), time to a 429: median {statistics.median(refused or [0]) * 1e3:.0f} ms, "
              f"p99 {refused[int(len(refused) * 0.99) - 1] * 1e3 if refused else 0:.0f} ms")
        assert set(codes) <= {200, 429} and codes.count(200) >= 16, codes
        assert all(r.headers.get("retry-after") == "1" for r, _ in answers if r.status_code == 429)
        wait_until(lambda: gauges(s.url)["lm_requests_running"] == 0, "requests still running")
        after = gauges(s.url)
        print(f"server RSS {before / (1 << 20):.0f} MiB -> {after['process_resident_memory_bytes'] / (1 << 20):.0f} "
              f"after the flood; KV blocks used {after['lm_kv_cache_blocks_used']:.0f}")
        assert after["lm_kv_cache_blocks_used"] == 0
        assert httpx.post(s.url + "/v1/chat/completions", timeout=300,
                          json={"model": MODEL, "messages": CHAT, "max_tokens": 4}).status_code == 200
    finally:
        s.stop()


def test_huge_prompts_are_refused_before_tokenizing_and_leave_memory_as_it_was(server):
    """10 MB prompts (the issue measured 15 s of tokenizing to refuse one, and the memory stayed grown): each is a
    400 before it is tokenized; after a round of them the server's memory is where one round left it."""
    huge = "word " * (2 << 20)  # 10 MiB
    bodies = [("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": huge}]}),
              ("/v1/completions", {"model": MODEL, "prompt": huge}),
              ("/v1/chat/interactive", {"prompt": huge})]
    mib, times, rss = 1 << 20, [], [gauges(server.url)["process_resident_memory_bytes"]]
    with httpx.Client(timeout=300) as client:
        for _ in range(2):
            for _ in range(3 * SCALE):
                for path, body in bodies:
                    begun = time.monotonic()
                    r = client.post(server.url + path, json=body)
                    times.append(time.monotonic() - begun)
                    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
            rss.append(gauges(server.url)["process_resident_memory_bytes"])
    print(f"\nhuge prompts: {len(times)} of 10 MiB refused, median {statistics.median(times) * 1e3:.0f} ms, "
          f"slowest {max(times) * 1e3:.0f} ms; server RSS {rss[0] / mib:.0f} MiB -> {rss[1] / mib:.0f} after the "
          f"first round -> {rss[2] / mib:.0f} after the second")
    assert rss[2] - rss[1] < 32 * mib
    assert client.is_closed and httpx.post(server.url + "/v1/chat/completions", timeout=300, json={
        "model": MODEL, "messages": CHAT, "max_tokens": 4}).status_code == 200
