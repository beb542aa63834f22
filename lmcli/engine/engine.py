"""The engine: requests in, token and text deltas out. step() is schedule -> run -> sample -> postprocess."""

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from lmcli.engine.block_manager import BlockManager
from lmcli.engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from lmcli.engine.detokenizer import Detokenizer
from lmcli.engine.grammar import Grammars
from lmcli.engine.sampler import TokenLogprobs, sample
from lmcli.engine.sampling_params import SamplingParams
from lmcli.engine.scheduler import Scheduler
from lmcli.engine.sequence import Sequence
from lmcli.engine.session import Session
from lmcli.errors import UserError
from lmcli.workspace import Workspace

WARM_BYTES = 16 << 20  # a piece of Engine.warm: about 40 ms at the slowest first touch measured (0.4 GB/s)


class SessionBusy(UserError):
    """A turn is already running in this session."""


@dataclass
class Output:
    request_id: str
    index: int  # which of the request's n choices
    text: str  # new text since this choice's last output
    token_ids: list[int]  # new tokens
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # for the new tokens, when asked for
    finish_reason: Optional[str] = None  # "stop", "length" or "abort" on the last output
    finish_message: Optional[str] = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache or the session
    num_output_tokens: int = 0


def engine_config(workspace: Workspace, *, dtype="auto", device="cpu", tp=1, session_len=None, quantization=None,
                  cache_block_seq_len=64, cache_max_entry_count=0.8, num_blocks=None, enable_prefix_caching=True,
                  max_batch_size=128, max_prefill_token_num=2048, quant_policy=0, eager=False, nnodes=1,
                  node_rank=0, master_addr="127.0.0.1", master_port=0) -> EngineConfig:
    return EngineConfig(
        workspace=str(workspace.path), model=workspace.config, dtype=dtype, device=device, session_len=session_len,
        quantization=quantization, eager=eager,
        cache=CacheConfig(block_size=cache_block_seq_len, cache_max_entry_count=cache_max_entry_count,
                          num_blocks=num_blocks, enable_prefix_caching=enable_prefix_caching,
                          quant_policy=quant_policy),
        scheduler=SchedulerConfig(max_batch_size=max_batch_size, max_prefill_token_num=max_prefill_token_num),
        parallel=ParallelConfig(tp=tp, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
                                master_port=master_port))


