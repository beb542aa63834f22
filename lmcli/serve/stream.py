"""Reading a streamed answer: server-sent events (`data: {...}` lines, the last `data: [DONE]`: the OpenAI routes)
or NDJSON (a JSON object a line: /v1/chat/interactive). One parser for every reader here (APIClient, `lm bench
serve`, `lm bench sessions`), whatever carries the lines: httpx or aiohttp, text or bytes, sync or async."""

import json
from typing import AsyncIterable, AsyncIterator, Iterable, Iterator, Union

DONE = object()  # SSE's `data: [DONE]`: the answer is complete


def parse_line(line: Union[str, bytes], sse: bool):
    """A line's JSON object; None for a line that carries none (blank; in SSE a comment or another field); DONE for
    SSE's last line. ValueError for a line that should hold a JSON object and does not."""
    if sse:
        if not line.startswith(b"data:" if isinstance(line, bytes) else "data:"):
            return None
        line = line[5:].strip()
        if line in ("[DONE]", b"[DONE]"):
            return DONE
    if not line.strip():
        return None
    try:
        item = json.loads(line)
    except ValueError:
        item = None
    if not isinstance(item, dict):
        raise ValueError(f"a line that is not a JSON object: {line[:80]!r}")
    return item


def events(lines: Iterable, sse: bool) -> Iterator[dict]:
    """The JSON objects of a stream's lines, up to SSE's DONE."""
    for line in lines:
        item = parse_line(line, sse)
        if item is DONE:
            return
        if item is not None:
            yield item


async def aevents(lines: AsyncIterable, sse: bool) -> AsyncIterator[dict]:
    """events() over lines that arrive asynchronously (httpx's aiter_lines(), aiohttp's response content)."""
    async for line in lines:
        item = parse_line(line, sse)
        if item is DONE:
            return
        if item is not None:
            yield item
