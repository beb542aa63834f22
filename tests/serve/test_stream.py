"""The one reader of streamed answers (lmcli/serve/stream.py): SSE and NDJSON, text or bytes, sync or async."""

import asyncio

import pytest

from lmcli.serve.stream import DONE, aevents, events, parse_line

SSE = ['data: {"a": 1}', "", ": a comment", "event: message", 'data:{"b": 2}', "data: [DONE]", 'data: {"late": 1}']


def test_sse_lines_give_their_objects_up_to_done():
    assert parse_line('data: {"a": 1}', sse=True) == {"a": 1}
    assert parse_line(b'data: {"a": 1}\n', sse=True) == {"a": 1}  # aiohttp's lines are bytes with their newline
    assert parse_line("data: [DONE]", sse=True) is DONE and parse_line(b"data: [DONE]\n", sse=True) is DONE
    assert parse_line(": keep-alive", sse=True) is None and parse_line("", sse=True) is None
    assert parse_line("data: ", sse=True) is None
    assert list(events(SSE, sse=True)) == [{"a": 1}, {"b": 2}]  # nothing after [DONE]
    assert list(events([line.encode() + b"\n" for line in SSE], sse=True)) == [{"a": 1}, {"b": 2}]


def test_ndjson_lines_give_every_object():
    lines = ['{"text": "a"}', "", '{"text": "b", "finish_reason": "stop"}']
    assert [i["text"] for i in events(lines, sse=False)] == ["a", "b"]


@pytest.mark.parametrize("line,sse", [("data: {not json", True), ('data: [1, 2]', True), ("oops", False),
                                      ('"a string"', False)])
def test_a_line_that_is_not_a_json_object_is_a_value_error_naming_it(line, sse):
    with pytest.raises(ValueError, match="not a JSON object"):
        list(events([line], sse))


def test_async_lines_read_the_same():
    async def lines():
        for line in SSE:
            yield line

    async def read():
        return [item async for item in aevents(lines(), sse=True)]

    assert asyncio.run(read()) == [{"a": 1}, {"b": 2}]


def test_api_client_names_a_line_that_is_not_json():
    """Through the real APIClient over a real socket: a stream that breaks off into garbage is an APIClientError
    saying what came, not a JSON traceback."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from lmcli.serve.api_client import APIClient, APIClientError
    from servers import serve_in_thread

    async def broken(request):
        async def body():
            yield 'data: {"choices": [{"text": "ok"}]}\n\n'
            yield "data: {oops\n\n"
        return StreamingResponse(body(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/completions", broken, methods=["POST"])])
    with serve_in_thread(app) as url, APIClient(url) as client:
        answers = client.completions_v1("m", "hi", stream=True)
        assert next(answers)["choices"][0]["text"] == "ok"
        with pytest.raises(APIClientError, match=r"the server sent a line that is not a JSON object: '\{oops'"):
            next(answers)
