"""The engine's per-request behaviour on the real SmolLM2 workspace."""

import pytest

from lmcli.engine.detokenizer import Detokenizer
from lmcli.engine.engine import Engine, SessionBusy
from lmcli.engine.sampling_params import SamplingParams
from lmcli.errors import UserError


@pytest.fixture(scope="module")
def engine(smollm2_workspace):
    return Engine(smollm2_workspace, dtype="float32", cache_block_seq_len=16, session_len=1024)


def chat(engine, text):
    t = engine.tokenizer
    prompt = t.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return t.encode(prompt, add_special_tokens=False)


def run(engine, requests: dict, abort_after: dict = None):
    """requests: {id: (prompt ids, params)}; runs to the end. Returns {id: {index: (tokens, text, last output)}}."""
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    results, steps = {}, 0
    while engine.has_work:
        steps += 1
        for rid, when in (abort_after or {}).items():
            if when == steps:
                for o in engine.abort(rid):
                    results.setdefault(rid, {}).setdefault(o.index, [[], "", None])[2] = o
        for o in engine.step():
            r = results.setdefault(o.request_id, {}).setdefault(o.index, [[], "", None])
            r[0] += o.token_ids
            r[1] += o.text
            r[2] = o
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    return results


def test_seeded_sampling_is_the_same_in_any_batch(engine):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    ids = chat(engine, "Tell me a story about a dragon.")
    alone = run(engine, {"a": (ids, params)})["a"][0][0]
    crowd = {f"x{i}": (chat(engine, f"Question {i}: what is {i} + {i}?"),
                       SamplingParams(temperature=1.0, seed=i, max_tokens=10 + i)) for i in range(5)}
    crowd["a"] = (ids, params)
    together = run(engine, crowd)["a"][0][0]
    assert alone == together
    other = run(engine, {"b": (ids, SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99,
                                                     max_tokens=24, ignore_eos=True))})["b"][0][0]
    assert other != alone


def test_n_choices_differ_and_repeat_with_their_seed(engine):
    ids = chat(engine, "Name a color.")
    params = SamplingParams(temperature=1.0, seed=5, n=3, max_tokens=12, ignore_eos=True)
    first = run(engine, {"n": (ids, params)})["n"]
    second = run(engine, {"n": (ids, params)})["n"]
    assert sorted(first) == [0, 1, 2]
    assert [first[i][0] for i in range(3)] == [second[i][0] for i in range(3)]
    assert len({tuple(first[i][0]) for i in range(3)}) > 1


def test_multi_token_stop_string_stops_and_is_not_returned(engine):
    ids = chat(engine, "Write a haiku about the sea.")
    free = run(engine, {"g": (ids, SamplingParams(temperature=0, max_tokens=40))})["g"][0]
    text = free[1]
    words = text.split()
    stop = " ".join(words[3:5])  # two words in the middle: several tokens
    assert len(engine.tokenizer.encode(stop, add_special_tokens=False)) >= 2
    got = run(engine, {"s": (ids, SamplingParams(temperature=0, max_tokens=40, stop=(stop, "NEVER HAPPENS")))})
    tokens, streamed, last = got["s"][0]
    assert last.finish_reason == "stop"
    assert streamed == text[:text.index(stop)]
    assert stop not in streamed


def test_stop_token_ids_and_max_tokens(engine):
    ids = chat(engine, "Count from one to ten in words.")
    free = run(engine, {"g": (ids, SamplingParams(temperature=0, max_tokens=30))})["g"][0][0]
    target = free[5]
    got = run(engine, {"t": (ids, SamplingParams(temperature=0, max_tokens=30, stop_token_ids=(target,)))})["t"][0]
    assert got[0] == free[:free.index(target) + 1] and got[2].finish_reason == "stop"
    assert got[1] == engine.tokenizer.decode(free[:free.index(target)])
    short = run(engine, {"m": (ids, SamplingParams(temperature=0, max_tokens=4))})["m"][0]
    assert short[0] == free[:4] and short[2].finish_reason == "length" and short[2].num_output_tokens == 4


