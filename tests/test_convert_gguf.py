"""`lm convert` on the real SmolLM2 GGUF, checked against transformers reading the same file; and on a Gemma 3
GGUF written as llama.cpp's converter writes one (the real Gemma 3: tests/engine/test_gemma3_real.py)."""

import shutil

import pytest
import torch

from lmcli.workspace import Workspace
from conftest import run_lm, unfuse
from gguf_writer import same_weights, write_gguf

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Bonjour, ça va ? 你好 🤖"}, {"role": "assistant", "content": " Fine,  thanks.\n"},
     {"role": "user", "content": "  leading spaces and\ttabs\n\nnewlines"}],
]
TEXTS = ["Hello world", " leading space", "naïve café — «quotes» 日本語 👍🏽", "def f(x):\n    return x**2\n", ""]


@pytest.fixture(scope="module")
def hf_gguf(smollm2_gguf):
    """transformers' own reading of the GGUF: the dequantized model and its tokenizer (the oracle)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kw = dict(gguf_file=smollm2_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True), **kw)
    return model, AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kw)


def test_config_matches_transformers(smollm2_workspace, hf_gguf):
    ws, hf = Workspace.load(smollm2_workspace), hf_gguf[0].config
    c = ws.config
    assert (c.architecture, ws.model_name, ws.dtype) == ("LlamaForCausalLM", "SmolLM2-135M-Instruct", "float32")
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)
    assert c.rope_theta == hf.rope_parameters["rope_theta"] and c.rms_norm_eps == hf.rms_norm_eps
    assert c.max_position_embeddings == hf.max_position_embeddings == 8192
    assert c.tie_word_embeddings and not c.qkv_bias
    assert ws.generation.eos_token_ids == [hf.eos_token_id] and ws.generation.bos_token_id == hf.bos_token_id
    assert ws.source["kind"] == "gguf" and len(ws.source["sha256"]) == 64


def test_weights_equal_the_dequantized_gguf(smollm2_workspace, hf_gguf):
    ours = unfuse(Workspace.load(smollm2_workspace))
    theirs = {k: v for k, v in hf_gguf[0].state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert ours[name].dtype == torch.float32
        assert torch.equal(ours[name], t), name


def test_tokenizer_and_chat_template_match_transformers(smollm2_workspace, hf_gguf):
    ours, theirs = Workspace.load(smollm2_workspace).tokenizer(), hf_gguf[1]
    for messages in CONVERSATIONS:
        for gen in (True, False):
            a = ours.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert a == theirs.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert a.startswith("<|im_start|>")
            ids = ours(a, add_special_tokens=False)["input_ids"]
            assert ids == theirs(a, add_special_tokens=False)["input_ids"]
            assert ours.decode(ids) == a
    for text in TEXTS:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"]
        assert ours.decode(ours(text)["input_ids"], skip_special_tokens=True) == text


def test_workspace_stands_alone_and_dtype_option(smollm2_gguf, smollm2_workspace, tmp_path):
    copy = tmp_path / "model.gguf"
    shutil.copy(smollm2_gguf, copy)
    done = run_lm("convert", copy, "--dst-path", tmp_path / "bf16", "--dtype", "bfloat16")
    assert done.returncode == 0, done.stderr
    assert "bfloat16" in done.stdout
    copy.unlink()  # loading must not need the original model
    ws = Workspace.load(tmp_path / "bf16")
    assert ws.dtype == "bfloat16" and ws.model_name == "model" and ws.source["path"] == str(copy)
    fp32 = dict(Workspace.load(smollm2_workspace).weights())
    for name, t in ws.weights():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, fp32[name].to(torch.bfloat16)), name
    assert ws.tokenizer().apply_chat_template(CONVERSATIONS[0], tokenize=False).startswith("<|im_start|>system")


def test_gemma3_fields_from_llama_cpp_metadata(tmp_path, smollm2_gguf):
    """A gemma3 GGUF says less than the config: the layer pattern (every 6th layer full attention), the sliding
    layers' rope theta (10000) and the attention scale (head_dim; hidden / heads at 62 layers, the 27B model) are
    llama.cpp's rules; its norms are stored plus one."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=62,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                              sliding_window=48, query_pre_attn_scalar=16,
                              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                  "rope_theta": 1e6},
                                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    write_gguf(tmp_path / "g.gguf", "gemma3", model, smollm2_gguf)
    done = run_lm("convert", tmp_path / "g.gguf", "--dst-path", tmp_path / "ws")
    assert done.returncode == 0, done.stderr
    ws = Workspace.load(tmp_path / "ws")
    same_weights(unfuse(ws), model)
    c = ws.config
    assert (c.architecture, c.hidden_act, c.qk_norm, c.tie_word_embeddings) == ("Gemma3ForCausalLM",
                                                                              "gelu_pytorch_tanh", True, True)
    assert list(c.layer_types) == config.layer_types and c.layer_types[5] == c.layer_types[59] == "full_attention"
    assert (c.sliding_window, c.rope_theta, c.rope_local_theta, c.query_pre_attn_scalar) == (48, 1e6, 1e4, 16)
    assert c.rope_scaling == {"rope_type": "linear", "factor": 8.0}
