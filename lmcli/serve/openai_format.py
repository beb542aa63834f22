"""OpenAI's wire format for the answers of /v1/chat/completions and /v1/completions: SSE chunks and JSON bodies,
log probabilities with their token bytes."""

import re
from functools import lru_cache
from typing import Optional

from lmcli.serve import protocol as p
from lmcli.serve.answer import Choice, Format, Job, Piece
from lmcli.serve.common import sse, sse_error


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def token_bytes(tokenizer, token_id: int) -> bytes:
    """A token's own bytes, also for a piece of a multi-byte character (whose text alone is U+FFFD), so a client
    can join them (OpenAI's `bytes`)."""
    text = token_text(tokenizer, token_id)
    if "\ufffd" not in text:
        return text.encode()
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):  # SentencePiece byte fallback
        return bytes([int(m.group(1), 16)])
    decoder = _byte_level_decoder()
    if all(c in decoder for c in piece):  # byte-level BPE (GPT-2 style): one character per byte
        return bytes(decoder[c] for c in piece)
    return text.encode()


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    # GPT-2's table: printable Latin-1 bytes stand for themselves, the others for 256, 257, ... in byte order
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list) -> p.ChoiceLogprobs:
    content = []
    for tok, lp in zip(token_ids, logprobs):
        top = [p.TopLogprob(token=token_text(tokenizer, i), logprob=v, bytes=list(token_bytes(tokenizer, i)))
               for i, v in lp.top]
        content.append(p.TokenLogprob(token=token_text(tokenizer, tok), logprob=lp.logprob,
                                      bytes=list(token_bytes(tokenizer, tok)), top_logprobs=top))
    return p.ChoiceLogprobs(content=content)


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list, offset: int) -> p.CompletionLogprobs:
    """Legacy logprobs; text_offset counts from `offset`, the characters of the choice's tokens before these."""
    tokens, offsets, top = [], [], []
    for tok in token_ids:
        text = token_text(tokenizer, tok)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    top = [{token_text(tokenizer, i): v for i, v in lp.top} for lp in logprobs]
    return p.CompletionLogprobs(tokens=tokens, token_logprobs=[lp.logprob for lp in logprobs], top_logprobs=top,
                                text_offset=offsets)


class OpenAIFormat(Format):
    """Server-sent events ending in [DONE]; usage on a last chunk when asked (null on the others then)."""

    done = sse("[DONE]")

    def __init__(self, job: Job, tokenizer, model: str, include_usage: bool, logprobs: bool):
        super().__init__(job)
        self.tokenizer, self.model, self.include_usage, self.logprobs = tokenizer, model, include_usage, logprobs

    def chunk(self, choices: list, usage: Optional[p.Usage] = None) -> bytes:
        """One SSE chunk as OpenAI sends it: logprobs and finish_reason always there, usage null until the last."""
        body = self.response(choices, usage)
        data = body.model_dump(exclude_none=True)
        for c in data["choices"]:
            c.setdefault("logprobs", None)
            c.setdefault("finish_reason", None)
        if self.include_usage:
            data["usage"] = usage.model_dump() if usage else None
        return sse(data)

    def wanted(self, piece: Piece) -> bool:
        return bool(piece.text or piece.reasoning or piece.tool_calls or piece.finish_reason
                    or (self.logprobs and piece.token_ids))

    def tail(self) -> list[bytes]:
        return [self.chunk([], self.job.usage())] if self.include_usage else []

    def error(self, e: Exception) -> bytes:
        return sse_error(e)


class ChatFormat(OpenAIFormat):
    def response(self, choices, usage=None):
        return p.ChatCompletionChunk(id=self.job.rid, created=self.job.created, model=self.model, choices=choices,
                                     usage=usage)

    def head(self) -> list[bytes]:
        return [self.chunk([p.ChatChunkChoice(index=c.index, delta=p.Delta(role="assistant", content=""))])
                for c in self.job.choices]

    def piece(self, choice: Choice, piece: Piece) -> Optional[bytes]:
        if not self.wanted(piece):
            return None
        lp = chat_logprobs(self.tokenizer, piece.token_ids, piece.logprobs) if self.logprobs else None
        calls = [p.ToolCallDelta(index=d.index, id=d.id, type="function" if d.id else None,
                                 function=p.FunctionDelta(name=d.name, arguments=d.arguments))
                 for d in piece.tool_calls] or None
        delta = p.Delta(content=piece.text if piece.text or not (calls or piece.reasoning) else None,
                        reasoning_content=piece.reasoning or None, tool_calls=calls)
        return self.chunk([p.ChatChunkChoice(index=choice.index, delta=delta, logprobs=lp,
                                             finish_reason=piece.finish_reason)])

    def body(self) -> p.ChatCompletionResponse:
        choices = [p.ChatChoice(index=c.index, message=message(c), finish_reason=c.finish_reason,
                                logprobs=chat_logprobs(self.tokenizer, c.token_ids, c.logprobs)
                                if self.logprobs else None)
                   for c in self.job.choices]
        return p.ChatCompletionResponse(id=self.job.rid, created=self.job.created, model=self.model,
                                        choices=choices, usage=self.job.usage())


def message(c: Choice) -> p.ChatMessage:
    """A choice's message: its text, and its tool calls (text that is only whitespace beside them: null)."""
    calls = [p.ToolCall(id=t.id, function=p.FunctionCall(name=t.name, arguments=t.arguments)) for t in c.tool_calls]
    return p.ChatMessage(content=None if calls and not c.text.strip() else c.text,
                         reasoning_content=c.reasoning or None if c.reasoner else None, tool_calls=calls or None)


class CompletionFormat(OpenAIFormat):
    def __init__(self, job: Job, tokenizer, model: str, include_usage: bool, logprobs: bool,
                 echo: Optional[list[str]]):
        super().__init__(job, tokenizer, model, include_usage, logprobs)
        self.echo = echo  # each prompt's text, put before its choices' text
        self.offsets = [0] * len(job.choices)  # the characters of each choice's logprob tokens sent so far

    def response(self, choices, usage=None):
        return p.CompletionResponse(id=self.job.rid, created=self.job.created, model=self.model, choices=choices,
                                    usage=usage)

    def head(self) -> list[bytes]:
        return [self.chunk([p.CompletionChoice(index=c.index, text=self.echo[c.index // self.job.n])])
                for c in self.job.choices] if self.echo else []

    def piece(self, choice: Choice, piece: Piece) -> Optional[bytes]:
        if not self.wanted(piece):
            return None
        lp = None
        if self.logprobs:
            lp = completion_logprobs(self.tokenizer, piece.token_ids, piece.logprobs, self.offsets[choice.index])
            self.offsets[choice.index] += sum(len(t) for t in lp.tokens)
        return self.chunk([p.CompletionChoice(index=choice.index, text=piece.text, logprobs=lp,
                                              finish_reason=piece.finish_reason)])

    def body(self) -> p.CompletionResponse:
        choices = [p.CompletionChoice(index=c.index, text=(self.echo[c.index // self.job.n] if self.echo else "")
                                      + c.text, finish_reason=c.finish_reason,
                                      logprobs=completion_logprobs(self.tokenizer, c.token_ids, c.logprobs, 0)
                                      if self.logprobs else None)
                   for c in self.job.choices]
        return p.CompletionResponse(id=self.job.rid, created=self.job.created, model=self.model, choices=choices,
                                    usage=self.job.usage())
