from dataclasses import dataclass
from typing import Optional

from lmcli.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. temperature 0 (or top_k 1) is greedy."""

    max_tokens: Optional[int] = None  # None: as many as the session length leaves
    min_tokens: int = 0  # eos and stop tokens are masked until this many tokens are out
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # over prompt and output tokens, as in HF transformers
    presence_penalty: float = 0.0  # over output tokens, as in OpenAI
    frequency_penalty: float = 0.0
    seed: Optional[int] = None  # the same seed gives the same tokens, whatever else is batched
    stop: tuple[str, ...] = ()  # strings of any token length; the stop string is not returned
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's eos/stop tokens
    ignore_eos: bool = False
    n: int = 1
    logprobs: Optional[int] = None  # None: none; k >= 0: the chosen token's logprob and the k most likely
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # with special tokens kept: a space between them and the text
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) added to the logits, as OpenAI
    grammar: Optional[str] = None  # structured output: the output stays inside this grammar (engine/grammar.py)

    def __post_init__(self):
        checks = [
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.min_tokens >= 0, "min_tokens must be >= 0"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens must be <= max_tokens"),
            (0 <= self.temperature <= 2, "temperature must be in [0, 2]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.n >= 1, "n must be at least 1"),
            (self.seed is None or 0 <= self.seed < 2**63, "seed must be in [0, 2**63)"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (all(t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias),
             "logit_bias maps token ids to biases in [-100, 100]"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message, message.split()[0])  # each message starts with its field
        if self.grammar is not None and self.min_tokens:
            raise UserError("min_tokens cannot be combined with structured output: the grammar decides where the "
                            "answer ends", "min_tokens")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1  # a tinier temperature overflows the logits
