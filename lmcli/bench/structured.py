"""Structured output's costs, in process on the real engine: compiling a schema (cold and cached), the grammar's
mask per decode step (filled by llguidance, applied by the sampler) at 1 and 64 sequences, and the throughput of
JSON-schema requests beside free ones of the same prompts and lengths, in interleaved rounds of one run."""

import json
import statistics
import time

import torch

from lmcli import kernels
from lmcli.bench.throughput import Result
from lmcli.engine import grammar
from lmcli.engine.engine import Engine
from lmcli.engine.prompt import encode_chat
from lmcli.engine.sampling_params import SamplingParams

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "skills"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                         "city": {"enum": ["Paris", "Rome", "Oslo", "Lima", "Cairo"]},
                         "skills": {"type": "array", "items": {"type": "string"}}}}
# long enough that every answer runs to max_tokens, as the free requests do with eos ignored: equal lengths
PEOPLE = {"type": "object", "additionalProperties": False, "required": ["people"],
          "properties": {"people": {"type": "array", "minItems": 100, "items": PERSON}}}
EXAMPLE = {"people": [{"name": "Ada Lovelace", "age": 36, "city": "Paris", "skills": ["math", "poetry"]},
                      {"name": "Alan Turing", "age": 41, "city": "Oslo", "skills": ["logic", "running"]}]}


def compile_times(engine: Engine) -> dict:
    """Milliseconds: llguidance's view of the tokenizer (once per server), a schema's first compile, the same
    schema again (the cache), and a new schema (the tokenizer built)."""
    start = time.perf_counter()
    _ = engine.grammars.tokenizer
    tokenizer = time.perf_counter() - start
    rules = grammar.json_schema(PEOPLE)
    start = time.perf_counter()
    engine.grammars.compile(rules)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    engine.grammars.compile(rules)
    cached = time.perf_counter() - start
    other = grammar.json_schema(PERSON)
    start = time.perf_counter()
    engine.grammars.compile(other)
    second = time.perf_counter() - start
    return {"tokenizer": 1e3 * tokenizer, "cold": 1e3 * cold, "cached": 1e3 * cached, "another": 1e3 * second}


def mask_cost(engine: Engine, rows: int) -> dict:
    """Median milliseconds per step for `rows` sequences walking through EXAMPLE's tokens: the masks filled, the
    masks applied to logits, the sampled tokens consumed by the matchers."""
    rules = grammar.json_schema(PEOPLE)
    matchers = [engine.grammars.matcher(rules) for _ in range(rows)]
    text = json.dumps(EXAMPLE)[:-2]  # still open: the schema wants 100 people
    tokens = engine.tokenizer.encode(text, add_special_tokens=False)
    vocab = engine.grammars.vocab_size
    logits = torch.randn(rows, vocab)
    fill, apply, consume = [], [], []
    picked = torch.arange(rows)
    for token in tokens:
        start = time.perf_counter()
        bitmask = engine.grammars.masks(matchers)
        fill.append(time.perf_counter() - start)
        start = time.perf_counter()
        kernels.mask_logits(logits, picked, bitmask)
        apply.append(time.perf_counter() - start)
        start = time.perf_counter()
        for m in matchers:
            if not m.consume_token(token):
                raise RuntimeError(f"the example left the schema: {m.get_error()}")
        consume.append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in
            (("fill", fill), ("apply", apply), ("consume", consume))}


def prompts(engine: Engine, n: int) -> list[list[int]]:
    return [encode_chat(engine.tokenizer, [{"role": "user", "content": f"List {100 + i} people as JSON: name, age, "
                                                                       "city and skills."}])
            for i in range(n)]


def run(engine: Engine, prompt_ids: list[list[int]], output_len: int, constrained: bool) -> Result:
    rules = grammar.json_schema(PEOPLE) if constrained else None
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=not constrained, grammar=rules)
    for i, ids in enumerate(prompt_ids):
        engine.add_request(f"bench-{i}", ids, params)
    produced, texts = 0, [""] * len(prompt_ids)
    start = time.perf_counter()
    while engine.has_work:
        for out in engine.step():
            produced += len(out.token_ids)
            texts[int(out.request_id[6:])] += out.text
    seconds = time.perf_counter() - start
    if constrained:  # every answer so far inside the schema: a prefix of valid JSON, cut by max_tokens
        for text in texts:
            if not text.startswith('{"people": ['):
                raise RuntimeError(f"a constrained answer left the schema: {text[:80]!r}")
    return Result("json_schema" if constrained else "free", produced, seconds)
