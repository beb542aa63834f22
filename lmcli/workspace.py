"""The workspace format: written by `lm convert`, read by the engine. Both sides live here, and only here.

A workspace is a folder:

    lm_workspace.json       the manifest: format version, model config in engine terms, dtype, weight files,
                            generation defaults, where it came from (path and sha256)
    model-00001.safetensors weights in the engine's layout (fused qkv and gate/up), shards of at most 2 GiB;
                            with quantization int4 each linear layer's weight as NAME.q4 (codes two a byte),
                            NAME.q4_scale and NAME.q4_min (float16 a block of 32; kernels/int4.py)
    tokenizer/              tokenizer files as transformers saves them, with the chat template

docs/workspace.md describes it for users. Change FORMAT_VERSION when the layout changes incompatibly.
"""

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator, Optional

from lmcli.errors import UserError

FORMAT = "lmcli-workspace"
FORMAT_VERSION = 2  # 2: the optional 4-bit weights (quantization int4); 1 is read as well
READ_VERSIONS = (1, 2)
MANIFEST = "lm_workspace.json"
TOKENIZER_DIR = "tokenizer"
SHARD_BYTES = 2 << 30
SAMPLE = 64 << 10  # bytes read at each of the places Workspace.fingerprint samples

# Architectures we convert (and the engine runs), by the name in config.json's "architectures",
# mapped to the engine's model family.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}
LAYER_TYPES = ("sliding_attention", "full_attention")  # ModelConfig.layer_types, as Hugging Face names them
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("int4",)
LINEAR_WEIGHTS = ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
                  "mlp.down_proj.weight")  # what quantization int4 stores in 4-bit blocks where the shape allows


@dataclass(frozen=True)
class ModelConfig:
    """The model's shape in engine terms."""

    architecture: str  # a key of ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False  # an RMSNorm over each head's query and key before rotary (Qwen3, Gemma 3)
    hidden_act: str = "silu"  # or "gelu_pytorch_tanh" (Gemma 3)
    # HF's rope parameters beyond theta ({"rope_type": "llama3", ...}), a GGUF's per-frequency divisors
    # ({"rope_type": "freq_factors", "factors": [...]}), or None
    rope_scaling: Optional[dict] = None
    sliding_window: Optional[int] = None  # tokens; None = full attention
    # each layer's attention, a LAYER_TYPES name (Gemma 3); None: every layer alike (the window, if any, in all)
    layer_types: Optional[tuple] = None
    rope_local_theta: Optional[float] = None  # the sliding-window layers' rope theta (Gemma 3); None: rope_theta
    query_pre_attn_scalar: Optional[int] = None  # the attention scale is its -0.5th power (Gemma 3); None: head_dim

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise UserError(unsupported_architecture(self.architecture))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise UserError(f"model config: {name} must be a positive integer, not {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"model config: {self.num_heads} attention heads do not split into "
                            f"{self.num_kv_heads} key/value heads")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))  # a list when read from JSON
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise UserError(f"model config: layer_types must name {self.num_layers} layers, each one of "
                                f"{', '.join(LAYER_TYPES)}, not {list(self.layer_types)!r}")

    def window(self, layer: int) -> Optional[int]:
        """Layer `layer`'s sliding window in tokens, or None for full attention."""
        if self.layer_types is not None and self.layer_types[layer] == "full_attention":
            return None
        return self.sliding_window

    def kv_groups(self) -> list[tuple[Optional[int], tuple[int, ...]]]:
        """The layers that share one KV block table, as [(their window or None, their layers)]: full-attention
        groups first. A page of the KV pool is a block of tokens for as many layers as the rarer kind of attention
        has (Gemma 3 270M: 3 full-attention layers, 15 sliding: six groups of three), so that any group can use any
        page, and a sliding group's table frees the pages its window has left (vLLM's hybrid allocator does the
        same). A kind whose count that size does not divide ends with a smaller group, whose pages leave a layer's
        place unused (Gemma 3 4B: 5 and 29 layers, seven groups rather than 34 of one layer: each group costs
        Python every step)."""
        kinds: dict = {}
        for i in range(self.num_layers):
            kinds.setdefault(self.window(i), []).append(i)
        size = min(map(len, kinds.values()))
        order = sorted(kinds, key=lambda w: -1 if w is None else w)
        return [(w, tuple(kinds[w][j:j + size])) for w in order for j in range(0, len(kinds[w]), size)]

    @property
    def family(self) -> str:
        return ARCHITECTURES[self.architecture]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class Generation:
    """Defaults for generation: which tokens end it, and the model's suggested sampling settings."""

    bos_token_id: Optional[int]
    eos_token_ids: list[int]  # end the sequence unless ignore_eos
    stop_token_ids: list[int]  # eos plus the chat template's end-of-turn tokens
    sampling: dict = field(default_factory=dict)  # e.g. {"temperature": 0.6, "top_p": 0.9} from generation_config


