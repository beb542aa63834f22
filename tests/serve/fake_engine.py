"""A stand-in for Engine with the same interface, for fast tests of the HTTP layer: a character tokenizer (one
token per character, id = code point) and a "model" that answers with ANSWER, one character per step."""

import time
from types import SimpleNamespace

from jinja2 import TemplateError

from lmcli.engine.engine import Output, SessionBusy
from lmcli.engine.sampler import TokenLogprobs
from lmcli.errors import UserError
from lmcli.workspace import Generation

ANSWER = "Hello from the fake engine."
EOS = 3  # a control character no prompt holds


class FakeTokenizer:
    chat_template = "fake"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def __call__(self, text: str):
        return SimpleNamespace(input_ids=self.encode(text))

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == EOS))

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False, **variables):
        if any(m["content"] == "RAISE" for m in messages):  # as templates that insist on alternating roles
            raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")
        text = "".join(f"<{m['role']}>{m['content']}" + "".join(  # calls as a template that renders tools gets them
            f"<call {c['function']['name']} {c['function']['arguments']!r}>" for c in m.get("tool_calls") or [])
            + f"</{m['role']}>" for m in messages)
        text += "".join(f"<{k}={v}>" for k, v in sorted(variables.items()))  # a template's extra variables
        return text + ("<assistant>" if add_generation_prompt else "")


class FakeRequest:
    def __init__(self, request_id, prompt_ids, params, session, index):
        self.request_id, self.prompt, self.params, self.session, self.index = request_id, prompt_ids, params, session, index
        self.out: list[int] = []
        self.done = False


class FakeEngine:
    def __init__(self, max_len: int = 256, step_delay: float = 0.0, fail_after: int = -1, answer: str = ANSWER):
        self.tokenizer = FakeTokenizer()
        self.answer = answer  # what every request gets, a character a step
        self.max_len = max_len
        self.step_delay = step_delay  # seconds per step, to keep requests running
        self.fail_after = fail_after  # raise in this step (a dead engine)
        self.workspace = SimpleNamespace(model_name="fake-model", generation=Generation(1, [EOS], [EOS]))
        self.requests: dict[str, list[FakeRequest]] = {}
        self.sessions: dict[int, list[int]] = {}
        self.busy: set[int] = set()
        self.steps = 0
        self.aborted: list[str] = []
        self.added: list[tuple] = []  # (request_id, prompt_ids, params, session_id)
        self.cold = False  # no KV pool to warm
        self.peak = 0  # the most requests running at once

    @property
    def has_work(self) -> bool:
        return bool(self.requests)

    def add_request(self, request_id, prompt_ids, params, session_id=None):
        if not prompt_ids:
            raise UserError("the prompt is empty")
        if session_id is not None and session_id in self.busy:
            raise SessionBusy(f"session {session_id} is busy with another request")
        self.added.append((request_id, list(prompt_ids), params, session_id))
        history = self.sessions.get(session_id, []) if session_id is not None else []
        if history and len(history) + len(prompt_ids) >= self.max_len:  # a full session, as the engine says it
            return [Output(request_id, 0, "", [], [], "length", "the session is full; end it and start a new one",
                           len(history) + len(prompt_ids), 0, 0)]
        if session_id is not None:
            self.busy.add(session_id)
        self.requests[request_id] = [FakeRequest(request_id, history + list(prompt_ids), params, session_id, i)
                                     for i in range(params.n)]
        self.peak = max(self.peak, len(self.requests))
        return []

    def step(self):
        self.steps += 1
        if self.steps == self.fail_after:
            raise RuntimeError("the fake engine broke")
        time.sleep(self.step_delay)
        outputs = []
        for rid, reqs in list(self.requests.items()):
            for r in reqs:
                if r.done:
                    continue
                p = r.params
                pos = len(r.out)
                tok = ord(self.answer[pos]) if pos < len(self.answer) else ord("x") if p.ignore_eos else EOS
                r.out.append(tok)
                text = "" if tok == EOS else chr(tok)
                reason = None
                if tok == EOS:
                    reason = "stop"
                limit = p.max_tokens if p.max_tokens is not None else self.max_len - len(r.prompt)
                if reason is None and (len(r.out) >= limit or len(r.prompt) + len(r.out) >= self.max_len):
                    reason = "length"
                lp = [TokenLogprobs(-0.25, [(tok, -0.25), (ord("?"), -2.0)][:max(1, p.logprobs)])] \
                    if p.logprobs is not None else []
                outputs.append(self._finish(r, reason, [tok], text, lp))
        return outputs

    def _finish(self, r, reason, tokens, text, logprobs):
        if reason is not None:
            r.done = True
            if r.session is not None:
                self.sessions[r.session] = r.prompt + r.out
                self.busy.discard(r.session)
        if all(x.done for x in self.requests.get(r.request_id, [])):
            self.requests.pop(r.request_id, None)
        return Output(r.request_id, r.index, text, tokens, logprobs, reason, None, len(r.prompt), 0, len(r.out))

    def abort(self, request_id):
        self.aborted.append(request_id)
        outs = []
        for r in self.requests.get(request_id, []):
            if not r.done:
                outs.append(self._finish(r, "abort", [], "", []))
        return outs

    def end_session(self, session_id):
        self.sessions.pop(session_id, None)

    def session_tokens(self, session_id):
        return list(self.sessions.get(session_id, []))

    def stats(self):
        running = sum(len(v) for v in self.requests.values())
        return {"running": running, "waiting": 0, "num_blocks": 100, "free_blocks": 100 - running,
                "prefix_queries": 10, "prefix_hits": 5, "computed_tokens": self.steps, "preemptions": 0,
                "sessions": len(self.sessions)}

    def check(self):
        pass

    def keep_alive(self):
        pass

    def close(self):
        pass
