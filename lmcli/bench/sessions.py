"""Multi-turn conversations against a server: the time to first token by turn number, with the server keeping the
history (/v1/chat/interactive, interactive_mode=true) and with every request resending it
(/v1/chat/completions). A server that keeps the KV cache of a session answers turn 10 as fast as turn 1."""

import asyncio
import random
import statistics
import time
from typing import Optional

import httpx

from lmcli.serve.stream import aevents


def user_messages(conversations: list[dict], num_sessions: int, turns: int, seed: int, max_words: int = 48):
    """num_sessions lists of `turns` human messages from ShareGPT conversations, each cut to max_words words."""
    rng = random.Random(seed)
    pool = []
    for conv in conversations:
        human = [t["value"] for t in conv.get("conversations", []) if t.get("from") == "human" and t["value"].strip()]
        if len(human) >= turns:
            pool.append([" ".join(m.split()[:max_words]) for m in human[:turns]])
    rng.shuffle(pool)
    if len(pool) < num_sessions:
        raise ValueError(f"only {len(pool)} conversations have {turns} turns")
    return pool[:num_sessions]


async def _ttft(client: httpx.AsyncClient, path: str, body: dict, sse: bool) -> tuple[float, str]:
    start, first, text = time.perf_counter(), None, ""
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{path}: {r.status_code} {(await r.aread())[:200]!r}")
        async for item in aevents(r.aiter_lines(), sse):
            if sse:
                piece = "".join((c.get("delta") or {}).get("content") or "" for c in item.get("choices", []))
            else:
                piece = item.get("text", "")
            if "error" in item:
                raise RuntimeError(str(item["error"]))
            if piece and first is None:
                first = time.perf_counter() - start
            text += piece
    return (first if first is not None else time.perf_counter() - start), text


async def conversation(client, model: str, messages: list[str], output_len: int, interactive: bool,
                       session_id: int) -> list[float]:
    """TTFT of each turn of one conversation."""
    ttfts, history = [], []
    for text in messages:
        if interactive:
            body = {"prompt": text, "session_id": session_id, "interactive_mode": True, "stream": True,
                    "request_output_len": output_len, "temperature": 0, "ignore_eos": True}
            ttft, answer = await _ttft(client, "/v1/chat/interactive", body, sse=False)
        else:
            history.append({"role": "user", "content": text})
            body = {"model": model, "messages": history, "stream": True, "max_tokens": output_len,
                    "temperature": 0, "ignore_eos": True}
            ttft, answer = await _ttft(client, "/v1/chat/completions", body, sse=True)
            history.append({"role": "assistant", "content": answer})
        ttfts.append(ttft)
    if interactive:  # end the session
        await client.post("/v1/chat/interactive", json={"prompt": "", "session_id": session_id,
                                                        "request_output_len": 0})
    return ttfts


async def run(url: str, model: str, sessions: list[list[str]], output_len: int, interactive: bool,
              api_key: Optional[str] = None, seed: int = 0) -> list[list[float]]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None, connect=10), headers=headers) as client:
        return list(await asyncio.gather(*(conversation(client, model, msgs, output_len, interactive,
                                                        rng.randrange(1, 1 << 30)) for msgs in sessions)))


def by_turn(ttfts: list[list[float]]) -> list[float]:
    """The median TTFT of each turn number over the conversations."""
    return [statistics.median(turn) for turn in zip(*ttfts)]
