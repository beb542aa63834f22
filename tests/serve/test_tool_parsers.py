"""Tool-call parsers on hand-written model outputs: fed whole or in any pieces, they give the same content and
calls, and the calls' streamed deltas follow OpenAI's shape."""

import json
import random

import pytest

from lmcli.serve.tool_parsers import PARSERS, default_parser


def run(name: str, text: str, pieces: list[str] = None):
    parser = PARSERS[name]()
    content, deltas = "", []
    for i, piece in enumerate(pieces or [text]):
        c, d = parser.feed(piece, final=i == len(pieces or [text]) - 1)
        content += c
        deltas += d
    return content, deltas, parser.calls


def split(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


CASES = [
    ("hermes", 'Let me look.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n'
               '</tool_call>\n<tool_call>\n{"name": "time", "arguments": {"tz": "a \\"b\\" }"}}\n</tool_call>',
     "Let me look.\n", [("weather", {"city": "Paris", "days": [1, 2]}), ("time", {"tz": 'a "b" }'})]),
    ("hermes", "No tools needed: 2 < 3 and <tool is not a tag.", "No tools needed: 2 < 3 and <tool is not a tag.", []),
    ("hermes", "<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ("hermes", '<tool_call>{"arguments": {"x": 1}, "name": "late"}</tool_call>', "", [("late", {"x": 1})]),
    ("llama3_json", '<|python_tag|>{"name": "weather", "parameters": {"city": "Oslo"}}; '
                    '{"name": "time", "parameters": {}}', "", [("weather", {"city": "Oslo"}), ("time", {})]),
    ("llama3_json", "The capital is Paris.", "The capital is Paris.", []),
    # an object that names no function, or is not JSON, is text; no arguments are {}; a number's space is not in it
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("hermes", '<tool_call>{"foo": 1}</tool_call>', '<tool_call>{"foo": 1}</tool_call>', []),
    ("hermes", '<tool_call>{"name": "f\\q", "arguments": {}}</tool_call>', '<tool_call>{"name": "f\\q", '
               '"arguments": {}}</tool_call>', []),
    ("hermes", '<tool_call>{"name": "f"}</tool_call>', "", [("f", {})]),
    ("hermes", '<tool_call>{"name": "f", "arguments": 12 }</tool_call>  \n after', "after", [("f", 12)]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>{"name": "g", "arguments": {}}'
               '</tool_call>', "", [("f", {}), ("g", {})]),
]


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_whole_or_in_pieces_the_same_content_and_calls(name, text, content, calls):
    for pieces in [None] + [split(text, seed) for seed in range(20)]:
        got_content, deltas, got_calls = run(name, text, pieces)
        assert got_content == content, pieces
        assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls, pieces
        # the deltas: per call, a first one with id and name and empty arguments, then fragments that join up
        for index, call in enumerate(got_calls):
            mine = [d for d in deltas if d.index == index]
            assert (mine[0].id, mine[0].name, mine[0].arguments) == (call.id, call.name, "")
            assert all(d.id is None and d.name is None and d.arguments for d in mine[1:])
            assert "".join(d.arguments for d in mine) == call.arguments
        assert len({c.id for c in got_calls}) == len(got_calls)


def test_an_answer_cut_inside_a_closing_tag_ends(monkeypatch):
    import signal

    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the parser did not return"))
    signal.alarm(10)
    try:
        for cut in ("</tool", "<", "\n"):
            parser = PARSERS["hermes"]()
            parser.feed('<tool_call>{"name": "f", "arguments": {}}' + cut)
            assert parser.feed("", final=True) == ("", []) and [c.name for c in parser.calls] == ["f"]
    finally:
        signal.alarm(0)


def test_only_the_requests_tools_are_calls():
    for name, text in (("llama3_json", '{"name": "Bob", "age": 3}'),
                       ("hermes", '<tool_call>{"name": "Bob", "arguments": {}}</tool_call>')):
        parser = PARSERS[name](names={"f"})
        content, deltas = parser.feed(text, final=True)
        assert content == text and not deltas and not parser.calls


def test_one_call_only_drops_the_rest():
    parser = PARSERS["hermes"](single=True)
    content, _ = parser.feed('<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", '
                             '"arguments": {}}</tool_call>', final=True)
    assert [c.name for c in parser.calls] == ["f"] and content == ""


def test_arguments_stream_before_the_call_ends():
    parser = PARSERS["hermes"]()
    _, first = parser.feed('<tool_call>{"name": "f", "arguments": {"query": "long')
    assert [(d.name, d.arguments) for d in first] == [("f", ""), (None, '{"query": "long')]
    _, more = parser.feed(' text"}}</tool_call>', final=True)
    assert [d.arguments for d in more] == [' text"}']


def test_a_cut_off_call_without_a_name_is_text():
    assert run("hermes", '<tool_call>{"na')[:2] == ('<tool_call>{"na', [])
    assert run("llama3_json", '{"na')[:2] == ('{"na', [])


def test_the_default_parser_follows_the_template():
    assert default_parser(None) == "hermes"
    assert default_parser("{{ '<tool_call>' }}{% for tool in tools %}") == "hermes"
    assert default_parser("{% if message.role == 'ipython' %}<|python_tag|>") == "llama3_json"
