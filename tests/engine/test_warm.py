"""The KV pool's first touch, done ahead of use while the engine is idle (memory.populate, Engine.warm)."""

import asyncio
import ctypes
import math
import mmap
import sys

import pytest
import torch

from lmcli.engine import memory
from lmcli.engine.async_engine import AsyncEngine
from lmcli.engine.engine import WARM_BYTES, Engine
from lmcli.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore: Linux only")


def resident(t: torch.Tensor) -> float:
    """The fraction of t's pages in memory (mincore)."""
    start, size = t.data_ptr(), t.numel() * t.element_size()
    base = start // memory.PAGE * memory.PAGE
    pages = (start + size - base + memory.PAGE - 1) // memory.PAGE
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(base), ctypes.c_size_t(start + size - base), vec) == 0
    return sum(v & 1 for v in vec) / pages


@pytest.mark.parametrize("advice", [memory.MADV_POPULATE_WRITE, 9999], ids=["madvise", "written-back"])
def test_populate_faults_pages_in_and_keeps_their_contents(monkeypatch, advice):
    monkeypatch.setattr(memory, "MADV_POPULATE_WRITE", advice)  # 9999: refused, so each page is written back
    m = mmap.mmap(-1, 64 * memory.PAGE, flags=mmap.MAP_PRIVATE)
    t = torch.frombuffer(m, dtype=torch.int16)
    expected = torch.zeros_like(t)
    for i, v in ((100, 7), (20000, -3), (-1, 12345)):  # pages 0, 9 and 63
        t[i] = expected[i] = v
    assert resident(t) == 3 / 64  # read before it is populated, a page maps the zero page and counts as in
    memory.populate(t[:5 * memory.PAGE + 2])  # pages 0-10, the last one in part
    assert resident(t) == 12 / 64
    memory.populate(t[5 * memory.PAGE + 2:])  # the rest, from inside page 10
    assert resident(t) == 1.0
    assert torch.equal(t, expected)
    del t
    m.close()


def chat_ids(engine, text):
    return engine.tokenizer.encode(text, add_special_tokens=False)


def greedy(engine, ids, n=12):
    engine.add_request("r", ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    out = []
    while engine.has_work:
        for o in engine.step():
            out += o.token_ids
    return out


def test_warming_the_pool_leaves_cached_prefixes_intact(smollm2_workspace):
    engine = Engine(smollm2_workspace, dtype="float32", cache_block_seq_len=16, num_blocks=96)
    per_piece = WARM_BYTES // engine.runner.block_bytes()
    assert engine.warm()  # the blocks handed out first, in every layer: not layer by layer in memory order
    assert resident(engine.runner.kv_cache[1, -1, :per_piece]) == 1.0
    ids = chat_ids(engine, "The history of the printing press, told briefly: " * 3)
    first = greedy(engine, ids)
    pieces = 1
    while engine.warm():
        pieces += 1
    assert not engine.cold and not engine.warm()
    assert pieces == math.ceil(96 / per_piece) - 1 > 0  # a piece at a time: the last one returns False
    assert resident(engine.runner.kv_cache) == 1.0
    hits = engine.block_manager.prefix_hits
    assert greedy(engine, ids) == first  # the same answer from the cached blocks
    assert engine.block_manager.prefix_hits > hits


def test_an_idle_async_engine_warms_its_pool_and_still_answers(smollm2_workspace):
    engine = Engine(smollm2_workspace, dtype="float32", cache_block_seq_len=16, num_blocks=96)
    async_engine = AsyncEngine(engine)
    ids = chat_ids(engine, "Hello")

    async def main():
        answer = [o async for o in async_engine.generate(ids, SamplingParams(temperature=0, max_tokens=4))]
        assert answer[-1].finish_reason is not None
        for _ in range(600):  # the loop warms between its waits for work: wait for it, generously
            if not await async_engine.call(lambda e: e.cold):
                break
            await asyncio.sleep(0.1)
        assert not await async_engine.call(lambda e: e.cold)

    try:
        asyncio.run(main())
        assert resident(engine.runner.kv_cache) == 1.0
    finally:
        async_engine.close()
