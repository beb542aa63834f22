"""Paged decode attention: one query token per sequence over its whole context, read through block tables.

Stage 1 runs one program per (sequence, KV head, split): it loads all the query heads that share the KV head (the
GQA group, padded to BLOCK_H rows so tl.dot applies) and walks its split of the context BLOCK_N tokens at a time
with an online softmax, so each K/V tile is read once for the whole group. Long contexts are cut into splits to
fill the GPU when there are few sequences; stage 2 then merges the splits' partial outputs by their log-sum-exps.
With one split, stage 1 writes the output directly and stage 2 is skipped.
"""

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
# Stage 1 programs that keep a GPU busy (~132 SMs, a few programs each) and the fewest context tokens worth a split.
TARGET_PROGRAMS = 4 * 132
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 64


@triton.jit
def decode_split_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, part_ptr, lse_ptr, scale, num_splits, window,
                        stride_qs, stride_qh, stride_ts, stride_kb, stride_kh, stride_kt,
                        stride_ps, stride_ph, stride_pp, stride_ls, stride_lh,
                        GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Attention of one sequence's query heads of one KV head over one split of its context (its last `window`
    tokens where window > 0): the normalized partial output (in part_ptr's dtype) and, with several splits, its
    natural log-sum-exp (-inf when empty)."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HEAD_DIM)
    tokens = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + rows
    row_ok = rows < GROUP

    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0)
    length = tl.load(lens_ptr + seq).to(tl.int32)
    lowest = tl.where(window > 0, tl.maximum(length - window, 0), 0)  # the first key seen
    skipped = lowest // BLOCK_N  # chunks wholly before it
    chunks = tl.cdiv(length, BLOCK_N)
    per_split = tl.cdiv(chunks - skipped, num_splits)
    first = skipped + split * per_split
    last = tl.minimum(first + per_split, chunks)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    qk_scale = scale * LOG2E  # scores in base 2: exp2 is the fast path
    head_base = kv_head.to(tl.int64) * stride_kh
    for chunk in range(first, last):
        start = chunk * BLOCK_N
        block = tl.load(tables_ptr + seq * stride_ts + start // BLOCK_SIZE).to(tl.int64)
        offset = start % BLOCK_SIZE + tokens
        valid = (start + tokens < length) & (start + tokens >= lowest)
        tile = block * stride_kb + head_base + offset[:, None] * stride_kt + dims[None, :]
        # tokens past the context may hold anything (even NaN): never load them
        k = tl.load(k_ptr + tile, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + tile, mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_m = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp2(m - new_m)
        p = tl.exp2(scores - new_m[:, None])
        total = total * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = new_m

    filled = total > 0  # false only for an empty split, which writes zeros and lse -inf
    safe_total = tl.where(filled, total, 1.0)
    out = acc / safe_total[:, None]
    part = part_ptr + seq * stride_ps + heads[:, None] * stride_ph + split * stride_pp + dims[None, :]
    tl.store(part, out.to(part_ptr.dtype.element_ty), mask=row_ok[:, None])
    if num_splits > 1:
        lse = tl.where(filled, (m + tl.log2(safe_total)) / LOG2E, float("-inf"))
        tl.store(lse_ptr + seq * stride_ls + heads * stride_lh + split, lse, mask=row_ok)


@triton.jit
def decode_reduce_kernel(part_ptr, lse_ptr, out_ptr, num_splits, stride_ps, stride_ph, stride_pp, stride_ls,
                         stride_lh, stride_os, stride_oh, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One (sequence, head): the splits' partial outputs weighted by exp(lse - max lse); empty splits weigh 0."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, HEAD_DIM)
    split_ok = splits < num_splits
    lse = tl.load(lse_ptr + seq * stride_ls + head * stride_lh + splits, mask=split_ok, other=float("-inf"))
    weights = tl.exp(lse - tl.max(lse, 0))
    parts = tl.load(part_ptr + seq * stride_ps + head * stride_ph + splits[:, None] * stride_pp + dims[None, :],
                    mask=split_ok[:, None], other=0.0)
    out = tl.sum(parts * weights[:, None], 0) / tl.sum(weights, 0)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def default_splits(seqs: int, kv_heads: int, max_context: int) -> int:
    """Splits per (sequence, KV head): enough programs to fill the GPU, each split at least MIN_SPLIT_TOKENS long.
    Depends on shapes only (no read of context_lens), so it needs no device sync and suits CUDA graphs."""
    return max(1, min(TARGET_PROGRAMS // (seqs * kv_heads), max_context // MIN_SPLIT_TOKENS, MAX_SPLITS))


def split_meta(group: int, head_dim: int, block_size: int, dtype: torch.dtype) -> dict:
    """decode_split_kernel's constexprs: BLOCK_H pads the group to tl.dot's 16 rows; BLOCK_N divides block_size.
    The split count is an argument, not a constant: a step's count follows its block table's width, and a constant
    would compile a kernel for each count met (about a second each on a GPU, in the middle of serving)."""
    return dict(GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
                BLOCK_SIZE=block_size, BLOCK_N=min(block_size, 64),
                PRECISION="ieee" if dtype == torch.float32 else "tf32")  # no TF32 rounding of float32 inputs


def reduce_meta(num_splits: int, head_dim: int) -> dict:
    """decode_reduce_kernel's constexprs: the splits padded to a power of two (a few kernels for all counts)."""
    return dict(BLOCK_S=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim)


def _check(q, k_cache, v_cache, block_tables, context_lens, out, num_splits):
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    if q.dim() != 3 or q.dtype not in dtypes:
        raise ValueError(f"q: expected (seqs, heads, head_dim) in {dtypes}, got {tuple(q.shape)} {q.dtype}")
    if q.stride(2) != 1:
        raise ValueError("q: expected its last dimension contiguous (stride 1)")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or cache.dtype != q.dtype or not cache.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous (num_blocks, kv_heads, block_size, head_dim) tensor in "
                             f"q's dtype {q.dtype}, got {tuple(cache.shape)} {cache.dtype}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    seqs, heads, head_dim = q.shape
    kv_heads, block_size = k_cache.shape[1:3]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache: head_dim {k_cache.shape[3]} does not match q's head_dim {head_dim}")
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"q: head_dim must be a power of two from 16 to 256, got {head_dim}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"k_cache: block_size must be a power of two >= 16, got {block_size}")
    if heads % kv_heads:
        raise ValueError(f"q: heads ({heads}) must be a multiple of the caches' kv_heads ({kv_heads})")
    if (block_tables.dim() != 2 or block_tables.shape[0] != seqs or block_tables.dtype not in (torch.int32, torch.int64)
            or block_tables.stride(1) != 1):
        raise ValueError(f"block_tables: expected ({seqs}, max_blocks) int32 or int64 with contiguous rows, "
                         f"got {tuple(block_tables.shape)} {block_tables.dtype}")
    if (context_lens.shape != (seqs,) or context_lens.dtype not in (torch.int32, torch.int64)
            or not context_lens.is_contiguous()):
        raise ValueError(f"context_lens: expected contiguous ({seqs},) int32 or int64, "
                         f"got {tuple(context_lens.shape)} {context_lens.dtype}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1):
        raise ValueError(f"out: expected {tuple(q.shape)} {q.dtype} with a contiguous last dimension, "
                         f"got {tuple(out.shape)} {out.dtype}")
    tensors = {"k_cache": k_cache, "v_cache": v_cache, "block_tables": block_tables, "context_lens": context_lens}
    if out is not None:
        tensors["out"] = out
    for name, t in tensors.items():
        if t.device != q.device:
            raise ValueError(f"{name}: expected q's device {q.device}, got {t.device}")
    if num_splits is not None and (not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits: expected an int from 1 to {MAX_SPLITS} or None, got {num_splits!r}")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, out: torch.Tensor = None,
                     num_splits: int = None, window: int = None) -> torch.Tensor:
    """Attention of each sequence's one query over its context_lens[i] >= 1 cached tokens (window: the last
    `window` of them only); returns out.

    q (seqs, heads, head_dim); k_cache, v_cache (num_blocks, kv_heads, block_size, head_dim) in q's dtype;
    block_tables (seqs, max_blocks) int32/int64; context_lens (seqs,); out (seqs, heads, head_dim) in q's dtype.
    num_splits: context splits per sequence (None: default_splits)."""
    _check(q, k_cache, v_cache, block_tables, context_lens, out, num_splits)
    seqs, heads, head_dim = q.shape
    kv_heads, block_size = k_cache.shape[1:3]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if seqs == 0:
        return out
    if num_splits is None:
        num_splits = default_splits(seqs, kv_heads, block_tables.shape[1] * block_size)
    if num_splits == 1:
        part, lse = out, out  # lse is not written with one split
        part_strides, lse_strides = (out.stride(0), out.stride(1), 0), (0, 0)
    else:
        part = torch.empty((seqs, heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((seqs, heads, num_splits), dtype=torch.float32, device=q.device)
        part_strides, lse_strides = part.stride()[:3], lse.stride()[:2]
    decode_split_kernel[(seqs, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, part, lse, scale, num_splits, window or 0,
        q.stride(0), q.stride(1), block_tables.stride(0), *k_cache.stride()[:3], *part_strides, *lse_strides,
        **split_meta(heads // kv_heads, head_dim, block_size, q.dtype))
    if num_splits > 1:
        decode_reduce_kernel[(seqs, heads)](
            part, lse, out, num_splits, *part.stride()[:3], *lse.stride()[:2], out.stride(0), out.stride(1),
            **reduce_meta(num_splits, head_dim))
    return out
