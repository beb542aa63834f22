"""Pure PyTorch versions of every op: the CPU path and the oracle that kernels are tested against.
Numerics follow Hugging Face transformers' Llama (the fidelity tests compare against it)."""

from typing import Optional

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor = None, out_dtype=None) -> torch.Tensor:
    # x (tokens, in), weight (out, in) -> (tokens, out) in out_dtype (default: x's dtype)
    y = F.linear(x, weight, bias)
    return y if out_dtype is None else y.to(out_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x (tokens, hidden); the statistics in float32, the product in x's dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual)"""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    # x (tokens, 2 * intermediate): gate then up
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Gemma's: the product with 1 + weight in float32, then the cast (Llama's casts first)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype)


def gelu_and_mul(x: torch.Tensor) -> torch.Tensor:
    # x (tokens, 2 * intermediate): gelu (its tanh form, Gemma's) of gate, times up
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (tokens, heads, head_dim) with Hugging Face's half-split layout; cos, sin (tokens, head_dim) in x's dtype
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, block_size: int) -> None:
    # k, v (tokens, kv_heads, head_dim); caches (num_blocks, kv_heads, block_size, head_dim);
    # slot_mapping (tokens,): block_id * block_size + offset
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_cache[blocks, :, offsets] = k
    v_cache[blocks, :, offsets] = v


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    # (blocks, kv_heads, block_size, head_dim) of one sequence -> (kv_heads, length, head_dim)
    blocks = cache.index_select(0, block_table)
    return blocks.transpose(0, 1).flatten(1, 2)[:, :length]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, batch, scale: float, decode=None, chunk=None,
                    window: Optional[int] = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole context, read through block tables.

    q (tokens, heads, head_dim); k, v (tokens, kv_heads, head_dim): the new tokens, already stored in the cache,
    (num_blocks, kv_heads, block_size, head_dim). The batch puts its decode tokens (one per sequence) first,
    then each prefill chunk. window: sliding-window attention, the query at position p sees the keys at
    p - window + 1 .. p (None: all before it). decode: another implementation of decode_attention, if given
    (same arguments); chunk: another for one sequence's chunk, chunk(q (L, heads, d), k_cache, v_cache,
    block_table, context, scale, out (L, heads, d), window), which writes out and returns True, or returns False
    to decline.
    """
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    nd = batch.num_decode
    if nd:
        out[:nd] = (decode or decode_attention)(q[:nd], k_cache, v_cache, batch, scale, window)
    for start, length, context, block_table in batch.prefills:
        span = slice(start, start + length)
        if chunk is not None and chunk(q[span], k_cache, v_cache, block_table, context, scale, out[span], window):
            continue
        slides = window is not None and context > window
        qi = q[span].transpose(0, 1)  # (heads, length, head_dim)
        if context == length and not slides:  # no earlier tokens: attend to the chunk itself
            ki, vi = k[span].transpose(0, 1), v[span].transpose(0, 1)
            o = sdpa(qi, ki, vi, is_causal=True, scale=scale)
        else:
            ki, vi = gather_context(k_cache, block_table, context), gather_context(v_cache, block_table, context)
            o = sdpa(qi, ki, vi, attn_mask=chunk_mask(length, context, window, q.device), scale=scale)
        out[span] = o.transpose(0, 1)
    return out


def chunk_mask(length: int, context: int, window: Optional[int], device) -> torch.Tensor:
    """(length, context): query i sits at position context - length + i and sees keys 0..that position (window:
    its last `window` keys only)."""
    keys = torch.arange(context, device=device)
    mask = keys <= keys[context - length:, None]
    if window is not None:
        mask &= keys > keys[context - length:, None] - window
    return mask


def sdpa(q, k, v, **kwargs) -> torch.Tensor:
    """SDPA of (heads, length, head_dim) tensors, given a batch dimension: on CPUs, 3-D inputs take the unfused
    math path, 4-D ones the flash kernel (a 1024-token prompt, bfloat16: 54.6 against 12.4 ms a layer)."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], enable_gqa=True, **kwargs)[0]


def decode_attention(q, k_cache, v_cache, batch, scale, window: Optional[int] = None):
    """One query per sequence, block by block, with no copy of the context into one piece.

    q (seqs, heads, head_dim); batch.decode_block_tables (seqs, max_blocks); batch.decode_lens (seqs,). window:
    each query sees its last `window` keys only."""
    block_tables = batch.decode_block_tables
    b, nb = block_tables.shape
    kv_heads, bs, d = k_cache.shape[1:]
    keys = torch.arange(nb * bs, device=q.device)
    lens = batch.decode_lens[:, None]
    hidden = (keys >= lens) | (keys < lens - window) if window is not None else keys >= lens
    bias = torch.zeros((), device=q.device).masked_fill(hidden, float("-inf"))
    bias = bias.view(b, 1, 1, nb * bs)  # 0 for keys in the context, -inf after it
    group = q.shape[1] // kv_heads
    # tiny batched products are faster in float32 on CPUs; many sequences' worth are faster in bfloat16
    work = torch.float32 if b <= 4 and q.device.type == "cpu" else q.dtype
    keys = k_cache.index_select(0, block_tables.flatten()).view(b, nb, kv_heads, bs, d).to(work)
    values = v_cache.index_select(0, block_tables.flatten()).view(b, nb, kv_heads, bs, d).to(work)
    qg = q.view(b, 1, kv_heads, group, d).to(work)
    scores = torch.matmul(qg, keys.transpose(-1, -2))  # (seqs, blocks, kv_heads, group, block_size)
    scores = scores.permute(0, 2, 3, 1, 4).reshape(b, kv_heads, group, nb * bs).float() * scale + bias
    probs = scores.softmax(-1).to(work).view(b, kv_heads, group, nb, bs).permute(0, 3, 1, 2, 4)
    out = torch.matmul(probs, values).sum(1)  # (seqs, kv_heads, group, head_dim)
    return out.reshape(b, kv_heads * group, d).to(q.dtype)


_BITS = torch.arange(32, dtype=torch.int32)


def mask_logits(x: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: row rows[i] of x keeps the tokens whose bit is set in bitmask row i (int32 words, bit t % 32 of
    word t // 32), the others become -inf."""
    bitmask = bitmask.to(x.device)
    allowed = ((bitmask.unsqueeze(-1) >> _BITS.to(x.device)) & 1).bool().view(bitmask.shape[0], -1)[:, :x.shape[1]]
    rows = rows.to(x.device)
    x[rows] = x[rows].masked_fill(~allowed, float("-inf"))
