"""Incremental detokenization with stop strings.

Each new token's text is the difference between decoding a short window of tokens with and without it; the
window starts a few tokens back (in the prompt, at first) so that leading spaces come out right, and text that
ends in an incomplete UTF-8 character waits for the next token. Stop strings are matched on the text; up to
(longest stop string - 1) characters are held back until they cannot begin a stop string.
"""

WINDOW = 5


class Detokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True, stop: tuple = (),
                 spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        # kept special tokens set apart by spaces, as slow tokenizers and LMDeploy and vLLM do
        spaced = spaces_between_special_tokens and not skip_special_tokens
        self.special = set(getattr(tokenizer, "all_special_ids", ())) if spaced else set()
        self.ids = list(prompt_ids[-WINDOW:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # the output text so far (cut at a stop string once one is found)
        self.sent = 0  # characters of text already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        if not self.special.intersection(ids):
            return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)
        parts, run = [], []  # runs of text tokens and each special token, decoded apart, joined by spaces
        for t in ids:
            if t in self.special:
                parts += [run] if run else []
                parts.append([t])
                run = []
            else:
                run.append(t)
        parts += [run] if run else []
        return " ".join(self.tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                        for part in parts)

    def add(self, token_id: int) -> bool:
        """Add one output token; True when a stop string has appeared (the text is cut before it)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) <= len(before):
            return False
        piece = after[len(before):]
        complete = not piece.endswith("\ufffd")  # else an incomplete character waits for the next token
        if complete:
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        candidate = self.text + (piece if complete else piece.rstrip("\ufffd"))
        hit = self._first_stop(candidate)
        if hit is not None:
            self.text, self.stopped = candidate[:hit], True
        elif complete:
            self.text = candidate
        return self.stopped

    def _first_stop(self, text: str):
        """Where the first stop string begins in text, looking only past what was already checked; or None."""
        start = max(0, len(self.text) - self.hold)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def delta(self, final: bool) -> str:
        """The text not handed out yet; while not final, keep back what might begin a stop string."""
        if final and not self.stopped and self.read_offset < len(self.ids):  # an incomplete character at the end
            before = self._decode(self.ids[self.prefix_offset:self.read_offset])
            candidate = self.text + self._decode(self.ids[self.prefix_offset:])[len(before):]
            hit = self._first_stop(candidate)
            self.text, self.stopped = (candidate, False) if hit is None else (candidate[:hit], True)
            self.read_offset = len(self.ids)
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        piece, self.sent = self.text[self.sent:end], end
        return piece
