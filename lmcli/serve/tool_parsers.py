"""Tool calls in a model's output, as the text streams: content before a call streams as content, a call comes out
as OpenAI's deltas (the first with its id, type and name, then fragments of its arguments). One parser per output
format, in one registry (PARSERS); `--tool-call-parser NAME` picks one, else default_parser() picks by the chat
template.

- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, text around them (Hermes, Qwen
  2.5 and 3, and the format this server teaches a model whose template has none).
- llama3_json: the whole answer is `{"name": ..., "parameters": {...}}` (Llama 3.1 to 3.3's JSON calls), maybe after
  `<|python_tag|>`, several separated by `;`.
"""

import json
import uuid
from dataclasses import dataclass
from typing import Optional


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""  # the JSON text as the model wrote it


@dataclass
class CallDelta:
    """OpenAI's tool_calls delta: index; id and name on a call's first delta only; arguments, a fragment."""

    index: int
    arguments: str
    id: Optional[str] = None
    name: Optional[str] = None


class ObjectScanner:
    """One JSON object, a character at a time: where it ends, the string value of `name`, and where the value of
    `args_key` begins and ends, before the object is complete (so its arguments can stream)."""

    def __init__(self, args_keys: tuple[str, ...]):
        self.args_keys = args_keys
        self.text = ""
        self.depth = 0
        self.in_string = self.escaped = False
        self.string_start = -1
        self.key: Optional[str] = None  # the key whose value is being read (depth 1)
        self.expect_key = True
        self.value_start = -1
        self.name: Optional[str] = None
        self.args_start = self.args_end = -1
        self.done = self.bad = False

    def feed(self, text: str) -> None:
        for ch in text:
            if self.done or self.bad:
                return
            i = len(self.text)
            self.text += ch
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    self._string_end(i)
                continue
            if ch.isspace():
                continue
            if self.depth == 0 and ch != "{":
                self.bad = True
                return
            if self.depth == 1 and not self.expect_key and self.value_start < 0 and ch not in ",}":
                self.value_start = i
                if self.key in self.args_keys:
                    self.args_start = i
            if ch == '"':
                self.in_string, self.string_start = True, i
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 1 and self.args_start >= 0 and self.args_end < 0 and self.key in self.args_keys:
                    self.args_end = i + 1  # an object or array value closed
                if self.depth == 0:
                    self._value_end(i)
                    self.done = True
            elif ch == "," and self.depth == 1:
                self._value_end(i)
                self.expect_key, self.key = True, None
            elif ch == ":" and self.depth == 1:
                self.expect_key = False

    def _string_end(self, i: int) -> None:
        if self.depth != 1:
            return
        if self.expect_key:
            self.key = self._decoded(i)
        elif self.key == "name" and self.value_start == self.string_start:
            self.name = self._decoded(i)
        if not self.expect_key and self.key in self.args_keys and self.args_start == self.string_start:
            self.args_end = i + 1  # arguments written as a string

    def _decoded(self, i: int) -> Optional[str]:
        """The string that ends at i; not JSON (a bad escape): the object is no call."""
        try:
            return json.loads(self.text[self.string_start:i + 1], strict=False)
        except ValueError:
            self.bad = True
            return None

    def _value_end(self, i: int) -> None:
        if self.key in self.args_keys and self.args_start >= 0 and self.args_end < 0:
            self.args_end = len(self.text[:i].rstrip())  # a number, true, false or null
        self.value_start = -1

    def arguments(self) -> str:
        """The arguments' text so far (all of it once args_end is known; "{}" for a call that had none), less
        trailing whitespace until the end is known (it may follow a number, outside the value)."""
        if self.args_start < 0:
            return "{}" if self.done else ""
        if self.args_end >= 0:
            return self.text[self.args_start:self.args_end]
        return self.text[self.args_start:].rstrip()


