"""The engine against transformers on the real SmolLM2 workspace in float32: greedy tokens must match."""

import pytest
import torch

from lmcli.engine.engine import Engine
from lmcli.engine.sampling_params import SamplingParams
from lmcli.workspace import Workspace
from conftest import hf_model_from_workspace

NEW_TOKENS = 48
PARAGRAPH = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
             "movable metal type, oil-based inks and a wooden press adapted from wine making. Within decades, "
             "presses spread across Europe, books became cheaper, and ideas travelled faster than ever before. ")
QUESTIONS = [
    "Hi!",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three fruits that are red.",
    "Explain recursion to a five year old in two sentences.",
    "Translate 'good morning' into Spanish, French and German.",
    PARAGRAPH + "Summarize the text above in one sentence.",
    PARAGRAPH * 6 + "What did Gutenberg combine?",
    PARAGRAPH * 7 + "Name one consequence of the printing press.",
    "Count from one to ten in words, separated by commas.",
    PARAGRAPH * 9 + "Write a title for this text.",
]


@pytest.fixture(scope="module")
def prompts(smollm2_workspace):
    tok = Workspace.load(smollm2_workspace).tokenizer()
    out = []
    for q in QUESTIONS:
        text = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        out.append(tok.encode(text, add_special_tokens=False))
    assert sum(len(p) > 300 for p in out) >= 3
    return out


@pytest.fixture(scope="module")
def hf_greedy(smollm2_workspace, prompts):
    """transformers' greedy continuation of every prompt, with its logits at each step."""
    model = hf_model_from_workspace(Workspace.load(smollm2_workspace))
    model.generation_config.eos_token_id = None  # like ignore_eos: always NEW_TOKENS tokens
    results = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=0)
            results.append((out.sequences[0, len(ids):].tolist(), torch.stack(out.logits)[:, 0]))
    return results


def run_staggered(engine: Engine, prompts, params) -> list[list[int]]:
    """Submit three prompts at a time, a few steps apart, so that they join batches mid-flight."""
    outputs = {str(i): [] for i in range(len(prompts))}
    pending = list(enumerate(prompts))
    while pending or engine.has_work:
        for i, ids in pending[:3]:
            engine.add_request(str(i), ids, params)
        pending = pending[3:]
        for _ in range(4):
            for o in engine.step():
                outputs[o.request_id] += o.token_ids
    return [outputs[str(i)] for i in range(len(prompts))]


def assert_matches_hf(ours: list[list[int]], hf_greedy) -> None:
    near_ties = 0
    for i, (mine, (theirs, logits)) in enumerate(zip(ours, hf_greedy)):
        assert len(mine) == NEW_TOKENS
        if mine == theirs:
            continue
        j = next(k for k, (a, b) in enumerate(zip(mine, theirs)) if a != b)
        top2 = logits[j].topk(2).values
        assert (top2[0] - top2[1]).item() < 1e-3, f"prompt {i} differs at token {j} without a near-tie"
        near_ties += 1
    assert near_ties <= 1


GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def test_greedy_matches_transformers_with_mid_flight_batching(smollm2_workspace, prompts, hf_greedy):
    engine = Engine(smollm2_workspace, dtype="float32", max_prefill_token_num=256, cache_block_seq_len=16)
    ours = run_staggered(engine, prompts, GREEDY)
    assert_matches_hf(ours, hf_greedy)
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_greedy_matches_transformers_under_preemption(smollm2_workspace, prompts, hf_greedy):
    longest = max(len(p) for p in prompts) + NEW_TOKENS
    engine = Engine(smollm2_workspace, dtype="float32", cache_block_seq_len=16, num_blocks=longest // 16 + 8,
                    max_prefill_token_num=512)
    ours = run_staggered(engine, prompts, GREEDY)
    assert engine.scheduler.num_preemptions > 0
    assert_matches_hf(ours, hf_greedy)
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    engine.block_manager.check()


def run_one(engine, request_id, ids, session_id=None, max_tokens=NEW_TOKENS):
    engine.add_request(request_id, ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                       session_id=session_id)
    outs = []
    while engine.has_work:
        outs += engine.step()
    return [t for o in outs for t in o.token_ids], outs[-1]


def test_prefix_cache_hits_and_sessions_give_cold_results(smollm2_workspace, prompts, hf_greedy):
    engine = Engine(smollm2_workspace, dtype="float32", cache_block_seq_len=16)
    long_prompt, (cold, _) = prompts[8], hf_greedy[8]
    first, _ = run_one(engine, "a", long_prompt)
    again, last = run_one(engine, "b", long_prompt)
    assert last.num_cached_tokens == (len(long_prompt) - 1) // 16 * 16 > 300
    assert first == again == cold

    # A session: turn one is the prompt's first 200 tokens (one token out), turn two the rest.
    turn1, _ = run_one(engine, "s1", long_prompt[:200], session_id=7, max_tokens=1)
    tail = long_prompt[201:]
    before = engine.num_computed_tokens
    turn2, last = run_one(engine, "s2", tail, session_id=7)
    # only the new tokens (and turn one's answer token) are prefilled, then 47 decode steps
    assert engine.num_computed_tokens - before == len(tail) + 1 + NEW_TOKENS - 1
    assert last.num_cached_tokens == 200
    cold_engine = Engine(smollm2_workspace, dtype="float32", enable_prefix_caching=False)
    expected, last = run_one(cold_engine, "c", long_prompt[:200] + turn1 + tail)
    assert last.num_cached_tokens == 0
    assert turn2 == expected
    engine.end_session(7)
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
