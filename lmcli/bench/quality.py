"""What a weight format or KV cache format costs in quality: perplexity on a fixed slice of ShareGPT and greedy
agreement with float32, each measured on our engine (in process, one rank).

Perplexity: the conversations at the end of the ShareGPT file (turns joined by blank lines, cut to text_len
tokens), each run as one prompt with the logits of every position kept; exp of the mean negative log-likelihood
of each next token. Nothing here is tuned or calibrated on any data, so any slice is held out; the end of the
file is a fixed one. Greedy agreement: the first user turns of the same slice through the chat template, gen_len
greedy tokens each (end of sequence ignored), compared position by position with float32's tokens up to the
first that differs."""

import math
from dataclasses import dataclass

import torch

from lmcli.engine.batch import build_batch
from lmcli.engine.engine import Engine
from lmcli.engine.prompt import encode_chat
from lmcli.engine.sampling_params import SamplingParams

# name -> engine options; float32 first: the reference for agreement
FORMATS = {
    "float32": {"dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
    "int8": {"dtype": "bfloat16", "quantization": "int8"},
    "int4": {"dtype": "bfloat16", "quantization": "int4"},
    "kv8": {"dtype": "bfloat16", "quant_policy": 8},  # bfloat16 weights, the 8-bit KV cache
}


@dataclass
class Quality:
    name: str
    perplexity: float
    tokens: list  # greedy tokens per prompt


def held_out(conversations: list, num_texts: int, num_prompts: int) -> tuple[list[str], list[str]]:
    """(texts for perplexity, user prompts for agreement) from the last conversations that have two turns."""
    usable = [c["conversations"] for c in conversations if len(c.get("conversations", [])) >= 2]
    tail = usable[-max(num_texts, num_prompts):]
    texts = ["\n\n".join(turn["value"] for turn in conv) for conv in tail[-num_texts:]] if num_texts else []
    return texts, [conv[0]["value"] for conv in tail[-num_prompts:]] if num_prompts else []


@torch.inference_mode()
def token_logprobs(engine: Engine, ids: list[int]) -> torch.Tensor:
    """log p(ids[i + 1] | ids[:i + 1]) for every i, as one prompt through the engine's model. Call it on an engine
    with no requests: the sequence's K/V go to the first pages of the pool after page 0 (the null page of models
    with sliding windows), one block table per KV group; they are free then (and whatever a free page holds is
    overwritten before it is read)."""
    runner = engine.runner
    n, groups = -(-len(ids) // runner.block_size), len(runner.config.model.kv_groups())
    if 1 + n * groups > runner.num_blocks:
        raise ValueError(f"{len(ids)} tokens do not fit the KV cache")
    tables = [list(range(1 + g * n, 1 + (g + 1) * n)) for g in range(groups)]
    batch, _ = build_batch([(ids, 0, tables[0], True, tables[1:])], runner.block_size, runner.device)
    batch.sample_idx = torch.arange(len(ids) - 1, device=runner.device)
    logits = runner.forward(batch).float()
    target = torch.tensor(ids[1:], device=logits.device)
    return torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0].cpu()


def perplexity(engine: Engine, texts: list[str], text_len: int) -> float:
    nll, count = 0.0, 0
    for text in texts:
        ids = engine.tokenizer.encode(text)[:text_len]
        if len(ids) < 2:
            continue
        lp = token_logprobs(engine, ids)
        nll, count = nll - float(lp.sum()), count + lp.numel()
    return math.exp(nll / count) if count else float("nan")


def greedy(engine: Engine, prompts: list[str], gen_len: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)
    out = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"quality-{i}", encode_chat(engine.tokenizer, prompt), params)
        out[f"quality-{i}"] = []
    while engine.has_work:
        for o in engine.step():
            out[o.request_id] += o.token_ids
    return [out[f"quality-{i}"] for i in range(len(prompts))]


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> tuple[float, int]:
    """(the mean share of each reference sequence matched before the first difference, how many match whole)."""
    shares, whole = [], 0
    for got, ref in zip(tokens, reference):
        same = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
        shares.append(same / max(len(ref), 1))
        whole += got == ref
    return sum(shares) / max(len(shares), 1), whole


def measure(workspace, name: str, options: dict, texts: list[str], prompts: list[str], text_len: int,
            gen_len: int) -> Quality:
    engine = Engine(workspace, max_batch_size=max(len(prompts), 1), enable_prefix_caching=False, **options)
    try:
        ppl = perplexity(engine, texts, text_len)  # first, while the pool is free
        return Quality(name, ppl, greedy(engine, prompts, gen_len))
    finally:
        engine.close()