class ToolParser:
    """Base: feed() the output's text as it comes; it returns (content, [CallDelta]) that may be sent now."""

    args_keys = ("arguments", "parameters")

    def __init__(self, single: bool = False, names: Optional[set] = None):
        self.single = single  # parallel_tool_calls false: calls after the first are dropped
        self.names = names  # the request's tools: an object naming another function is no call
        self.calls: list[ToolCall] = []
        self.scanner: Optional[ObjectScanner] = None
        self.sent = 0  # characters of the current call's arguments sent
        self.announced = False  # the current call's first delta (id, name) sent
        self.dropped = False  # the current call is one too many (single)
        self.buffer = ""  # text held back: maybe the start of a call

    def feed(self, text: str, final: bool = False) -> tuple[str, list[CallDelta]]:
        raise NotImplementedError

    def _scan(self, text: str) -> tuple[list[CallDelta], str]:
        """Feed the call being read; returns its deltas and the text after its end (once it ends)."""
        s = self.scanner
        before = len(s.text)
        s.feed(text)
        rest = text[len(s.text) - before:] if s.done or s.bad else ""
        deltas = []
        if s.name is not None and self.names is not None and s.name not in self.names and not self.announced:
            s.bad = True  # no tool of this request: text
            return deltas, text[len(s.text) - before:]
        if self.single and self.calls and not self.announced:
            self.dropped = s.name is not None  # a second call: read, not passed on
            return deltas, rest
        if s.name is not None and not self.announced:
            self.announced = True
            self.calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", s.name))
            deltas.append(CallDelta(len(self.calls) - 1, "", self.calls[-1].id, s.name))
        if self.announced and s is self.scanner:
            args = s.arguments()
            if len(args) > self.sent:
                deltas.append(CallDelta(len(self.calls) - 1, args[self.sent:]))
                self.calls[-1].arguments = args
                self.sent = len(args)
        return deltas, rest

    def _new_call(self) -> None:
        self.scanner, self.sent, self.announced, self.dropped = ObjectScanner(self.args_keys), 0, False, False

    def _not_a_call(self) -> bool:
        """The object read is no call: not JSON, or complete without naming one of the tools."""
        return self.scanner.bad or (self.scanner.done and not self.announced and not self.dropped)


class HermesParser(ToolParser):
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self, single: bool = False, names: Optional[set] = None):
        super().__init__(single, names)
        self.state = "text"  # text, call (reading its JSON), after (expecting </tool_call>), gap (whitespace)

    def feed(self, text: str, final: bool = False) -> tuple[str, list[CallDelta]]:
        content, deltas = "", []
        self.buffer += text
        while self.buffer:
            if self.state == "text":
                at = self.buffer.find(self.START)
                if at < 0:
                    keep = 0 if final else partial_suffix(self.buffer, self.START)
                    content += self.buffer[:len(self.buffer) - keep]
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    break
                content += self.buffer[:at]
                self.buffer = self.buffer[at + len(self.START):]
                self.state = "call"
                self._new_call()
            elif self.state == "call":
                new, rest = self._scan(self.buffer)
                deltas += new
                self.buffer = rest
                if self._not_a_call():  # what was read is text
                    content += self.START + self.scanner.text
                    self.state = "text"
                elif final and not self.scanner.done and not self.announced:
                    content += self.START + self.scanner.text  # cut off before it named a function
                    self.state = "text"
                elif self.scanner.done:
                    self.state = "after"
                else:
                    break
            elif self.state == "after":  # after a call's JSON: its closing tag, if it comes
                stripped = self.buffer.lstrip()
                if stripped.startswith(self.END):
                    self.buffer, self.state = stripped[len(self.END):], "gap"
                elif self.END.startswith(stripped) and not final:
                    break
                elif self.END.startswith(stripped):  # the answer ended inside the tag
                    self.buffer, self.state = "", "gap"
                else:
                    self.buffer, self.state = stripped, "text"
            else:  # gap: the whitespace after a call, however it arrives, is not content
                self.buffer = self.buffer.lstrip()
                if not self.buffer:
                    break
                self.state = "text"
        return content, deltas


class Llama3JsonParser(ToolParser):
    TAG = "<|python_tag|>"

    def __init__(self, single: bool = False, names: Optional[set] = None):
        super().__init__(single, names)
        self.state = "start"  # start (nothing but whitespace yet), call, between (after a call), text

    def feed(self, text: str, final: bool = False) -> tuple[str, list[CallDelta]]:
        content, deltas = "", []
        self.buffer += text
        while self.buffer:
            if self.state == "text":
                content += self.buffer
                self.buffer = ""
            elif self.state in ("start", "between"):
                stripped = self.buffer.lstrip()
                if self.state == "start" and stripped.startswith(self.TAG):
                    stripped = stripped[len(self.TAG):].lstrip()
                if self.state == "between" and stripped.startswith(";"):
                    stripped = stripped[1:].lstrip()
                if not stripped or (not final and (self.TAG.startswith(stripped) or stripped == ";")):
                    break
                if stripped.startswith("{"):
                    self.buffer, self.state = stripped, "call"
                    self._new_call()
                else:
                    self.state = "text"
            else:
                new, rest = self._scan(self.buffer)
                deltas += new
                self.buffer = rest
                if self._not_a_call():
                    content += self.scanner.text
                    self.state = "text"
                elif self.scanner.done:
                    self.state = "between"
                else:
                    break
        if final and self.state == "call" and not self.announced:
            content += self.scanner.text  # a cut-off answer that never named a function
        return content, deltas


def partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of text that begins tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


PARSERS = {"hermes": HermesParser, "llama3_json": Llama3JsonParser}


def default_parser(template: Optional[str]) -> str:
    """The parser a chat template's tool format asks for: Llama 3's JSON calls where it speaks of python_tag or
    the ipython role, else hermes (also for templates with no tool format: the server teaches them hermes)."""
    if template and "<tool_call>" not in template and ("<|python_tag|>" in template or "ipython" in template):
        return "llama3_json"
    return "hermes"
