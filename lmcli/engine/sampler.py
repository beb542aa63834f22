"""Batched sampling, every row with its own settings: logit_bias, penalties, a grammar's allowed tokens, greedy or
temperature with top-k, top-p and min-p, per-sequence seeds, and logprobs.

A sampled token is argmax(probs / noise) with noise ~ Exp(1) (the exponential race, equal in distribution to
drawing from probs). Each seeded sequence draws its noise from its own generator, one vector per token, so
its tokens do not depend on what else is in the batch.

Everything runs where the logits are (on a GPU, only the chosen ids and the requested logprobs cross to the host),
except a seeded sequence's noise: drawn from its generator on the CPU and copied over (one vocabulary-sized vector
a token), so a seed gives the same tokens on a GPU as on the CPU wherever the arithmetic agrees.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from lmcli import kernels

NEG_INF = float("-inf")


@dataclass
class TokenLogprobs:
    logprob: float  # of the chosen token
    top: list[tuple[int, float]]  # the most likely tokens and their logprobs, most likely first


def _generator(seq) -> Optional[torch.Generator]:
    if seq.params.seed is None:
        return None
    if seq.generator is None:
        seq.generator = torch.Generator().manual_seed((seq.params.seed + seq.index) % 2**63)
    return seq.generator


def apply_penalties(logits: torch.Tensor, seqs: list, stop_ids: list[list[int]]) -> None:
    """In place: logit_bias, the penalties, and min_tokens (stop_ids[i]: the tokens row i may not pick yet)."""
    dev = logits.device
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.logit_bias:
            ids, bias = zip(*p.logit_bias)
            logits[i].index_add_(0, torch.tensor(ids, device=dev), torch.tensor(bias, dtype=logits.dtype, device=dev))
        if p.repetition_penalty != 1.0:
            ids = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=dev)
            picked = logits[i, ids]
            logits[i, ids] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            ids, counts = torch.tensor(seq.output_token_ids, device=dev).unique(return_counts=True)
            logits[i, ids] -= p.presence_penalty + p.frequency_penalty * counts.float()
        if stop_ids[i] and seq.num_output_tokens < p.min_tokens:
            logits[i, stop_ids[i]] = NEG_INF


def _filter(logits: torch.Tensor, seqs: list) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks; returns probabilities (rows, vocab)."""
    dev = logits.device
    temps = torch.tensor([s.params.temperature for s in seqs], device=dev).unsqueeze(1)
    logits = logits / temps
    if any(s.params.top_k or s.params.top_p < 1 or s.params.min_p for s in seqs):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        ks = torch.tensor([min(s.params.top_k or vocab, vocab) for s in seqs], device=dev).unsqueeze(1)
        drop = torch.arange(vocab, device=dev) >= ks
        probs = sorted_logits.softmax(-1)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=dev).unsqueeze(1)
        drop |= (probs.cumsum(-1) - probs) > top_p  # keep the smallest prefix reaching top_p
        min_p = torch.tensor([s.params.min_p for s in seqs], device=dev).unsqueeze(1)
        drop |= probs < min_p * probs[:, :1]
        drop[:, 0] = False  # the most likely token always stays
        sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    return logits.softmax(-1)


@torch.inference_mode()  # the runner's logits are inference tensors: changed in place only in this mode
def sample(logits: torch.Tensor, seqs: list, stop_ids: list[list[int]], allowed=None):
    """logits (rows, vocab) float32 on the runner's device, one row per sequence, changed in place (no copy: 12.6 MB
    at 64 rows of SmolLM2); allowed: None, or (rows, bitmask) where a grammar limits those rows to the tokens their
    bitmask rows allow (kernels.mask_logits). Returns (token ids, [TokenLogprobs or None]); logprobs are the model's own,
    before penalties and masks."""
    want_logprobs = [s.params.logprobs is not None for s in seqs]
    raw = logits.log_softmax(-1) if any(want_logprobs) else None  # logprobs of the model's own distribution
    plain = all(s.params.greedy and s.params.repetition_penalty == 1.0 and not s.params.presence_penalty
                and not s.params.frequency_penalty and not s.params.min_tokens and not s.params.logit_bias
                for s in seqs)
    if plain and allowed is None:
        tokens = kernels.argmax(logits)
    else:
        apply_penalties(logits, seqs, stop_ids)
        if allowed is not None:
            kernels.mask_logits(logits, *allowed)
        tokens = kernels.argmax(logits)
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if rows:
            probs = _filter(logits[rows], [seqs[i] for i in rows])
            noise = torch.empty_like(probs).exponential_()  # unseeded rows: drawn where the logits are
            for j, i in enumerate(rows):
                g = _generator(seqs[i])
                if g is not None:
                    noise[j] = torch.empty(probs.shape[1], dtype=probs.dtype).exponential_(generator=g).to(noise.device)
            tokens[rows] = (probs / noise).argmax(-1)
    out = [None] * len(seqs)
    wanted = [i for i in range(len(seqs)) if want_logprobs[i]]
    if wanted:  # what the rows asked for, in one copy to the host with the ids
        k = max(seqs[i].params.logprobs for i in wanted)
        rows = torch.tensor(wanted, device=logits.device)
        chosen = raw[rows].gather(1, tokens[rows, None])[:, 0]
        top = raw[rows].topk(k) if k else None
        chosen = chosen.tolist()
        top_ids, top_values = (top.indices.tolist(), top.values.tolist()) if k else ([], [])
        for j, i in enumerate(wanted):
            n = seqs[i].params.logprobs
            out[i] = TokenLogprobs(chosen[j], list(zip(top_ids[j][:n], top_values[j][:n])) if n else [])
    return tokens.tolist(), out