def test_eos_min_tokens_and_ignore_eos(engine):
    ids = chat(engine, "Say hi.")
    plain = run(engine, {"p": (ids, SamplingParams(temperature=0, max_tokens=100))})["p"][0]
    assert plain[2].finish_reason == "stop" and plain[0][-1] in engine.model_stop_ids
    n = len(plain[0])
    longer = run(engine, {"q": (ids, SamplingParams(temperature=0, max_tokens=100, min_tokens=n + 5))})["q"][0]
    assert len(longer[0]) >= n + 5
    forced = run(engine, {"r": (ids, SamplingParams(temperature=0, max_tokens=n + 10, ignore_eos=True))})["r"][0]
    assert len(forced[0]) == n + 10 and forced[2].finish_reason == "length"


def test_abort_anytime_returns_every_block(engine):
    reqs = {f"a{i}": (chat(engine, f"Write a long essay about topic number {i}."),
                      SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)) for i in range(6)}
    got = run(engine, reqs, abort_after={"a0": 1, "a3": 3, "a5": 10})
    for rid in ("a0", "a3", "a5"):
        assert got[rid][0][2].finish_reason == "abort"
    assert got["a1"][0][2].finish_reason == "length" and len(got["a1"][0][0]) == 40
    assert engine.abort("unknown") == []


def test_too_long_prompt_and_bad_requests_are_user_errors(engine):
    with pytest.raises(UserError, match="context holds 1024"):
        engine.add_request("long", [1] * 1024, SamplingParams())
    with pytest.raises(UserError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(UserError, match="token ids"):
        engine.add_request("vocab", [10 ** 6], SamplingParams())
    with pytest.raises(UserError, match="temperature"):
        SamplingParams(temperature=3)
    assert not engine.has_work and engine.requests == {}


def test_session_full_busy_and_end(engine):
    ids = chat(engine, "Hello!")
    engine.add_request("t1", ids, SamplingParams(temperature=0, max_tokens=8), session_id=3)
    with pytest.raises(SessionBusy):
        engine.add_request("t1b", ids, SamplingParams(), session_id=3)
    while engine.has_work:
        engine.step()
    history = len(engine.scheduler.sessions[3].token_ids)
    outs = engine.add_request("t2", [5] * (1024 - history), SamplingParams(), session_id=3)
    assert len(outs) == 1 and outs[0].finish_reason == "length" and "session" in outs[0].finish_message
    assert len(engine.scheduler.sessions[3].token_ids) == history  # the refused turn left no trace
    engine.end_session(3)
    assert 3 not in engine.scheduler.sessions
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_a_session_that_fills_mid_answer_says_so(engine):
    def last_output():
        outs = []
        while engine.has_work:
            outs += engine.step()
        return [o for o in outs if o.finish_reason][-1]

    ids = chat(engine, "Hello!")
    engine.add_request("f1", ids, SamplingParams(temperature=0, max_tokens=4), session_id=4)
    last_output()
    history = len(engine.scheduler.sessions[4].token_ids)
    engine.add_request("f2", [5] * (1024 - history - 3), SamplingParams(ignore_eos=True), session_id=4)
    last = last_output()
    assert last.finish_reason == "length" and last.num_output_tokens == 3
    assert "context is full" in last.finish_message and "end the session" in last.finish_message
    engine.end_session(4)
    engine.add_request("f3", ids, SamplingParams(max_tokens=2, ignore_eos=True))
    last = last_output()
    assert last.finish_reason == "length" and last.finish_message is None  # what the request asked for
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_detokenizer_multibyte_and_leading_spaces(engine):
    tok = engine.tokenizer
    text = " Grüße 你好 🤖 café — naïve ﷺ"
    ids = tok.encode(text, add_special_tokens=False)
    prompt = tok.encode("Say:", add_special_tokens=False)
    det = Detokenizer(tok, prompt)
    pieces = []
    for t in ids:
        det.add(t)
        pieces.append(det.delta(final=False))
    pieces.append(det.delta(final=True))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[0].startswith(" ")


def test_detokenizer_spaces_between_kept_special_tokens(engine):
    tok = engine.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok.encode("Hi", add_special_tokens=False) + [end] + tok.encode("there", add_special_tokens=False) + [end]

    def text(**options):
        det = Detokenizer(tok, tok.encode("Say:", add_special_tokens=False), **options)
        for t in ids:
            det.add(t)
        return det.delta(final=True)

    assert text(skip_special_tokens=False) == "Hi <|im_end|> there <|im_end|>"
    assert text(skip_special_tokens=False, spaces_between_special_tokens=False) == "Hi<|im_end|>there<|im_end|>"
    assert text() == text(spaces_between_special_tokens=False) == "Hithere"


def test_kv_pool_is_sized_from_free_memory(smollm2_workspace):
    from lmcli.engine import model_runner

    small = Engine(smollm2_workspace, dtype="bfloat16", cache_max_entry_count=0.01)
    c, bs = small.workspace.config, small.config.cache.block_size
    block_bytes = 2 * c.num_layers * c.num_kv_heads * bs * c.head_dim * 2  # K and V, bfloat16
    budget = min(model_runner.available_memory() * 0.01, small.config.cache.cpu_cache_cap_bytes)
    assert 0.5 * budget <= small.runner.num_blocks * block_bytes <= 1.5 * budget
    assert tuple(small.runner.kv_cache.shape) == (2, c.num_layers, small.runner.num_blocks, c.num_kv_heads, bs,
                                                  c.head_dim)
    capped = Engine(smollm2_workspace, dtype="bfloat16", cache_max_entry_count=1.0)
    assert capped.runner.num_blocks * block_bytes <= small.config.cache.cpu_cache_cap_bytes
    assert capped.block_manager.num_blocks == capped.runner.num_blocks > small.runner.num_blocks


class ByteTokenizer:
    """Each token is a few raw bytes, so a token can end inside a UTF-8 character (as byte-level BPE tokens do)."""

    VOCAB = {0: b"c", 1: b"ab\xe2", 2: b"\x82\xac", 3: b"x"}

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return b"".join(self.VOCAB[i] for i in ids).decode("utf-8", errors="replace")


def test_a_stop_string_before_an_incomplete_character_is_found_and_never_sent():
    det = Detokenizer(ByteTokenizer(), [3], stop=("ab",))
    assert not det.add(0)
    assert det.add(1)  # "ab" arrives with half of a euro sign
    assert det.delta(final=True) == "c"
    whole = Detokenizer(ByteTokenizer(), [3], stop=("zz",))
    for t in (0, 1, 2):
        whole.add(t)
    assert whole.delta(final=True) == "cab€"
    cut = Detokenizer(ByteTokenizer(), [3], stop=("€",))
    cut.add(0)
    cut.add(1)
    assert cut.add(2) and cut.delta(final=True) == "cab"


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0},
                         "city": {"enum": ["Paris", "Rome", "Oslo"]}}}