class Engine:
    def __init__(self, workspace, **options):
        self.workspace = Workspace.load(workspace)
        self.config = engine_config(self.workspace, **options)
        self.tokenizer = self.workspace.tokenizer()
        if self.config.parallel.tp > 1:
            from lmcli.engine.distributed import DistributedRunner

            self.runner = DistributedRunner(self.config, self.workspace)
        else:
            from lmcli.engine.model_runner import ModelRunner

            self.runner = ModelRunner(self.config, self.workspace)
        cache = self.config.cache
        windows = [w for w, _ in self.config.model.kv_groups()]
        if any(w is not None for w in windows) and self.runner.num_blocks < 2:
            self.close()
            raise UserError("a model with sliding windows needs a KV cache of at least 2 blocks (the first is kept "
                            "unused)")
        self.block_manager = BlockManager(self.runner.num_blocks, cache.block_size, cache.enable_prefix_caching,
                                          windows)
        self.cold = True  # part of the KV pool was never touched (warm)
        self.scheduler = Scheduler(self.config.scheduler, self.block_manager)
        gen = self.workspace.generation
        self.model_stop_ids = set(gen.eos_token_ids) | set(gen.stop_token_ids)
        self.grammars = Grammars(self.tokenizer, self.workspace.config.vocab_size, self.model_stop_ids)
        self.requests: dict[str, list[Sequence]] = {}
        self.num_computed_tokens = 0  # all tokens run through the model (prefill and decode)

    @property
    def max_len(self) -> int:
        return self.config.max_session_len

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams = SamplingParams(),
                    session_id: Optional[int] = None) -> list[Output]:
        """Queue a request. With session_id, prompt_ids continue that session's history. Returns outputs that are
        final at once (a session that is full)."""
        if request_id in self.requests:
            raise UserError(f"request id {request_id!r} is already running")
        vocab = self.workspace.config.vocab_size
        if not prompt_ids:
            raise UserError("the prompt is empty")
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise UserError(f"token ids must be in [0, {vocab})", "prompt")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise UserError(f"stop_token_ids must be in [0, {vocab})", "stop_token_ids")
        if any(not 0 <= t < vocab for t, _ in params.logit_bias):
            raise UserError(f"logit_bias: token ids must be in [0, {vocab})", "logit_bias")
        session = None
        if session_id is not None:
            if params.n != 1:
                raise UserError("n must be 1 in a session")
            session = self.scheduler.sessions.get(session_id) or Session(session_id)  # kept once it runs
            if session.busy:
                raise SessionBusy(f"session {session_id} is busy with another request")
        tokens = (session.token_ids if session else []) + list(prompt_ids)
        if len(tokens) >= self.max_len and not (session and session.token_ids):  # a new prompt that cannot fit
            raise UserError(f"the prompt has {len(tokens)} tokens, but the context holds {self.max_len} "
                            "(prompt and output together)")
        bm = self.block_manager
        if bm.pages_for(min(len(tokens) + 1, self.max_len), self.config.scheduler.max_prefill_token_num) \
                > bm.num_blocks:
            raise UserError(f"the prompt has {len(tokens)} tokens, more than the KV cache holds")
        if session is not None:
            self.scheduler.sessions.setdefault(session_id, session)
        if params.max_tokens is None:
            params = replace(params, max_tokens=max(1, self.max_len - len(tokens)))
        seqs = []
        for i in range(params.n):
            seq = Sequence(tokens, params, request_id, i, max_len=self.max_len)
            if params.grammar is not None:
                seq.matcher = self.grammars.matcher(params.grammar)
            seq.detok = Detokenizer(self.tokenizer, tokens, params.skip_special_tokens, params.stop,
                                   params.spaces_between_special_tokens)
            seq.session = session
            seqs.append(seq)
        self.requests[request_id] = seqs
        if session is not None and len(tokens) >= self.max_len:
            self.scheduler.finish(seq, "length", f"the session has {len(tokens)} tokens with this prompt and is "
                                                 f"full (session_len {self.max_len}); end it and start a new one")
            return [self._output(seq, [], [])]
        if session is not None:
            session.busy = True
        for seq in seqs:
            self.scheduler.add(seq)
        return []

    def abort(self, request_id: str) -> list[Output]:
        outputs = []
        for seq in self.requests.get(request_id, []):
            if not seq.finished:
                self.scheduler.finish(seq, "abort")
                outputs.append(self._output(seq, [], []))
        return outputs

    def end_session(self, session_id: int) -> None:
        session = self.scheduler.sessions.get(session_id)
        if session is not None and session.busy:
            for request_id, seqs in list(self.requests.items()):
                if seqs[0].session is session:
                    self.abort(request_id)
        self.scheduler.end_session(session_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def stats(self) -> dict:
        """Counters and gauges for /metrics; read between steps."""
        bm, sch = self.block_manager, self.scheduler
        return {"running": len(sch.running), "waiting": len(sch.waiting), "num_blocks": bm.num_blocks,
                "free_blocks": bm.num_free, "prefix_queries": bm.prefix_queries, "prefix_hits": bm.prefix_hits,
                "computed_tokens": self.num_computed_tokens, "preemptions": sch.num_preemptions,
                "sessions": len(sch.sessions)}

    def session_tokens(self, session_id: int) -> list[int]:
        """A session's history (prompts and answers), empty for an unknown one."""
        session = self.scheduler.sessions.get(session_id)
        return list(session.token_ids) if session else []

    def check(self) -> None:
        """Raise if the engine cannot run a step (a tensor-parallel worker died)."""
        check = getattr(self.runner, "check", None)
        if check is not None:
            check()

    def close(self) -> None:
        """Stop tensor-parallel workers, if any."""
        shutdown = getattr(self.runner, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def warm(self) -> bool:
        """For idle time: fault in the next WARM_BYTES of the KV pool (ModelRunner.warm_cache), so that steps do
        not pay the first touch of its pages; False once the whole pool is in."""
        self.cold = self.cold and not self.runner.warm_cache(WARM_BYTES)
        return self.cold

    def keep_alive(self) -> None:
        """For idle time: what tensor-parallel workers need to keep waiting for the next step."""
        keep_alive = getattr(self.runner, "keep_alive", None)
        if keep_alive is not None:
            keep_alive()

    def step(self) -> list[Output]:
        scheduled = self.scheduler.schedule()
        outputs = [self._output(seq, [], []) for seq in self.scheduler.dropped]
        self.scheduler.dropped.clear()
        if scheduled:
            to_sample, logits = self.runner.run(scheduled)
            for seq, n in scheduled:
                seq.num_computed += n
                self.block_manager.commit(seq)
                self.block_manager.slide(seq)
                self.num_computed_tokens += n
            if to_sample:
                tokens, logprobs = sample(logits, to_sample, [self._stop_ids(s) for s in to_sample],
                                          self._allowed(to_sample))
                outputs += [self._append(s, t, lp) for s, t, lp in zip(to_sample, tokens, logprobs)]
        return outputs

    def _allowed(self, seqs: list[Sequence]):
        """The sampler's grammar masks: (rows, their bitmasks) for the sequences with a grammar, else None."""
        rows = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if not rows:
            return None
        return torch.tensor(rows), self.grammars.masks([seqs[i].matcher for i in rows])

    def _stop_ids(self, seq: Sequence) -> list[int]:
        ids = set(seq.params.stop_token_ids)
        if not seq.params.ignore_eos:
            ids |= self.model_stop_ids
        return sorted(ids)

    def _append(self, seq: Sequence, token: int, logprobs: Optional[TokenLogprobs]) -> Output:
        seq.token_ids.append(token)
        p, reason = seq.params, None
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.model_stop_ids):
            reason = "stop"  # a stop token's text is not part of the answer
        elif seq.detok.add(token):
            reason = "stop"
        message = None
        if seq.matcher is not None and not seq.matcher.consume_token(token) and reason is None:
            reason, message = "stop", f"the grammar refused a token: {seq.matcher.get_error()}"
        elif seq.matcher is not None and seq.matcher.is_stopped() and reason is None:
            reason = "stop"  # the grammar is complete: nothing but an end-of-sequence token could follow
        if reason is None and seq.num_tokens >= self.max_len:  # the context's end, not the request's: say so
            reason, message = "length", f"the context is full ({self.max_len} tokens)" + (
                "; end the session and start a new one" if seq.session is not None else "")
        elif reason is None and seq.num_output_tokens >= p.max_tokens:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason, message)
        return self._output(seq, [token], [logprobs] if logprobs is not None else [])

    def _output(self, seq: Sequence, tokens: list[int], logprobs: list) -> Output:
        if seq.finished and all(s.finished for s in self.requests.get(seq.request_id, [])):
            self.requests.pop(seq.request_id, None)
        return Output(seq.request_id, seq.index, seq.detok.delta(final=seq.finished), tokens, logprobs,
                      seq.finish_reason, seq.finish_message, seq.num_prompt_tokens, seq.num_cached_tokens,
                      seq.num_output_tokens)
