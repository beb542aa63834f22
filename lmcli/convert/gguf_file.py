"""A GGUF file: tensors read and dequantized with the `gguf` package (several times faster than going through
transformers), the tokenizer and chat template converted by transformers."""

import re
from pathlib import Path

from lmcli.convert.source import Source
from lmcli.errors import UserError
from lmcli.known_models import sha256_file
from lmcli.workspace import ModelConfig, unsupported_architecture

# general.architecture -> the Hugging Face architecture it holds
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                      "gemma3": "Gemma3ForCausalLM"}

# GGUF tensor names -> Hugging Face names; {i} is the layer index.
OUTER_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # Qwen3, Gemma 3
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma 3's norms around the attention and the MLP (llama.cpp's converter stores every norm weight plus one)
GEMMA3_LAYER_NAMES = {**LAYER_NAMES, "post_attention_norm.weight": "post_attention_layernorm.weight",
                      "ffn_norm.weight": "pre_feedforward_layernorm.weight",
                      "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")


def open_gguf(path: Path) -> Source:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise UserError(f"{path} is not a valid GGUF file, corrupt or truncated ({type(e).__name__}: {e})")

    def meta(key, default=None):
        field = reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise UserError(f"{path}: cannot read GGUF metadata {key}: {e}")

    arch = meta("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UserError(unsupported_architecture(f"{arch} (GGUF)") + " (in GGUF: " + ", ".join(GGUF_ARCHITECTURES) + ")")
    tensors, freq_factors = {}, None
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # Llama 3.x: Llama 3's rope scaling as one divisor per frequency
            freq_factors = [float(x) for x in gguf.dequantize(t.data, t.tensor_type).reshape(-1)]
            continue
        hf_name = _hf_name(t.name, GEMMA3_LAYER_NAMES if arch == "gemma3" else LAYER_NAMES)
        if hf_name is None:
            raise UserError(f"{path}: tensor {t.name} is not supported; convert the Hugging Face folder instead")
        tensors[hf_name] = t
    config = _model_config(meta, arch, tensors, freq_factors)

    def tensor(name: str):
        import numpy as np
        import torch

        if name not in tensors:
            raise UserError(f"{path} lacks the tensor for {name}")
        t = tensors[name]
        try:
            data = gguf.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise UserError(f"{path}: cannot dequantize {t.name} ({t.tensor_type.name}): {e}")
        data = torch.from_numpy(np.require(data, np.float32, ["C", "W"]))  # a writable copy off the memmap
        if arch == "gemma3" and name.endswith("norm.weight"):
            data -= 1  # stored as 1 + weight, which Gemma's norms scale by
        return data[_rotary_rows(name, data.shape[0])]

    def _rotary_rows(name: str, rows: int):
        """llama.cpp interleaves the rotary halves of q and k: the rows that give Hugging Face's layout back."""
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            import torch

            heads = config.num_heads if name.endswith("q_proj.weight") else config.num_kv_heads
            return torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)
        return slice(None)

    def blocks(name: str):
        from lmcli.kernels.int4 import Int4Blocks, from_gguf

        t = tensors.get(name)
        if t is None or len(t.shape) != 2:
            return None
        kept = from_gguf(t.data, t.tensor_type.name, (int(t.shape[1]), int(t.shape[0])))
        if kept is None:
            return None
        rows = _rotary_rows(name, kept.shape[0])
        return Int4Blocks(kept.q[rows], kept.d[rows], kept.mn[rows])

    def load_tokenizer():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as e:
            raise UserError(f"{path}: cannot build the tokenizer from its GGUF metadata: {e}")

    generation_config = {"bos_token_id": meta("tokenizer.ggml.bos_token_id"),
                         "eos_token_id": [i for i in (meta("tokenizer.ggml.eos_token_id"),
                                                      meta("tokenizer.ggml.eot_token_id")) if i is not None]}
    types = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    native = {"F16": "float16", "BF16": "bfloat16"}.get(types.pop(), "float32") if len(types) == 1 else "float32"
    return Source(kind="gguf", path=path, model_name=path.stem, config=config, native_dtype=native, tensor=tensor,
                  load_tokenizer=load_tokenizer, generation_config=generation_config, blocks=blocks,
                  info={"kind": "gguf", "path": str(path.resolve()), "sha256": sha256_file(path)})


def _hf_name(gguf_name: str, layer_names: dict):
    if gguf_name in OUTER_NAMES:
        return OUTER_NAMES[gguf_name]
    m = LAYER_NAME.match(gguf_name)
    if m and m.group(2) in layer_names:
        return f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}"
    return None


def _model_config(meta, arch: str, tensors: dict, freq_factors) -> ModelConfig:
    def need(key):
        value = meta(f"{arch}.{key}")
        if value is None:
            raise UserError(f"the GGUF metadata lacks {arch}.{key}")
        return value

    hidden, heads, layers = int(need("embedding_length")), int(need("attention.head_count")), int(need("block_count"))
    head_dim = int(meta(f"{arch}.attention.key_length") or meta(f"{arch}.rope.dimension_count") or hidden // heads)
    embed = tensors.get("model.embed_tokens.weight")
    vocab = meta(f"{arch}.vocab_size") or (embed.shape[-1] if embed is not None else None)
    rope_scaling = None
    if meta(f"{arch}.rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(meta(f"{arch}.rope.scaling.factor"))}
    elif meta(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise UserError(f"GGUF rope scaling {meta(f'{arch}.rope.scaling.type')!r} is not supported")
    if freq_factors is not None:
        if rope_scaling is not None:
            raise UserError("this GGUF has both rope_freqs and linear rope scaling; convert the Hugging Face folder")
        rope_scaling = {"rope_type": "freq_factors", "factors": freq_factors}
    gemma = _gemma3_fields(meta, need, layers, hidden // heads, head_dim) if arch == "gemma3" else {}
    return ModelConfig(
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(meta(f"{arch}.attention.head_count_kv") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta(f"{arch}.rope.freq_base") or 10000.0),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(need("context_length")),
        tie_word_embeddings="lm_head.weight" not in tensors,
        qkv_bias="model.layers.0.self_attn.q_proj.bias" in tensors,
        qk_norm="model.layers.0.self_attn.q_norm.weight" in tensors,
        **gemma,
    )


def _gemma3_fields(meta, need, layers: int, hidden_per_head: int, head_dim: int) -> dict:
    """Gemma 3's fields as llama.cpp's Gemma 3 has them (llama-model.cpp), its code saying what the metadata does not:
    every 6th layer has full attention, the others a sliding window with rope theta 10000; the attention scale is
    head_dim ** -0.5, but (hidden / heads) ** -0.5 for the 27B model (62 layers)."""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if meta(f"gemma3.{key}") is not None:
            raise UserError(f"gemma3.{key} is set: logit softcapping is not supported (Gemma 3 has none)")
    return dict(hidden_act="gelu_pytorch_tanh", sliding_window=int(need("attention.sliding_window")),
                layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)),
                rope_local_theta=10000.0, query_pre_attn_scalar=hidden_per_head if layers == 62 else head_dim)
