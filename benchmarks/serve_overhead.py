"""What the HTTP server costs: the same requests through the engine in-process (the baseline), through the
AsyncEngine (its loop thread, as the server uses it) and through `lm serve api_server` over HTTP with streaming,
in one run; and how fast /health and /v1/models answer while the server is busy.

    python benchmarks/serve_overhead.py ./workspace [--num-prompts 64] [--input-len 128] [--output-len 128]
"""

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "serve"))
from servers import LmServer  # noqa: E402

from lmcli.bench.throughput import random_prompts, run_engine  # noqa: E402
from lmcli.engine.async_engine import AsyncEngine  # noqa: E402
from lmcli.engine.engine import Engine  # noqa: E402
from lmcli.engine.sampling_params import SamplingParams  # noqa: E402


async def through_async_engine(engine: Engine, prompts, output_len: int) -> float:
    async_engine = AsyncEngine(engine)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    produced = 0

    async def one(ids):
        nonlocal produced
        async for out in async_engine.generate(ids, params):
            produced += len(out.token_ids)

    start = time.perf_counter()
    await asyncio.gather(*(one(ids) for ids in prompts))
    rate = produced / (time.perf_counter() - start)
    async_engine.close()
    return rate


async def over_http(url: str, model: str, prompts, output_len: int):
    latencies, ttfts, produced = [], [], 0
    done = asyncio.Event()

    async def one(client, ids):
        nonlocal produced
        body = {"model": model, "prompt": ids, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        start, first = time.perf_counter(), None
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if first is None and line.startswith("data: {") and '"text":""' not in line:
                    first = time.perf_counter()
                if '"usage":{' in line:
                    produced += int(line.split('"completion_tokens":')[1].split(",")[0])
        ttfts.append(first - start)

    async def probe(client):
        while not done.is_set():
            for path in ("/health", "/v1/models"):
                t = time.perf_counter()
                (await client.get(path)).raise_for_status()
                latencies.append(time.perf_counter() - t)
            await asyncio.sleep(0.05)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=200)) as client, \
            httpx.AsyncClient(base_url=url, timeout=60) as prober:
        probing = asyncio.create_task(probe(prober))
        start = time.perf_counter()
        await asyncio.gather(*(one(client, ids) for ids in prompts))
        seconds = time.perf_counter() - start
        done.set()
        await probing
    return produced, seconds, ttfts, latencies


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workspace")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    engine = Engine(args.workspace, dtype=args.dtype)
    prompts = random_prompts(engine.tokenizer, args.num_prompts, args.input_len)
    model = engine.workspace.model_name
    run_engine(engine, prompts[:4], 8, 4)  # warm up
    base = run_engine(engine, prompts, args.output_len, args.num_prompts)
    async_rate = asyncio.run(through_async_engine(engine, prompts, args.output_len))
    del engine

    server = LmServer(args.workspace, "--dtype", args.dtype).wait_ready()
    try:
        asyncio.run(over_http(server.url, model, prompts[:4], 8))  # warm up
        produced, seconds, ttfts, latencies = asyncio.run(over_http(server.url, model, prompts, args.output_len))
    finally:
        server.stop()
    rate = produced / seconds
    lat = sorted(latencies)
    print(f"{args.num_prompts} requests, {args.input_len} in / {args.output_len} out, {args.dtype}, all at once")
    print(f"engine in-process:         {base.rate:7.1f} output tok/s ({base.output_tokens} tokens, {base.seconds:.1f} s)")
    print(f"AsyncEngine in-process:    {async_rate:7.1f} output tok/s: {async_rate / base.rate:.2f}x the engine")
    print(f"over HTTP (SSE streaming): {rate:7.1f} output tok/s ({produced} tokens, {seconds:.1f} s): "
          f"{rate / base.rate:.2f}x the engine")
    print(f"time to first token over HTTP: median {statistics.median(ttfts):.2f} s, max {max(ttfts):.2f} s")
    print(f"/health and /v1/models while busy ({len(lat)} calls): median {1000 * statistics.median(lat):.1f} ms, "
          f"p99 {1000 * lat[int(0.99 * (len(lat) - 1))]:.1f} ms, max {1000 * lat[-1]:.1f} ms")


if __name__ == "__main__":
    main()
