"""Offline throughput: the same prompts through our engine and through transformers' generate (static batches,
same dtype), in one run; plus single-stream decode speed for both."""

import random
import time
from dataclasses import dataclass

import torch

from lmcli.engine.engine import Engine
from lmcli.engine.sampling_params import SamplingParams


@dataclass
class Result:
    name: str
    output_tokens: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.output_tokens / self.seconds


def random_prompts(tokenizer, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """Token ids drawn from the ordinary (non-special) vocabulary, as vLLM's random data set does."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    return [[rng.choice(vocab) for _ in range(length)] for _ in range(n)]


def run_engine(engine: Engine, prompts, output_len: int, concurrency: int) -> Result:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    pending, running, produced = list(enumerate(prompts)), 0, 0
    start = time.perf_counter()
    while pending or engine.has_work:
        while pending and running < concurrency:
            i, ids = pending.pop(0)
            engine.add_request(f"bench-{i}", ids, params)
            running += 1
        for out in engine.step():
            produced += len(out.token_ids)
            running -= out.finish_reason is not None
    return Result("lm engine", produced, time.perf_counter() - start)


def engine_single_stream(engine: Engine, prompt, output_len: int) -> Result:
    """Decode speed of one sequence: tokens after the first, over the time after the first."""
    engine.add_request("single", prompt, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True))
    first, n = None, 0
    while engine.has_work:
        outs = engine.step()
        if outs and first is None:
            first = time.perf_counter()
            continue
        n += sum(len(o.token_ids) for o in outs)
    return Result("lm engine, one stream", n, time.perf_counter() - first)


@torch.inference_mode()
def run_hf(model, prompts, output_len: int, batch_size: int) -> Result:
    produced, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = torch.tensor(prompts[i:i + batch_size])  # equal lengths: no padding needed
        out = model.generate(batch, max_new_tokens=output_len, do_sample=False,
                             attention_mask=torch.ones_like(batch))
        produced += (out.shape[1] - batch.shape[1]) * batch.shape[0]
    return Result(f"transformers generate, batch {batch_size}", produced, time.perf_counter() - start)


@torch.inference_mode()
def hf_single_stream(model, prompt, output_len: int) -> Result:
    ids = torch.tensor([prompt])
    model.generate(ids, max_new_tokens=1, do_sample=False)  # prefill only, to subtract it
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, do_sample=False)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=output_len, do_sample=False)
    return Result("transformers, one stream", output_len - 1, time.perf_counter() - start - prefill)


def medians(runs: list[Result]) -> list[Result]:
    """One result per name (in first-seen order): the run with the median rate."""
    by_name: dict[str, list[Result]] = {}
    for r in runs:
        by_name.setdefault(r.name, []).append(r)
    return [sorted(rs, key=lambda r: r.rate)[len(rs) // 2] for rs in by_name.values()]