def unsupported_architecture(name) -> str:
    return f"unsupported architecture {name!r}; supported: {', '.join(ARCHITECTURES)}"


# The engine's parameter names. `hf` names the tensors a converter reads (Hugging Face names);
# a layer's tensors are fused as the engine wants them.
def layer_tensors(config: ModelConfig, i: int, hf: Callable[[str], "torch.Tensor"]) -> dict:
    """hf may give a linear layer's weight as int4.Int4Blocks (lm convert --quantization int4)."""
    import torch

    from lmcli.kernels.int4 import Int4Blocks

    def cat(parts):
        return Int4Blocks.cat(parts) if all(isinstance(t, Int4Blocks) for t in parts) else \
            torch.cat([t.dequantize() if isinstance(t, Int4Blocks) else t for t in parts])

    p = f"model.layers.{i}."
    out = {
        p + "input_layernorm.weight": hf(p + "input_layernorm.weight"),
        # (q_size + 2 * kv_size, hidden): q, then k, then v
        p + "self_attn.qkv_proj.weight": cat([hf(p + f"self_attn.{x}_proj.weight") for x in "qkv"]),
        p + "self_attn.o_proj.weight": hf(p + "self_attn.o_proj.weight"),
        p + "post_attention_layernorm.weight": hf(p + "post_attention_layernorm.weight"),
        # (2 * intermediate, hidden): gate, then up
        p + "mlp.gate_up_proj.weight": cat([hf(p + "mlp.gate_proj.weight"), hf(p + "mlp.up_proj.weight")]),
        p + "mlp.down_proj.weight": hf(p + "mlp.down_proj.weight"),
    }
    if config.family == "gemma3":  # a norm before the MLP (its input_layernorm's counterpart) and after it
        for x in ("pre", "post"):
            out[p + f"{x}_feedforward_layernorm.weight"] = hf(p + f"{x}_feedforward_layernorm.weight")
    if config.qk_norm:
        for x in "qk":
            out[p + f"self_attn.{x}_norm.weight"] = hf(p + f"self_attn.{x}_norm.weight")
    if config.qkv_bias:
        out[p + "self_attn.qkv_proj.bias"] = torch.cat([hf(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
    return out


def outer_tensors(config: ModelConfig, hf: Callable[[str], "torch.Tensor"]) -> dict:
    out = {"model.embed_tokens.weight": hf("model.embed_tokens.weight"), "model.norm.weight": hf("model.norm.weight")}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = hf("lm_head.weight")
    return out


@dataclass(frozen=True)
class Workspace:
    path: Path
    model_name: str
    config: ModelConfig
    dtype: str
    weight_files: list[str]
    generation: Generation
    source: dict  # {"kind", "path", "sha256", ...}: where it came from
    created_by: str = ""
    quantization: Optional[str] = None  # "int4": the linear layers' weights in 4-bit blocks

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_DIR

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_path)

    def weights(self, device: str = "cpu") -> Iterator[tuple[str, "torch.Tensor"]]:
        """(name, tensor) in the workspace's dtype, in the engine's layout; a weight in 4-bit blocks as one
        int4.Int4Blocks."""
        from safetensors import safe_open

        from lmcli.kernels.int4 import SUFFIXES, Int4Blocks

        for name in self.weight_files:
            with safe_open(self.path / name, framework="pt", device=device) as f:
                for key in f.keys():
                    if key.endswith(SUFFIXES[1:]):
                        continue
                    if key.endswith(SUFFIXES[0]):
                        base = key[:-len(SUFFIXES[0])]
                        yield base, Int4Blocks.unpack({x: f.get_tensor(base + x) for x in SUFFIXES})
                    else:
                        yield key, f.get_tensor(key)

    def fingerprint(self) -> str:
        """A digest that tells workspaces apart without reading all their weights: the model config, dtype,
        quantization and weight files' names and sizes, and 64 KiB at 16 places in each file (its first and last
        bytes among them): two nodes of one server must hold the same."""
        h = hashlib.sha256(json.dumps([asdict(self.config), self.dtype, self.quantization, self.weight_files],
                                      sort_keys=True).encode())
        for name in self.weight_files:
            size = (self.path / name).stat().st_size
            h.update(str(size).encode())
            with open(self.path / name, "rb") as f:
                for i in range(16):
                    f.seek(max(0, size - SAMPLE) * i // 15)
                    h.update(f.read(SAMPLE))
        return h.hexdigest()

    def weights_bytes(self) -> int:
        return sum((self.path / name).stat().st_size for name in self.weight_files)

    @classmethod
    def load(cls, path) -> "Workspace":
        path = Path(path)
        manifest = path / MANIFEST
        if not manifest.is_file():
            what = "does not exist" if not path.exists() else f"is not a workspace (no {MANIFEST})"
            raise UserError(f"{path} {what}; make one with `lm convert`")
        try:
            m = json.loads(manifest.read_text())
        except (ValueError, OSError) as e:
            raise UserError(f"{manifest} is unreadable: {e}")
        if m.get("format") != FORMAT:
            raise UserError(f"{manifest} is not an lm workspace manifest")
        if m.get("format_version") not in READ_VERSIONS:
            raise UserError(f"{path} has workspace format {m.get('format_version')}, this lm reads "
                            f"{' and '.join(map(str, READ_VERSIONS))}; convert the model again")
        try:
            ws = cls(path=path, model_name=m["model_name"], config=_from_dict(ModelConfig, m["model"]),
                     dtype=m["dtype"], weight_files=m["weight_files"], generation=_from_dict(Generation, m["generation"]),
                     source=m["source"], created_by=m.get("created_by", ""), quantization=m.get("quantization"))
        except (KeyError, TypeError) as e:
            raise UserError(f"{manifest} is incomplete: {e}")
        if ws.quantization not in (None, *QUANTIZATIONS):
            raise UserError(f"{manifest}: quantization {ws.quantization!r} is not one this lm reads; convert again")
        missing = [n for n in ws.weight_files + [TOKENIZER_DIR] if not (path / n).exists()]
        if missing:
            raise UserError(f"workspace {path} is missing {', '.join(missing)}; convert the model again")
        return ws


def _from_dict(cls, d: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def write(dst: Path, *, model_name: str, config: ModelConfig, dtype: str, generation: Generation, source: dict,
          tensors: Iterator[dict], save_tokenizer: Callable[[Path], None], created_by: str,
          quantization: Optional[str] = None) -> Workspace:
    """Write a workspace into the empty folder dst. `tensors` yields dicts of engine-named tensors, already in
    `dtype`, or int4.Int4Blocks; they are packed into shards of at most SHARD_BYTES."""
    from safetensors.torch import save_file

    from lmcli.kernels.int4 import Int4Blocks

    def stored(group: dict) -> Iterator[tuple[str, "torch.Tensor"]]:
        for name, t in group.items():
            if isinstance(t, Int4Blocks):
                yield from ((name + suffix, part) for suffix, part in t.pack().items())
            else:
                yield name, t

    weight_files, shard, size = [], {}, 0

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(weight_files) + 1:05d}.safetensors"
            save_file(shard, dst / name, metadata={"format": "pt"})
            weight_files.append(name)
            shard, size = {}, 0

    for group in tensors:
        for name, t in stored(group):
            nbytes = t.numel() * t.element_size()
            if shard and size + nbytes > SHARD_BYTES:
                flush()
            shard[name] = t.contiguous()
            size += nbytes
    flush()
    save_tokenizer(dst / TOKENIZER_DIR)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "model": asdict(config),
        "dtype": dtype,
        "quantization": quantization,
        "weight_files": weight_files,
        "generation": asdict(generation),
        "source": source,
        "created_by": created_by,
    }
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Workspace.load(dst)
