"""Tensor parallelism on CPU: two processes over gloo."""

import asyncio
import os
import signal

import pytest

from lmcli.engine.async_engine import AsyncEngine, EngineDead
from lmcli.engine.distributed import WorkerError
from lmcli.engine.engine import Engine
from lmcli.engine.sampling_params import SamplingParams

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Count from one to ten.",
             "Explain photosynthesis in detail, step by step, for a student. " * 6]


def greedy_run(engine):
    tok, outs = engine.tokenizer, {}
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for i, q in enumerate(QUESTIONS):
        text = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        engine.add_request(str(i), tok.encode(text, add_special_tokens=False), params)
        engine.step()  # staggered: each joins a batch already running
    while engine.has_work:
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.token_ids)
    return [outs[str(i)] for i in range(len(QUESTIONS))]


def test_tp2_gives_the_same_greedy_tokens_as_tp1(smollm2_workspace):
    options = dict(dtype="float32", cache_block_seq_len=16, num_blocks=256, max_prefill_token_num=128)
    single = greedy_run(Engine(smollm2_workspace, **options))
    engine = Engine(smollm2_workspace, tp=2, **options)
    try:
        assert engine.runner.tp.size == 2 and len(engine.runner.workers) == 1
        # SmolLM2's 9 heads / 3 kv heads split unevenly: rank 0 holds 2 kv heads (6 query heads)
        attn = engine.runner.model.model.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads) == (6, 2)
        assert greedy_run(engine) == single
        assert engine.block_manager.num_free == engine.block_manager.num_blocks
    finally:
        engine.close()
    assert all(p.poll() is not None for p in engine.runner.workers)


def test_a_dead_worker_is_an_error_not_a_hang(smollm2_workspace):
    engine = AsyncEngine(Engine(smollm2_workspace, dtype="float32", tp=2, num_blocks=64))
    ids = engine.engine.tokenizer.encode("Once upon a time", add_special_tokens=False)

    async def main():
        stream = engine.generate(ids, SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
        with pytest.raises(EngineDead, match="worker 1 died"):
            async for out in stream:
                if out.num_output_tokens == 3:
                    os.kill(engine.engine.runner.workers[0].pid, signal.SIGKILL)
        assert not await engine.healthy()
        with pytest.raises(EngineDead):
            async for _ in engine.generate(ids, SamplingParams()):
                pass

    try:
        asyncio.run(asyncio.wait_for(main(), timeout=60))
    finally:
        engine.close()
    assert isinstance(engine.error, WorkerError)
