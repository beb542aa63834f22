"""A synchronous Python API for scripts, in the manner of LMDeploy's pipeline:

    from lmcli import pipeline
    pipe = pipeline("./workspace")
    pipe(["Hi", "Hello"])                     # chat template applied to strings
    pipe([{"role": "user", "content": "Hi"}], max_new_tokens=64, temperature=0.7)
"""

from dataclasses import dataclass, fields
from typing import Optional

from lmcli.engine.engine import Engine
from lmcli.engine.prompt import encode_chat
from lmcli.engine.sampling_params import SamplingParams

# pipeline keyword -> SamplingParams field, where the names differ (LMDeploy's GenerationConfig names)
ALIASES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "random_seed": "seed",
           "stop_words": "stop", "stop_token_ids": "stop_token_ids"}


@dataclass
class Response:
    text: str
    token_ids: list[int]
    finish_reason: str
    input_token_len: int
    generate_token_len: int
    logprobs: Optional[list] = None


def sampling_params(**kwargs) -> SamplingParams:
    names = {f.name for f in fields(SamplingParams)}
    params = {}
    for key, value in kwargs.items():
        key = ALIASES.get(key, key)
        if key not in names:
            raise TypeError(f"unknown sampling option {key!r}")
        if key == "logit_bias" and isinstance(value, dict):  # OpenAI's shape: {token id: bias}
            value = tuple((int(t), float(b)) for t, b in value.items())
        params[key] = tuple(value) if key in ("stop", "stop_token_ids", "logit_bias") else value
    return SamplingParams(**params)


class Pipeline:
    def __init__(self, workspace, **engine_options):
        self.engine = Engine(workspace, **engine_options)
        self.tokenizer = self.engine.tokenizer
        self._count = 0

    def __call__(self, prompts, **sampling):
        """One prompt (a string or a message list) gives a Response; a list of prompts, a list of them."""
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict))
        batch = [prompts] if single else list(prompts)
        params = sampling_params(**sampling)
        ids = []
        for prompt in batch:
            self._count += 1
            rid = f"pipe-{self._count}"
            self.engine.add_request(rid, encode_chat(self.tokenizer, prompt), params)
            ids.append(rid)
        collected = {rid: {"text": "", "tokens": [], "logprobs": [], "last": None} for rid in ids}
        while self.engine.has_work:
            for out in self.engine.step():
                c = collected.get(out.request_id)
                if c is None:
                    continue
                c["text"] += out.text
                c["tokens"] += out.token_ids
                c["logprobs"] += out.logprobs
                c["last"] = out
        responses = [Response(c["text"], c["tokens"], c["last"].finish_reason, c["last"].num_prompt_tokens,
                              len(c["tokens"]), c["logprobs"] or None) for c in collected.values()]
        return responses[0] if single else responses


def pipeline(workspace, **engine_options) -> Pipeline:
    return Pipeline(workspace, **engine_options)
