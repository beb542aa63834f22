"""The whole engine on the Triton backend (LMCLI_KERNELS=triton: every Triton kernel, here under Triton's
interpreter in float32) against transformers' greedy tokens on the real SmolLM2: prompts joining mid-flight, so
steps mix decodes with prefill chunks, and a chunked prompt reads its cached prefix through the block table."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU here: chosen before triton is imported (as conftest does)

import pytest  # noqa: E402
import torch  # noqa: E402

from lmcli import kernels  # noqa: E402
from lmcli.engine.block_manager import NULL  # noqa: E402
from lmcli.engine.engine import Engine  # noqa: E402
from lmcli.engine.sampling_params import SamplingParams  # noqa: E402
from lmcli.kernels import backend  # noqa: E402
from lmcli.workspace import Workspace  # noqa: E402
from conftest import hf_model_from_workspace  # noqa: E402

pytest.importorskip("triton", reason="Triton is installed with lm on Linux x86-64 only")

NEW_TOKENS = 4
QUESTIONS = ["Hi!", "Write a haiku about the sea, in English, about the waves at night."]


@pytest.fixture(scope="module")
def prompts(smollm2_workspace):
    tok = Workspace.load(smollm2_workspace).tokenizer()
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in QUESTIONS]
    return [tok.encode(text, add_special_tokens=False) for text in texts]


def test_triton_backend_gives_transformers_greedy_tokens(smollm2_workspace, prompts, monkeypatch):
    model = hf_model_from_workspace(Workspace.load(smollm2_workspace))
    expected = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            expected.append(out[0, len(ids):].tolist())
    monkeypatch.setenv(kernels.SETTING, "triton")
    # chunks of 24 tokens: the longer prompts prefill in pieces, each after its cached prefix, beside decodes
    engine = Engine(smollm2_workspace, dtype="float32", cache_block_seq_len=16, max_prefill_token_num=24,
                    max_batch_size=4, num_blocks=64)
    assert isinstance(engine.runner.backend, backend.TritonBackend)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = {str(i): [] for i in range(len(prompts))}
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
        for o in engine.step():  # the next prompt joins while this one is still running
            outputs[o.request_id] += o.token_ids
    while engine.has_work:
        for o in engine.step():
            outputs[o.request_id] += o.token_ids
    assert [outputs[str(i)] for i in range(len(prompts))] == expected
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_a_sliding_window_on_the_triton_backend(smollm2_workspace, tmp_path, monkeypatch):
    """A small random Mistral whose 16-token window the prompts outgrow, in chunks and as they decode: its Triton
    kernels see each query's last 16 keys, as transformers does."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from conftest import run_lm

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=49152, hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=16)).eval()
    model.save_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(Workspace.load(smollm2_workspace).tokenizer_path).save_pretrained(tmp_path / "hf")
    assert run_lm("convert", tmp_path / "hf", "--dst-path", tmp_path / "ws").returncode == 0
    prompts = [torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 40)]
    with torch.inference_mode():
        expected = [model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(ids):]
                    .tolist() for ids in prompts]
    monkeypatch.setenv(kernels.SETTING, "triton")
    engine = Engine(tmp_path / "ws", dtype="float32", cache_block_seq_len=16, max_prefill_token_num=24,
                    max_batch_size=4, num_blocks=64)
    assert isinstance(engine.runner.backend, backend.TritonBackend)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outputs, freed = {"0": [], "1": []}, 0
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    while engine.has_work:
        for o in engine.step():
            outputs[o.request_id] += o.token_ids
        freed = max([freed] + [s.block_table.count(NULL) for s in engine.scheduler.running])
    assert [outputs["0"], outputs["1"]] == expected
    # the blocks the window left point at the null page, given back: at most 46 tokens computed while it runs
    assert freed == (46 - 16 + 1) // 16 == 1
