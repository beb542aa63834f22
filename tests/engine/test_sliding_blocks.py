"""Sliding-window layers give back the KV blocks their window has left (BlockManager.slide): a small random Gemma 3
(full-attention layers between sliding ones, in three KV groups of two layers) generates past its window in a pool
too small to hold every layer's blocks, and its greedy tokens stay transformers'; prefix reuse and sessions keep
working over the freed blocks."""

from dataclasses import replace

import pytest
import torch
from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from lmcli.engine.block_manager import NULL
from lmcli.engine.engine import Engine
from lmcli.engine.sampling_params import SamplingParams
from lmcli.workspace import Workspace
from conftest import run_lm

WINDOW, BLOCK = 32, 16
LAYERS = ["sliding_attention", "sliding_attention", "full_attention"] * 2
PROMPT, NEW = 150, 60


def make_gemma(smollm2_workspace, path, layers: list, kv_heads: int = 2):
    """(a small random Gemma 3 of these layer types, its workspace)"""
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=len(layers), num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=32, sliding_window=WINDOW, layer_types=layers,
        max_position_embeddings=512)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((torch.randn_like(p) * 0.1).bfloat16())
    model.save_pretrained(path / "hf")
    AutoTokenizer.from_pretrained(Workspace.load(smollm2_workspace).tokenizer_path).save_pretrained(path / "hf")
    done = run_lm("convert", path / "hf", "--dst-path", path / "ws")
    assert done.returncode == 0, done.stderr
    return model, path / "ws"


@pytest.fixture(scope="module")
def gemma(smollm2_workspace, tmp_path_factory):
    return make_gemma(smollm2_workspace, tmp_path_factory.mktemp("gemma-sliding"), LAYERS)


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        return model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(ids):] \
            .tolist()


def engine(ws, **options) -> Engine:
    return Engine(ws, dtype="float32", cache_block_seq_len=BLOCK, max_batch_size=4, max_prefill_token_num=32,
                  **options)


def run(e: Engine, requests: dict, params, session_id=None, watch=None) -> dict:
    outputs = {rid: [] for rid in requests}
    for rid, ids in requests.items():
        e.add_request(rid, ids, params, session_id=session_id)
    while e.has_work:
        for o in e.step():
            outputs[o.request_id] += o.token_ids
        if watch is not None:
            watch(e)
    return outputs


def test_a_long_answer_fits_a_pool_that_only_freed_blocks_make_room_for(gemma):
    """150 prompt tokens and 60 new ones are 14 blocks: 42 pages in three groups if nothing were freed. The pool
    has 30; the sliding groups hold at most (window + chunk) / block + 1 = 5 blocks each."""
    model, ws = gemma
    e = engine(ws, num_blocks=31)  # page 0 is the null page
    bm = e.block_manager
    assert bm.windows == (None, WINDOW, WINDOW) and bm.num_blocks == 30
    assert bm.pages_for(PROMPT + NEW, 32) == 14 + 2 * 5 < 3 * 14
    peak, nulls = [0], [0]

    def watch(e):
        peak[0] = max(peak[0], bm.num_blocks - bm.num_free)
        for s in e.scheduler.running:
            nulls[0] = max(nulls[0], s.tables[1].count(NULL))
            assert s.tables[0].count(NULL) == 0 and s.tables[1].count(NULL) == s.tables[2].count(NULL)
        bm.check()

    ids = prompt(PROMPT)
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    out = run(e, {"a": ids}, params, watch=watch)
    assert out["a"] == greedy(model, ids, NEW)
    assert e.scheduler.num_preemptions == 0 and not e.scheduler.dropped
    assert nulls[0] == (PROMPT + NEW - 1 - WINDOW + 1) // BLOCK  # every block the window left was given back
    assert peak[0] <= 24
    assert bm.num_free == bm.num_blocks


def test_prefix_reuse_and_sessions_over_freed_blocks(gemma):
    model, ws = gemma
    e = engine(ws, num_blocks=400)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ids, more = prompt(PROMPT, 1), prompt(40, 2)
    first = run(e, {"a": ids}, params)["a"]
    assert first == greedy(model, ids, 20)
    # the same prompt again: its blocks, freed by the window or at the end, are still cached; the sliding groups'
    # window blocks must be there too for the prefix to count
    hits = e.block_manager.prefix_hits
    again = run(e, {"b": ids}, params)["b"]
    assert again == first and e.block_manager.prefix_hits - hits == (PROMPT - 1) // BLOCK * BLOCK

    # a session: the second turn continues from the first's blocks, those out of the window already given back
    turn1 = run(e, {"s1": ids}, params, session_id=7)["s1"]
    session = e.scheduler.sessions[7]
    assert session.tables[1].count(NULL) == (PROMPT + 20 - 1 - WINDOW + 1) // BLOCK > 0
    turn2 = run(e, {"s2": more}, params, session_id=7)["s2"]
    assert turn1 == first and turn2 == greedy(model, ids + turn1 + more, 20)
    e.end_session(7)
    e.block_manager.check()
    assert e.block_manager.num_free == e.block_manager.num_blocks


