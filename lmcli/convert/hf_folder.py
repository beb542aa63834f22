"""A Hugging Face model folder: config.json, *.safetensors or *.bin weights, tokenizer files."""

import hashlib
import json
from pathlib import Path

from lmcli.convert.source import Source
from lmcli.errors import UserError
from lmcli.known_models import sha256_file
from lmcli.workspace import ARCHITECTURES, DTYPES, ModelConfig, unsupported_architecture

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def open_hf_folder(path: Path) -> Source:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} is not a model: it has no config.json (expected a Hugging Face model folder)")
    try:
        raw = json.loads(config_file.read_text())
    except ValueError as e:
        raise UserError(f"{config_file} is not valid JSON: {e}")
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise UserError(unsupported_architecture(archs[0] if archs else raw.get("model_type")))
    weight_files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    weight_files = [f for f in weight_files if not f.name.startswith("training_args")]
    if not weight_files:
        raise UserError(f"{path} has no weights (*.safetensors or *.bin)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")

    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise UserError(f"{config_file}: transformers cannot read it: {e}")
    generation_config = {}
    if (path / "generation_config.json").is_file():
        generation_config = json.loads((path / "generation_config.json").read_text())
    for key in ("bos_token_id", "eos_token_id"):
        generation_config.setdefault(key, getattr(hf_config, key, None))

    def load_tokenizer():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise UserError(f"{path}: cannot load the tokenizer: {e}")

    files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
    digests = {f.name: sha256_file(f) for f in files}
    folder_digest = hashlib.sha256("".join(f"{n}\0{d}\n" for n, d in digests.items()).encode()).hexdigest()
    return Source(kind="hf", path=path, model_name=path.resolve().name, config=model_config(arch, hf_config),
                  native_dtype=_native_dtype(raw), tensor=_tensor_reader(weight_files), load_tokenizer=load_tokenizer,
                  generation_config=generation_config,
                  info={"kind": "hf", "path": str(path.resolve()), "sha256": folder_digest, "files": digests})


def model_config(arch: str, c) -> ModelConfig:
    rope = dict(getattr(c, "rope_parameters", None) or {})  # transformers 5; Gemma 3's by layer type
    local = rope.pop("sliding_attention", None)
    rope = dict(rope.get("full_attention", rope))
    if not rope:  # transformers 4: rope_theta plus an optional rope_scaling dict
        rope = dict(getattr(c, "rope_scaling", None) or {})
        rope["rope_theta"] = getattr(c, "rope_theta", 10000.0)
    theta = float(rope.pop("rope_theta", 10000.0))
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = {}
    sliding = getattr(c, "sliding_window", None)
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not getattr(c, "use_sliding_window", False):
        sliding = None
    gemma = arch == "Gemma3ForCausalLM"
    if gemma:
        _check_gemma3(c, local)
    local_theta = local["rope_theta"] if local else getattr(c, "rope_local_base_freq", None)  # transformers 5, 4
    return ModelConfig(
        architecture=arch,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        rms_norm_eps=float(c.rms_norm_eps),
        rope_theta=theta,
        rope_scaling=rope or None,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(getattr(c, "attention_bias", False)),
        qk_norm=arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"),
        hidden_act=c.hidden_activation if gemma else c.hidden_act,
        sliding_window=sliding,
        # Gemma 3's, and Qwen's with a window (the first max_window_layers layers keep full attention)
        layer_types=tuple(c.layer_types) if (gemma or sliding) and getattr(c, "layer_types", None) else None,
        rope_local_theta=None if local_theta is None else float(local_theta),
        query_pre_attn_scalar=int(c.query_pre_attn_scalar) if gemma else None,
    )


def _check_gemma3(c, local_rope) -> None:
    """Refuse what Gemma 3's engine model does not do, rather than serve a different model."""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(c, key, None) is not None:
            raise UserError(f"{key} is set ({getattr(c, key)}): logit softcapping is not supported (Gemma 3 has none)")
    if getattr(c, "use_bidirectional_attention", False):
        raise UserError("use_bidirectional_attention is set: only causal attention is supported")
    if local_rope and local_rope.get("rope_type", "default") != "default":
        raise UserError(f"rope scaling {local_rope['rope_type']!r} on the sliding-window layers is not supported")


def _native_dtype(raw: dict) -> str:
    dtype = str(raw.get("dtype") or raw.get("torch_dtype") or "float32").removeprefix("torch.")
    return dtype if dtype in DTYPES else "float32"


def _tensor_reader(files: list[Path]):
    """Hugging Face name -> tensor, reading each file lazily (safetensors by name, .bin memory-mapped)."""
    import torch
    from safetensors import safe_open

    where, opened = {}, {}
    for f in files:
        if f.suffix == ".safetensors":
            try:
                handle = safe_open(f, framework="pt")
            except Exception as e:
                raise UserError(f"{f} is not a valid safetensors file: {e}")
            opened[f] = handle
            where.update({k: f for k in handle.keys()})
        else:
            try:
                opened[f] = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise UserError(f"{f} is not a loadable PyTorch checkpoint: {e}")
            where.update({k: f for k in opened[f]})

    def tensor(name: str):
        if name not in where:
            raise UserError(f"the weights lack {name}")
        f = where[name]
        return opened[f].get_tensor(name) if f.suffix == ".safetensors" else opened[f][name]

    return tensor
