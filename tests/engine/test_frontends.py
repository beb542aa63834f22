"""The engine's fronts: the async engine (for the server), pipeline (for scripts) and `lm chat`."""

import asyncio
import re

import pytest

from lmcli import pipeline
from lmcli.engine.async_engine import AsyncEngine
from lmcli.engine.engine import Engine
from lmcli.engine.sampling_params import SamplingParams
from lmcli.errors import UserError
from conftest import run_lm


@pytest.fixture(scope="module")
def pipe(smollm2_workspace):
    return pipeline(smollm2_workspace, dtype="float32")


def test_pipeline_strings_and_messages(pipe):
    a, b = pipe(["Hi", "What is the capital of France?"], max_new_tokens=24, temperature=0)
    assert a.finish_reason == "stop" and a.text and a.token_ids[-1] == 2  # <|im_end|>
    assert "Paris" in b.text and b.input_token_len > 20 and b.generate_token_len == len(b.token_ids)
    same = pipe([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24, temperature=0)
    assert same.text == b.text
    capped = pipe("Write a long story.", max_new_tokens=5, temperature=0.8, top_p=0.9, random_seed=1)
    assert capped.finish_reason == "length" and capped.generate_token_len == 5
    with pytest.raises(TypeError, match="bogus"):
        pipe("Hi", bogus=1)
    forced = pipe("Name a fruit.", max_new_tokens=2, temperature=0, logit_bias={"21285": 100})  # " banana"
    assert forced.token_ids == [21285, 21285]
    assert pipe("Name a fruit.", max_new_tokens=2, temperature=0, logit_bias=[(21285, 100)]).token_ids == [21285] * 2
    from lmcli.engine import grammar

    shaped = pipe("Describe a cat.", grammar=grammar.regex("(yes|no), [a-z]{3,10}"), temperature=0, max_new_tokens=20)
    assert re.fullmatch("(yes|no), [a-z]{3,10}", shaped.text) and shaped.finish_reason == "stop", shaped


def test_async_engine_streams_aborts_and_reports_errors(smollm2_workspace):
    engine = AsyncEngine(Engine(smollm2_workspace, dtype="float32"))
    tok = engine.engine.tokenizer
    ids = tok.encode("Once upon a time", add_special_tokens=False)

    async def collect(params):
        return [o async for o in engine.generate(ids, params)]

    async def main():
        full = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        outs = await asyncio.gather(*[collect(full) for _ in range(4)])
        assert all(len(o) == 16 and o[-1].finish_reason == "length" for o in outs)
        assert len({tuple(t for x in o for t in x.token_ids) for o in outs}) == 1
        # a caller that leaves early (a disconnected client) aborts its request
        stream = engine.generate(ids, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        async for out in stream:
            assert await engine.healthy()  # the loop answers between steps while generating
            break
        await stream.aclose()
        for _ in range(50):
            if await engine.call(lambda e: not e.has_work):
                break
            await asyncio.sleep(0.05)
        bm = engine.engine.block_manager
        assert await engine.call(lambda e: bm.num_free == bm.num_blocks)
        with pytest.raises(UserError, match="empty"):
            async for _ in engine.generate([], SamplingParams()):
                pass

    try:
        asyncio.run(main())
    finally:
        engine.close()


def test_lm_chat_keeps_the_conversation(smollm2_workspace):
    done = run_lm("chat", smollm2_workspace, "--temperature", "0", "--max-new-tokens", "20",
                  input="Hello, I am Ada.\n/reset\nHi again.\nWhat did I say?\nexit\n")
    assert done.returncode == 0, done.stderr
    stats = re.findall(r"\[(\d+) tokens, [\d.]+ tokens/s, (\d+) cached\]", done.stderr)
    assert len(stats) == 3
    assert int(stats[0][1]) == 0 and int(stats[1][1]) == 0  # first turns of two conversations
    assert int(stats[2][1]) > 20  # the next turn continues the session's cache
    assert "(a new conversation)" in done.stderr


def test_bench_throughput_prints_both_engines(smollm2_workspace):
    done = run_lm("bench", "throughput", smollm2_workspace, "--num-prompts", "4", "--concurrency", "4",
                  "--input-len", "16", "--output-len", "8", "--hf-batch-sizes", "2,4", "--dtype", "float32")
    assert done.returncode == 0, done.stderr
    for row in ("lm engine ", "lm engine, one stream", "transformers generate, batch 2",
                "transformers generate, batch 4", "transformers, one stream"):
        assert row in done.stdout
    assert re.search(r"lm engine\s+│\s+32 │", done.stdout)  # 4 prompts x 8 tokens
    assert re.search(r"batch throughput: [\d.]+x transformers' best", done.stdout)


def test_bench_structured_prints_compile_mask_and_both_throughputs(smollm2_workspace):
    done = run_lm("bench", "structured", smollm2_workspace, "--concurrency", "3", "--output-len", "6", "--repeat", "1",
                  "--dtype", "float32")
    assert done.returncode == 0, done.stderr
    assert re.search(r"a schema cold [\d.]+ ms, cached [\d.]+ ms", done.stdout)
    for rows in ("1 sequence:", "3 sequences:"):
        assert re.search(rows + r" fill [\d.]+ ms, apply [\d.]+ ms, consume [\d.]+ ms", done.stdout), done.stdout
    assert re.search(r"free: 18 tokens in", done.stdout) and re.search(r"json_schema: 18 tokens in", done.stdout)
    assert re.search(r"constrained throughput: [\d.]+% of free", done.stdout)


def test_bench_medians_pick_the_middle_run_per_name():
    from lmcli.bench.throughput import Result, medians

    runs = [Result("a", 100, 1.0), Result("b", 10, 1.0), Result("a", 100, 4.0), Result("a", 100, 2.0),
            Result("b", 30, 1.0)]
    got = medians(runs)
    assert [r.name for r in got] == ["a", "b"]
    assert got[0].seconds == 2.0 and got[1].output_tokens == 30  # b: of 10 and 30 tok/s, the upper middle


def test_async_engine_builds_its_engine_on_the_loop_thread(smollm2_workspace):
    """Weights loaded on another thread leave a second OpenMP team behind, which slowed every step by half."""
    import threading

    built_on = []

    def build():
        built_on.append(threading.get_ident())
        return Engine(smollm2_workspace, dtype="float32", num_blocks=16)

    engine = AsyncEngine(build)
    try:
        assert built_on == [engine._thread.ident] != [threading.get_ident()]
        assert asyncio.run(engine.call(lambda e: threading.get_ident())) == built_on[0]
    finally:
        engine.close()

    def broken():
        raise UserError("no such workspace")

    with pytest.raises(UserError, match="no such workspace"):
        AsyncEngine(broken)
