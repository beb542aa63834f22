"""`lm convert` on Hugging Face folders written by transformers' save_pretrained from small random models."""

import json

import pytest
import torch
from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, \
    MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lmcli.workspace import Workspace
from conftest import assert_one_line_error, run_lm, unfuse

SMALL = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


def make_folder(path, model_cls, config, tokenizer_src, dtype=torch.float32, **save):
    torch.manual_seed(0)
    model = model_cls(config).to(dtype)
    model.generation_config.eos_token_id = [2, 0]
    model.generation_config.temperature, model.generation_config.top_p = 0.6, 0.9
    model.generation_config.do_sample = True
    model.save_pretrained(path, **save)
    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(path)
    return model


def convert(src, dst, *args):
    done = run_lm("convert", src, "--dst-path", dst, *args)
    assert done.returncode == 0, done.stderr
    return Workspace.load(dst)


def assert_same_weights(ws, model):
    ours, theirs = unfuse(ws), model.state_dict()
    if model.config.tie_word_embeddings:
        theirs = {k: v for k, v in theirs.items() if k != "lm_head.weight"}
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name


@pytest.fixture(scope="module")
def tokenizer_dir(smollm2_workspace):
    return Workspace.load(smollm2_workspace).tokenizer_path


def test_llama_untied(tmp_path, tokenizer_dir):
    model = make_folder(tmp_path / "llama", LlamaForCausalLM, LlamaConfig(**SMALL, tie_word_embeddings=False),
                        tokenizer_dir)
    ws = convert(tmp_path / "llama", tmp_path / "ws")
    assert_same_weights(ws, model)
    c = ws.config
    assert (c.architecture, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == ("LlamaForCausalLM", 3, 4, 2, 16)
    assert not c.tie_word_embeddings and not c.qkv_bias and c.rope_scaling is None
    assert ws.model_name == "llama" and ws.dtype == "float32" and ws.source["kind"] == "hf"
    assert ws.generation.eos_token_ids == [2, 0] and ws.generation.sampling == {"temperature": 0.6, "top_p": 0.9}
    assert set(ws.source["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_qwen2_tied_with_qkv_bias_in_bfloat16(tmp_path, tokenizer_dir):
    config = Qwen2Config(**SMALL, tie_word_embeddings=True, rope_theta=1e6)
    model = make_folder(tmp_path / "qwen", Qwen2ForCausalLM, config, tokenizer_dir, dtype=torch.bfloat16)
    ws = convert(tmp_path / "qwen", tmp_path / "ws", "--model-name", "tiny-qwen")
    assert ws.dtype == "bfloat16"  # auto: the folder's own dtype
    assert_same_weights(ws, model)
    c = ws.config
    assert c.architecture == "Qwen2ForCausalLM" and c.qkv_bias and c.tie_word_embeddings and c.rope_theta == 1e6
    assert c.sliding_window is None and ws.model_name == "tiny-qwen"
    assert "lm_head.weight" not in dict(ws.weights())


def test_mistral_with_llama3_rope_scaling_sharded(tmp_path, tokenizer_dir):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256}
    config = LlamaConfig(**SMALL, rope_parameters={"rope_theta": 500000.0, **rope})
    model = make_folder(tmp_path / "l3", LlamaForCausalLM, config, tokenizer_dir, max_shard_size="2MB")
    assert len(list((tmp_path / "l3").glob("*.safetensors"))) > 1
    ws = convert(tmp_path / "l3", tmp_path / "ws")
    assert_same_weights(ws, model)
    assert ws.config.rope_theta == 500000.0 and ws.config.rope_scaling == rope

    model = make_folder(tmp_path / "mistral", MistralForCausalLM, MistralConfig(**SMALL, sliding_window=128),
                        tokenizer_dir)
    ws = convert(tmp_path / "mistral", tmp_path / "ws2")
    assert_same_weights(ws, model)
    assert ws.config.architecture == "MistralForCausalLM" and ws.config.sliding_window == 128


def test_gemma3_layer_types_rope_and_scale(tmp_path, tokenizer_dir):
    layer_types = ("sliding_attention", "full_attention", "sliding_attention")
    config = Gemma3TextConfig(**SMALL, head_dim=32, sliding_window=64, query_pre_attn_scalar=24,
                              layer_types=list(layer_types),
                              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                  "rope_theta": 1e6},
                                               "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}})
    model = make_folder(tmp_path / "gemma", Gemma3ForCausalLM, config, tokenizer_dir, dtype=torch.bfloat16)
    ws = convert(tmp_path / "gemma", tmp_path / "ws")
    assert_same_weights(ws, model)  # four norms a layer, and the query and key norms
    c = ws.config  # read back from the manifest's JSON
    assert (c.architecture, c.family, c.hidden_act, c.qk_norm) == ("Gemma3ForCausalLM", "gemma3", "gelu_pytorch_tanh",
                                                                   True)
    assert c.layer_types == layer_types and [c.window(i) for i in range(3)] == [64, None, 64]
    assert (c.rope_theta, c.rope_scaling, c.rope_local_theta) == (1e6, {"rope_type": "linear", "factor": 4.0}, 2e4)
    assert c.query_pre_attn_scalar == 24 and c.tie_word_embeddings

    # transformers 4's config.json: a sliding-window pattern and rope thetas in place of layer types and rope_parameters
    raw = json.loads((tmp_path / "gemma" / "config.json").read_text())
    del raw["layer_types"], raw["rope_parameters"]
    raw.update(sliding_window_pattern=2, rope_theta=5e5, rope_local_base_freq=1e4)
    (tmp_path / "gemma" / "config.json").write_text(json.dumps(raw))
    c = convert(tmp_path / "gemma", tmp_path / "ws4").config
    assert c.layer_types == layer_types and (c.rope_theta, c.rope_scaling, c.rope_local_theta) == (5e5, None, 1e4)

    raw["final_logit_softcapping"] = 30.0
    (tmp_path / "gemma" / "config.json").write_text(json.dumps(raw))
    done = run_lm("convert", tmp_path / "gemma", "--dst-path", tmp_path / "capped")
    assert_one_line_error(done, "final_logit_softcapping", "not supported")


def test_pytorch_bin_checkpoint_and_float16(tmp_path, tokenizer_dir):
    folder = tmp_path / "bin"
    model = make_folder(folder, LlamaForCausalLM, LlamaConfig(**SMALL), tokenizer_dir)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    ws = convert(folder, tmp_path / "ws", "--dtype", "float16")
    assert ws.dtype == "float16"
    assert_same_weights(ws, model.to(torch.float16))


def test_chat_template_override(tmp_path, tokenizer_dir):
    make_folder(tmp_path / "m", LlamaForCausalLM, LlamaConfig(**SMALL), tokenizer_dir)
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    for value in (template, tmp_path / "t.jinja"):
        ws = convert(tmp_path / "m", tmp_path / "ws", "--chat-template", value, "--force")
        text = ws.tokenizer().apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        assert text == "[user] hi\n"


def test_hub_id_from_the_local_hub_cache(tmp_path, tokenizer_dir):
    """A hub id goes through huggingface_hub; offline, a model already in the hub cache converts."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / ("a" * 40)
    model = make_folder(snapshot, LlamaForCausalLM, LlamaConfig(**SMALL), tokenizer_dir)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("a" * 40)
    done = run_lm("convert", "tiny-org/tiny-llama", "--dst-path", tmp_path / "ws", cwd=tmp_path,
                  env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    ws = Workspace.load(tmp_path / "ws")
    assert ws.model_name == "tiny-llama" and ws.source["hub_id"] == "tiny-org/tiny-llama"
    assert_same_weights(ws, model)
    assert json.loads((tmp_path / "ws" / "lm_workspace.json").read_text())["format_version"] == 2
