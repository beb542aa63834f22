"""Pure PyTorch versions of every op: the CPU path and the oracle that kernels are tested against.
Numerics follow Hugging Face transformers' Llama (the fidelity tests compare against it)."""

import torch
import torch.nn.functional as F


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
    return F.silu(gate) * up


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (tokens, heads, head_dim) with Hugging Face's half-split layout; cos, sin (tokens, head_dim) in x's dtype
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    # k, v (tokens, kv_heads, head_dim); caches (num_blocks, block_size, kv_heads, head_dim);
    # slot_mapping (tokens,): block_id * block_size + offset
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, batch, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole context, read through block tables.

    q (tokens, heads, head_dim); k, v (tokens, kv_heads, head_dim): the new tokens, already stored in the cache.
    The batch puts its decode tokens (one per sequence) first, then each prefill chunk.
    """
    out = torch.empty_like(q)
    nd = batch.num_decode
    if nd:
        # (decodes, max_blocks, block_size, kv_heads, head_dim) -> (decodes, kv_heads, context, head_dim)
        keys = k_cache[batch.decode_block_tables].flatten(1, 2).transpose(1, 2)
        values = v_cache[batch.decode_block_tables].flatten(1, 2).transpose(1, 2)
        o = F.scaled_dot_product_attention(q[:nd].unsqueeze(2), keys, values, attn_mask=batch.decode_mask,
                                           scale=scale, enable_gqa=True)
        out[:nd] = o.squeeze(2)
    for start, length, context, block_table in batch.prefills:
        qi = q[start:start + length].transpose(0, 1)  # (heads, length, head_dim)
        if context == length:  # no earlier tokens: attend to the chunk itself
            ki, vi = k[start:start + length].transpose(0, 1), v[start:start + length].transpose(0, 1)
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True)
        else:
            ki = k_cache[block_table].flatten(0, 1)[:context].transpose(0, 1)
            vi = v_cache[block_table].flatten(0, 1)[:context].transpose(0, 1)
            # query i sits at position context - length + i and sees keys 0..that position
            keys = torch.arange(context, device=q.device)
            mask = keys <= keys[context - length:, None]
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:start + length] = o.transpose(0, 1)
    return out
