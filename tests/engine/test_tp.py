"""Tensor parallelism on CPU: two processes over gloo."""

import asyncio
import os
import signal

import pytest
import torch

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
        while engine.warm():  # each piece of the pool's first touch is a message to the worker too
            pass
        assert greedy_run(engine) == single  # the cached prefixes, on both ranks, are intact
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


def first_logprobs(engine):
    tok = engine.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True,
                                   tokenize=False)
    engine.add_request("lp", tok.encode(text, add_special_tokens=False),
                       SamplingParams(temperature=0, max_tokens=1, logprobs=3))
    out = []
    while engine.has_work:
        out += [lp for o in engine.step() for lp in o.logprobs]
    return dict(out[0].top)


def test_tp2_quantizes_each_shard_in_blocks_of_its_own(smollm2_workspace):
    """--quantization int4 under tp=2: each rank quantizes its own shard after the split, so rank 0's blocks are
    exactly the single-process blocks of the same columns (its row-parallel shards start on multiples of 32: 6 heads
    of 64, 768 of the 1536 intermediate columns), and the first token's candidates are tp=1's. (Later greedy tokens
    may part: the all-reduce sums in another order, and a last-bit difference can round an activation to the next
    8-bit step; logprobs move by up to about 0.15 over 30 layers.)"""
    options = dict(dtype="float32", cache_block_seq_len=16, num_blocks=256, max_prefill_token_num=128,
                   quantization="int4")
    one = Engine(smollm2_workspace, **options)
    try:
        single = first_logprobs(one)
        full = {name: m.packed.dequantize() for name, m in one.runner.model.named_modules()
                if getattr(m, "packed", None) is not None}
    finally:
        one.close()
    engine = Engine(smollm2_workspace, tp=2, **options)
    try:
        layer = engine.runner.model.model.layers[0]
        for name, module in (("self_attn.o_proj", layer.self_attn.o_proj), ("mlp.down_proj", layer.mlp.down_proj)):
            mine = module.packed.dequantize()
            expected = torch.cat([full[f"model.layers.0.{name}"][:, s:e] for s, e in module.in_shards], dim=1)
            assert mine.shape[1] < full[f"model.layers.0.{name}"].shape[1] and torch.equal(mine, expected)
        split = first_logprobs(engine)
    finally:
        engine.close()
    assert set(split) == set(single)
    assert all(abs(split[t] - single[t]) < 0.3 for t in single), (split, single)


def test_idle_workers_outlive_the_collective_timeout(smollm2_workspace, monkeypatch):
    """A worker waits for the next step inside a collective, under the group's timeout (LMCLI_TP_TIMEOUT, here
    3 s); idle, rank 0 pings every quarter of it, so a server idle for longer still answers."""
    monkeypatch.setenv("LMCLI_TP_TIMEOUT", "3")
    engine = AsyncEngine(Engine(smollm2_workspace, dtype="float32", tp=2, num_blocks=64))
    ids = engine.engine.tokenizer.encode("Once upon a time", add_special_tokens=False)

    async def main():
        await asyncio.sleep(12)  # idle for four times the timeout, on purpose
        outs = [out async for out in engine.generate(ids, SamplingParams(temperature=0, max_tokens=4))]
        assert outs[-1].num_output_tokens == 4 and await engine.healthy()

    try:
        asyncio.run(main())
    finally:
        engine.close()
