"""A GGUF as llama.cpp's convert_hf_to_gguf.py lays one out, written with gguf-py from a transformers model: its
tensors under llama.cpp's names (f32), the `llama` architecture's q and k rows interleaved, Llama 3's rope
scaling as a rope_freqs tensor, Gemma 3's norms plus one and its sliding window, and the tokenizer metadata of
another GGUF (SmolLM2's)."""

import math

import gguf
import numpy as np
import torch

LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
         "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
         "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
# Gemma 3's norms around the attention and the MLP: its pre-MLP norm takes the name of Llama's post-attention one
GEMMA3_LAYER = {**LAYER, "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}
OUTER = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
         "lm_head.weight": "output.weight"}


def llama3_rope_freqs(head_dim: int, theta: float, rope: dict) -> list:
    """llama.cpp's rope_freqs for Llama 3's rope scaling: one divisor per frequency, as its converter computes."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def write_gguf(path, arch: str, model, tokenizer_gguf) -> None:
    c = model.config
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)  # Gemma 3's: the global layers' (in GGUF)
    w = gguf.GGUFWriter(path, arch)
    for name, value in (("block_count", c.num_hidden_layers), ("context_length", c.max_position_embeddings),
                        ("embedding_length", c.hidden_size), ("feed_forward_length", c.intermediate_size),
                        ("head_count", heads), ("head_count_kv", kv_heads), ("key_length", head_dim),
                        ("layer_norm_rms_eps", c.rms_norm_eps), ("rope_freq_base", rope["rope_theta"])):
        getattr(w, f"add_{name}")(value)
    if arch == "gemma3":
        w.add_value_length(head_dim)
        w.add_sliding_window(c.sliding_window)
        if rope.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
    for key, field in gguf.GGUFReader(tokenizer_gguf).fields.items():
        if key.startswith("tokenizer."):
            kind = field.types[0]
            w.add_key_value(key, field.contents(), kind, field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    tensors = model.state_dict()
    if c.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    for name, t in tensors.items():
        if name in OUTER:
            gguf_name = OUTER[name]
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{i}.{(GEMMA3_LAYER if arch == 'gemma3' else LAYER)[rest.removesuffix('.weight')]}.weight"
        if arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):  # llama.cpp's interleaving
            n = heads if "attn_q" in gguf_name else kv_heads
            t = t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        if arch == "gemma3" and name.endswith("norm.weight"):  # Gemma's norms scale by 1 + weight
            t = t.float() + 1
        w.add_tensor(gguf_name, np.ascontiguousarray(t.float().numpy()))
    if rope.get("rope_type") == "llama3":
        factors = llama3_rope_freqs(head_dim, rope["rope_theta"], rope)
        w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def same_weights(ours: dict, model) -> None:
    theirs = {k: v for k, v in model.state_dict().items()
              if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert torch.equal(ours[name].float(), t.float()), name
