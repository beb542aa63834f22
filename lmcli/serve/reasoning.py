"""Reasoning in a model's output, as the text streams: what the model thinks inside <think>...</think> goes to
reasoning_content, the rest to content. `--reasoning-parser NAME` picks one from REASONING_PARSERS:

- think: a <think> block at the start of the answer (Qwen 3 and QwQ style); an answer that does not open with it
  is all content (Qwen 3 with enable_thinking false).
- deepseek_r1: the answer starts in reasoning, its <think> optional (DeepSeek R1's template opens it in the
  prompt), until </think>; an answer that never closes it is all reasoning.
"""

from functools import partial

from lmcli.serve.tool_parsers import partial_suffix


class ThinkParser:
    START, END = "<think>", "</think>"

    def __init__(self, starts_in_reasoning: bool = False):
        self.starts_in_reasoning = starts_in_reasoning
        self.state = "start"  # start, opening, reasoning, gap (whitespace after </think>), content
        self.buffer = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, content) that may be sent now."""
        self.buffer += text
        reasoning = content = ""
        while True:
            if self.state == "start":
                stripped = self.buffer.lstrip()
                if stripped.startswith(self.START):
                    self.buffer, self.state = stripped[len(self.START):], "opening"
                elif not final and self.START.startswith(stripped):
                    break  # maybe the opening tag, not all here yet
                else:
                    self.state = "opening" if self.starts_in_reasoning else "content"
            elif self.state == "opening":  # whitespace before the reasoning
                self.buffer = self.buffer.lstrip()
                if not self.buffer and not final:
                    break
                self.state = "reasoning"
            elif self.state == "reasoning":
                at = self.buffer.find(self.END)
                if at >= 0:
                    reasoning += self.buffer[:at].rstrip()
                    self.buffer, self.state = self.buffer[at + len(self.END):], "gap"
                    continue
                # held back: what may begin </think>, and trailing whitespace (dropped if </think> follows)
                keep = 0 if final else partial_suffix(self.buffer, self.END)
                body = self.buffer[:len(self.buffer) - keep]
                sent = body.rstrip()
                reasoning += sent
                self.buffer = "" if final else self.buffer[len(sent):]
                break
            elif self.state == "gap":
                self.buffer = self.buffer.lstrip()
                if not self.buffer and not final:
                    break
                self.state = "content"
            else:
                content, self.buffer = content + self.buffer, ""
                break
        return reasoning, content


REASONING_PARSERS = {"think": ThinkParser, "deepseek_r1": partial(ThinkParser, starts_in_reasoning=True)}