def test_bench_quality_log_likelihoods_through_every_group(gemma):
    """lm bench quality runs a prompt straight through the model runner: one block table per KV group."""
    from lmcli.bench import quality

    model, ws = gemma
    ids = prompt(100, 3)
    ours = quality.token_logprobs(engine(ws, num_blocks=64), ids)
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    theirs = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_a_pool_of_only_the_null_page_is_refused_clearly(gemma):
    from lmcli.errors import UserError

    with pytest.raises(UserError, match="at least 2 blocks"):
        engine(gemma[1], num_blocks=1)


def test_a_kind_that_does_not_fill_its_last_group_leaves_a_place_unused(smollm2_workspace, tmp_path):
    """2 full-attention layers and 5 sliding ones: groups of 2, the last sliding group of 1 (a page's second layer
    place unused there); greedy tokens past the window stay transformers', and every page comes back."""
    layers = ["sliding_attention", "sliding_attention", "full_attention"] * 2 + ["sliding_attention"]
    model, ws = make_gemma(smollm2_workspace, tmp_path, layers)
    e = engine(ws, num_blocks=64)
    assert [len(members) for _, members in Workspace.load(ws).config.kv_groups()] == [2, 2, 2, 1]
    ids = prompt(100, 4)
    out = run(e, {"a": ids}, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))["a"]
    assert out == greedy(model, ids, 30)
    e.block_manager.check()
    assert e.block_manager.num_free == e.block_manager.num_blocks


def test_kv_groups_take_the_rarer_kinds_count():
    from lmcli.workspace import ModelConfig

    def groups(types):
        config = ModelConfig(architecture="Gemma3ForCausalLM", vocab_size=10, hidden_size=8, intermediate_size=8,
                             num_layers=len(types), num_heads=1, num_kv_heads=1, head_dim=8, rms_norm_eps=1e-6,
                             rope_theta=1e4, max_position_embeddings=64, tie_word_embeddings=True,
                             sliding_window=16, layer_types=tuple(types))
        return [(w, len(members)) for w, members in config.kv_groups()]

    gemma = lambda n: ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(n)]  # noqa: E731
    assert groups(gemma(18)) == [(None, 3)] + [(16, 3)] * 5  # Gemma 3 270M
    assert groups(gemma(34)) == [(None, 5)] + [(16, 5)] * 5 + [(16, 4)]  # Gemma 3 4B: 7 groups, not 34
    assert groups(["full_attention"] * 3) == [(None, 3)]


@pytest.mark.parametrize("quantization,quant_policy,level", [("int4", 0, None), ("int8", 0, None), ("int4", 8, None),
                                                             ("int4", 0, "avx2"), ("int8", 8, "portable")])
def test_decode_steps_in_one_native_call_change_nothing(smollm2_workspace, tmp_path_factory, quantization,
                                                        quant_policy, level, monkeypatch):
    """Gemma 3 on 4-bit or 8-bit weights runs every layer of a decode step in one native call
    (kernels.gemma_decode_layers: its four norms a layer, the query and key norms, GeGLU, windows, three KV
    groups): the same tokens and logprobs as op by op, for sequences past the window and short ones decoding
    together (one joining while another decodes: those steps run op by op), then one alone; one KV head (its key
    rows are a strided view op by op). With the bfloat16 and the 8-bit KV cache, at the best kernel level this CPU
    has and at lower ones forced."""
    from lmcli import kernels
    from lmcli.kernels import native

    if level is not None:
        if level not in native.available_levels():
            pytest.skip(f"the {level} kernels: this CPU lacks {', '.join(native.missing_features(level))}")
        monkeypatch.setattr(native, "level", lambda: level)

    _, ws = make_gemma(smollm2_workspace, tmp_path_factory.mktemp("gemma-one-call"), LAYERS, kv_heads=1)
    calls = []

    def counted(*args, **kwargs):
        out = decode_layers_gemma(*args, **kwargs)
        calls.append(out is not None)
        return out

    def generate() -> dict:
        calls.clear()
        e = Engine(ws, dtype="bfloat16", quantization=quantization, quant_policy=quant_policy,
                   cache_block_seq_len=BLOCK, num_blocks=96)
        try:
            params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=2)
            e.add_request("0", prompt(20), params)
            out = {"0": [(list(o.token_ids), repr(o.logprobs)) for o in e.step()]}
            e.add_request("1", prompt(20, 1), params)
            e.add_request("2", prompt(3, 2), replace(params, max_tokens=48))  # its last 8 steps: one row
            while e.has_work:
                for o in e.step():
                    out.setdefault(o.request_id, []).append((list(o.token_ids), repr(o.logprobs)))
            return out
        finally:
            e.close()

    decode_layers_gemma = native.decode_layers_gemma
    monkeypatch.setattr(native, "decode_layers_gemma", counted)
    together = generate()
    assert [len(v) for v in together.values()] == [40, 40, 48]
    assert len(calls) > 30 and all(calls)
    monkeypatch.setattr(kernels, "gemma_decode_layers", lambda *args, **kwargs: None)
    assert generate() == together  # op by op
    assert not calls
