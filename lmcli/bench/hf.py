"""Hugging Face transformers running a workspace's weights: the baseline for benchmarks and the oracle for
tests (transformers' own forward pass, not ours)."""

import torch

from lmcli.workspace import Workspace


def unfused_weights(ws: Workspace) -> dict:
    """The workspace's weights under Hugging Face names, fused tensors split back, 4-bit blocks dequantized."""
    from lmcli.kernels.int4 import Int4Blocks

    c, out = ws.config, {}
    for name, t in ws.weights():
        if isinstance(t, Int4Blocks):
            t = t.dequantize()
        if ".qkv_proj." in name:  # weight or bias
            q, k, v = t.split([c.q_size, c.kv_size, c.kv_size])
            out.update({name.replace("qkv_proj", "q_proj"): q, name.replace("qkv_proj", "k_proj"): k,
                        name.replace("qkv_proj", "v_proj"): v})
        elif name.endswith("gate_up_proj.weight"):
            gate, up = t.chunk(2)
            out.update({name.replace("gate_up_proj", "gate_proj"): gate, name.replace("gate_up_proj", "up_proj"): up})
        else:
            out[name] = t
    return out


def hf_model(ws: Workspace, dtype: str = None):
    import transformers

    c = ws.config
    per_frequency = (c.rope_scaling or {}).get("rope_type") == "freq_factors"  # transformers has no such type
    transformers_rope = {} if per_frequency else (c.rope_scaling or {})
    name = {"qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3": "Gemma3"}.get(c.family, "Llama")
    rope = {"rope_theta": c.rope_theta, "rope_type": "default", **transformers_rope}
    family = {}
    if c.family == "gemma3":  # its rope by layer type, the rope scaling on the full-attention layers only
        rope = {"full_attention": rope, "sliding_attention": {"rope_theta": c.rope_local_theta, "rope_type": "default"}}
        family = dict(query_pre_attn_scalar=c.query_pre_attn_scalar, sliding_window=c.sliding_window,
                      layer_types=list(c.layer_types), hidden_activation=c.hidden_act)
    cls = getattr(transformers, f"{name}ForCausalLM")
    config_cls = getattr(transformers, "Gemma3TextConfig" if name == "Gemma3" else f"{name}Config")
    config = config_cls(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
                        rope_parameters=rope, attention_bias=c.qkv_bias, **family)
    model = cls(config).to(getattr(torch, dtype or ws.dtype)).eval()
    missing, unexpected = model.load_state_dict(unfused_weights(ws), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if c.tie_word_embeddings:
        model.tie_weights()
    if per_frequency:  # llama.cpp's rope_freqs: its frequencies, set where transformers keeps them
        from lmcli.engine.layers.rotary import inv_frequencies

        inv = inv_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
        model.model.rotary_emb.inv_freq.copy_(inv)
        model.model.rotary_emb.original_inv_freq = inv.clone()
    model.generation_config.eos_token_id = None  # benchmarks and tests want exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model
