"""What a converter reads a model from, whatever its form: the model config in engine terms, tensors by their
Hugging Face names, the tokenizer and the generation defaults."""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from lmcli.errors import UserError
from lmcli.workspace import Generation, ModelConfig

# Special tokens that end a chat turn in common templates; when the vocabulary has one, it stops generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Source:
    kind: str  # "hf" or "gguf"
    path: Path  # the folder or the file
    model_name: str
    config: ModelConfig
    native_dtype: str  # what --dtype auto means for this source
    tensor: Callable[[str], "torch.Tensor"]  # Hugging Face name -> float tensor (raises UserError if absent)
    load_tokenizer: Callable[[], object]
    generation_config: dict  # bos/eos ids and sampling defaults, as generation_config.json spells them
    info: dict  # {"kind", "path", "sha256", ...} for the manifest
    blocks: Callable[[str], Optional["Int4Blocks"]] = lambda name: None  # a tensor's own 4-bit blocks (GGUF Q4_0/1)


def open_source(src: str) -> Source:
    from lmcli.known_models import KNOWN_MODELS, fetch

    path = Path(src).expanduser()
    if not path.exists() and src in KNOWN_MODELS:
        source = open_path(fetch(src))
        source.model_name = KNOWN_MODELS[src].model_name
        return source
    if not path.exists() and HUB_ID.match(src) and not src.startswith((".", "/", "~")):
        from lmcli.convert.hub import download

        source = open_path(download(src))
        source.model_name = src.split("/")[-1]
        source.info["hub_id"] = src
        return source
    if not path.exists():
        raise UserError(f"{src} does not exist (expected a model folder, a .gguf file, a hub id like org/name, "
                        f"or one of: {', '.join(KNOWN_MODELS)})")
    return open_path(path)


def open_path(path: Path) -> Source:
    if path.is_dir():
        from lmcli.convert.hf_folder import open_hf_folder

        return open_hf_folder(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF" or path.suffix.lower() == ".gguf":
        from lmcli.convert.gguf_file import open_gguf

        return open_gguf(path)
    raise UserError(f"{path} is not a model: expected a Hugging Face model folder or a .gguf file")


def generation_defaults(generation_config: dict, tokenizer) -> Generation:
    def ids(value) -> list[int]:
        if value is None:
            return []
        return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]

    eos = ids(generation_config.get("eos_token_id"))
    if not eos and tokenizer.eos_token_id is not None:
        eos = [tokenizer.eos_token_id]
    vocab = tokenizer.get_vocab()
    stop = set(eos) | {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and t in tokenizer.all_special_tokens}
    bos = generation_config.get("bos_token_id", tokenizer.bos_token_id)
    sampling = {k: generation_config[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")
                if generation_config.get(k) is not None and generation_config.get("do_sample", True)}
    return Generation(bos_token_id=None if bos is None else int(bos), eos_token_ids=eos,
                      stop_token_ids=sorted(stop), sampling=sampling)
