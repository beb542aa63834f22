"""Serving benchmark of any OpenAI-compatible server, measured as LMDeploy's profile_restful_api.py and vLLM's
benchmark_serving do: streaming requests, at a given concurrency and/or Poisson arrival rate; time to first
token (TTFT), time per output token after the first (TPOT), inter-token latency (ITL) and end-to-end latency."""

import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import aiohttp

from lmcli.bench.datasets import Request
from lmcli.serve.stream import aevents


@dataclass
class Result:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def one_request(client: aiohttp.ClientSession, backend: str, model: str, req: Request, ignore_eos: bool,
                      count_tokens: Optional[Callable[[str], int]]) -> Result:
    body = {"model": model, "max_tokens": req.output_len, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    if backend == "chat":
        path, body["messages"] = "v1/chat/completions", [{"role": "user", "content": req.prompt}]
    else:
        path, body["prompt"] = "v1/completions", req.prompt
    start = time.perf_counter()
    last, text, usage, result = start, "", None, Result(False, req.prompt_len)
    try:
        async with client.post(path, json=body) as r:
            if r.status != 200:
                result.error = f"{r.status}: {(await r.read())[:200]!r}"
                return result
            async for chunk in aevents(r.content, sse=True):  # aiohttp: bytes, a line each
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    return result
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                    if piece:
                        now = time.perf_counter()
                        if not text:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last, text = now, text + piece
    except (aiohttp.ClientError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = time.perf_counter() - start
    if usage and usage.get("completion_tokens"):
        result.output_tokens = usage["completion_tokens"]
    elif count_tokens is not None:
        result.output_tokens = count_tokens(text)
    else:
        result.output_tokens = len(result.itl) + (1 if text else 0)  # one token a chunk
    result.ok = bool(text)
    if not result.ok:
        result.error = "no output"
    return result


async def run(url: str, backend: str, model: str, requests: list[Request], concurrency: int,
              request_rate: float, ignore_eos: bool, seed: int = 0, api_key: Optional[str] = None,
              count_tokens=None, on_done: Callable[[], None] = lambda: None) -> tuple[list[Result], float]:
    """All requests, started at Poisson arrivals of request_rate per second (inf: at once), at most concurrency
    in flight. Returns the results and the wall time."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # A new connection per request, as vLLM's and LMDeploy's benchmarks make: servers that close kept-alive
    # connections after a few requests (llama-server's HTTP library does) would otherwise race the reuse.
    # aiohttp (C HTTP parser), as vLLM's benchmark: the client shares the server's CPU here, and httpx's pure-Python
    # parsing cost about 3 times as much per streamed chunk.
    connector = aiohttp.TCPConnector(limit=concurrency + 8, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)

    async def guarded(client, req):
        async with gate:
            out = await one_request(client, backend, model, req, ignore_eos, count_tokens)
        on_done()
        return out

    async with aiohttp.ClientSession(base_url=url.rstrip("/") + "/", connector=connector, timeout=timeout,
                                     headers=headers, read_bufsize=2 ** 20) as client:
        start, tasks = time.perf_counter(), []
        for req in requests:
            tasks.append(asyncio.create_task(guarded(client, req)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out = {"requests": len(results), "successful": len(ok), "failed": len(results) - len(ok),
           "duration_s": duration, "request_throughput": len(ok) / duration,
           "input_throughput": sum(r.prompt_len for r in ok) / duration,
           "output_throughput": sum(r.output_tokens for r in ok) / duration,
           "total_input_tokens": sum(r.prompt_len for r in ok), "total_output_tokens": sum(r.output_tokens for r in ok)}
    series = {"ttft": [r.ttft for r in ok], "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok
                                                     if r.output_tokens > 1],
              "itl": [x for r in ok for x in r.itl], "e2e": [r.latency for r in ok]}
    for name, values in series.items():
        out[name] = {"mean": statistics.fmean(values) if values else None,
                     "median": statistics.median(values) if values else None,
                     "p99": percentile(values, 99) if values else None}
    errors = [r.error for r in results if not r.ok]
    out["errors"] = errors[:10]
    return out


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (k - lo)


def results_json(summary: dict, config: dict, results: list[Result]) -> str:
    return json.dumps({"config": config, "summary": summary, "requests": [asdict(r) for r in results]}, indent=1)
