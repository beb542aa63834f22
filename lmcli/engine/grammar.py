"""Structured output: a grammar (from a JSON schema, a regex or a Lark grammar) allows, at each step, only the
tokens that keep the output inside it. llguidance does the work: it compiles the grammar, keeps one matcher per
sequence, and writes each step's allowed tokens as a bitmask (bit t of 32-bit word t // 32: token t) that the
sampler applies. It fails closed: a JSON-schema keyword it cannot enforce makes the grammar invalid, never
ignored.

A grammar travels in SamplingParams as llguidance's text (json_schema(), regex(), lark()); Grammars checks it
and keeps a compiled matcher per grammar that each sequence copies."""

import json
import threading
from collections import OrderedDict
from typing import Optional

import torch

from lmcli.errors import UserError

# JSON the way json.dumps writes it, and no other whitespace: a small model offered free whitespace can spend
# its whole answer on newlines. A schema's "x-guidance" object overrides these (llguidance's JsonCompileOptions).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHED_GRAMMARS = 256


def json_schema(schema) -> str:
    """The grammar of JSON valid against `schema` (a dict or its JSON text)."""
    from llguidance import LLMatcher

    try:
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise UserError(f"the JSON schema is not a JSON object: {e}", "response_format") from None


def json_object() -> str:
    """Any JSON object."""
    return json_schema({"type": "object"})


def regex(pattern: str) -> str:
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_regex(pattern)


def lark(grammar: str) -> str:
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_lark(grammar)


class Grammars:
    """One model's grammars: llguidance's view of its tokenizer (built on first use, about half a second), the
    compiled grammars (the latest CACHED_GRAMMARS), a matcher per sequence, and the masks of a step."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        self._hf, self.vocab_size, self._stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self._tokenizer = None
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()  # routes compile in worker threads, the engine thread copies
        self._executor = None
        self.words = (vocab_size + 31) // 32

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size,
                                                               eos_token=self._stop_ids or None)
            return self._tokenizer

    def compile(self, grammar: str, field: str = "response_format"):
        """The grammar's compiled matcher (a 400 naming `field` if llguidance cannot enforce the grammar, with its
        reason); cached, so a schema sent again costs a lookup."""
        with self._lock:
            if grammar in self._compiled:
                self._compiled.move_to_end(grammar)
                return self._compiled[grammar]
        from llguidance import LLMatcher

        tokenizer = self.tokenizer
        error = LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise UserError(f"{field}: this cannot be enforced: {error}", field)
        matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise UserError(f"{field}: this cannot be enforced: {matcher.get_error()}", field)
        with self._lock:
            self._compiled[grammar] = matcher
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return matcher

    def matcher(self, grammar: str):
        """A fresh matcher for one sequence."""
        return self.compile(grammar).deep_copy()

    def masks(self, matchers: list) -> torch.Tensor:
        """The allowed tokens of each matcher, (len(matchers), words) int32, filled in parallel."""
        import llguidance

        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        bitmask = torch.empty(len(matchers), self.words, dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                               self.words * 4, len(matchers))
        return bitmask


def check(grammar: str, field: str = "response_format") -> str:
    """The grammar, if llguidance can enforce it, else a 400 naming `field` with llguidance's reason (a keyword it
    does not implement, an unknown format, a bad regex ...)."""
    from llguidance import LLMatcher

    error = LLMatcher.validate_grammar(grammar, None)
    if error:
        raise UserError(f"{field}: this cannot be enforced: {error}", field)
    return grammar


def grammar_of(response_format: Optional[dict]) -> Optional[str]:
    """The grammar that OpenAI's or LMDeploy's response_format asks for, checked; None for plain text."""
    grammar = _grammar_of(response_format)
    return None if grammar is None else check(grammar)


def _grammar_of(response_format: Optional[dict]) -> Optional[str]:
    if response_format is None:
        return None
    response_format = {k: v for k, v in response_format.items() if v is not None}  # null: not there (LMDeploy)
    kind = response_format.get("type")
    if kind not in ("text", "json_object", "json_schema", "regex_schema"):  # (a dict or list is not hashable)
        raise UserError(f"response_format.type must be text, json_object, json_schema or regex_schema, not "
                        f"{json.dumps(kind)}", "response_format.type")
    extra = set(response_format) - {"type", kind}
    if extra:
        raise UserError(f"response_format of type {kind!r} takes no {', '.join(sorted(extra))}", "response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise UserError("response_format.json_schema must be an object: {\"name\": ..., \"schema\": {...}}",
                            "response_format.json_schema")
        spec = {k: v for k, v in spec.items() if v is not None}
        unknown = set(spec) - {"name", "description", "schema", "strict"}
        if unknown:
            raise UserError(f"response_format.json_schema has no {', '.join(sorted(unknown))}",
                            "response_format.json_schema")
        for key, kind, name in (("name", str, "a string"), ("description", str, "a string"),
                                ("strict", bool, "true or false"), ("schema", dict, "an object")):
            if key in spec and not isinstance(spec[key], kind):
                raise UserError(f"response_format.json_schema.{key} must be {name}",
                                f"response_format.json_schema.{key}")
        # no schema: any JSON (OpenAI's schema is optional); strict or not, the schema is enforced
        return json_schema(spec.get("schema") or {})
    pattern = response_format.get("regex_schema")  # regex_schema, LMDeploy's
    if not isinstance(pattern, str) or not pattern:
        raise UserError("response_format.regex_schema must be a regular expression", "response_format")
    return regex(pattern)
