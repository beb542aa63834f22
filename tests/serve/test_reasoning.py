"""Reasoning parsers on hand-written outputs: whole or in any pieces, the same reasoning and content."""

import random

import pytest

from lmcli.serve.reasoning import REASONING_PARSERS


def run(name, pieces):
    parser, reasoning, content = REASONING_PARSERS[name](), "", ""
    for i, piece in enumerate(pieces):
        r, c = parser.feed(piece, final=i == len(pieces) - 1)
        reasoning, content = reasoning + r, content + c
    return reasoning, content


@pytest.mark.parametrize("name,text,reasoning,content", [
    ("think", "<think>\nLet me see: 2 < 3.\n</think>\n\nYes, 2 < 3.", "Let me see: 2 < 3.", "Yes, 2 < 3."),
    ("think", "No thinking here </think> at all.", "", "No thinking here </think> at all."),
    ("think", "<think>cut off mid-thou", "cut off mid-thou", ""),
    ("think", "  <thin", "", "  <thin"),
    ("deepseek_r1", "Hmm, the user asks.\n</think>\n\nHello!", "Hmm, the user asks.", "Hello!"),
    ("deepseek_r1", "<think>Hmm.</think>Hello!", "Hmm.", "Hello!"),
    ("deepseek_r1", "Never closed", "Never closed", ""),
])
def test_whole_or_in_pieces(name, text, reasoning, content):
    rng = random.Random(0)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 10))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert run(name, pieces) == (reasoning, content), pieces