def test_a_json_schema_holds_for_greedy_and_sampled_choices_beside_a_free_request(engine):
    import json

    import jsonschema

    from lmcli.engine import grammar

    rules = grammar.json_schema(PERSON)
    ids = chat(engine, "Describe a person.")
    out = run(engine, {"greedy": (ids, SamplingParams(temperature=0, max_tokens=60, grammar=rules)),
                       "sampled": (ids, SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=60, grammar=rules)),
                       "free": (ids, SamplingParams(temperature=0, max_tokens=12))})
    answers = [out["greedy"][0]] + [out["sampled"][i] for i in range(3)]
    for tokens, text, last in answers:
        assert last.finish_reason == "stop", text  # the grammar ended it: no end-of-sequence step needed
        jsonschema.validate(json.loads(text), PERSON)
    assert not out["free"][0][1].lstrip().startswith("{")  # the free request beside them was not constrained
    digits = run(engine, {"r": (ids, SamplingParams(temperature=1.0, seed=1, max_tokens=10,
                                                    grammar=grammar.regex("[0-9]{3}-[a-z]{2}")))})["r"][0]
    assert len(digits[1]) == 6 and digits[1][:3].isdigit() and digits[1][3] == "-" and digits[1][4:].islower()


def test_a_grammar_that_cannot_be_enforced_is_refused(engine):
    from lmcli.engine import grammar

    with pytest.raises(UserError) as e:  # "not" is a keyword the grammar library does not implement
        engine.add_request("bad", [1, 2, 3], SamplingParams(grammar=grammar.json_schema({"not": {"type": "null"}})))
    assert e.value.param == "response_format" and "not" in str(e.value)
    with pytest.raises(UserError) as e:
        SamplingParams(grammar=grammar.json_object(), min_tokens=2)
    assert e.value.param == "min_tokens"
    assert not engine.has_work
