"""Prefill (extend) attention over the paged KV cache for a batch of chunks of different lengths (varlen).

Each sequence's new tokens are the last of its context and are already stored in the cache: query j of a sequence
of `length` new tokens sits at position context - length + j and attends to keys 0..that position, read block by
block through the block table (a cached prefix, then a causal mask over the chunk itself). A flash-attention
forward: one program per (block of BLOCK_M queries, sequence, query head), an online softmax in float32 over key
blocks of BLOCK_N, and no work past the causal limit of its query block. A decode is a chunk of length 1."""

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def launch_config(head_dim: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this head size. On an H200 in bfloat16 (32 heads, 8 kv heads),
    64/64 with 4 warps and 2 stages was the fastest of the tiles tried at d=64 and d=128: 8 prompts of 1024 at
    234 and 249 TFLOP/s (torch's flash SDPA on contiguous tensors: 312 and 435), 4 chunks of 512 after 3584 cached
    at 275 and 320; 64/32 ran 5-20% slower at d=128 and 32/64 half as fast. At d=256 (not timed) a 32/32 tile keeps
    the float32 accumulator's registers per thread as at d=128."""
    if head_dim <= 128:
        return 64, 64, 4, 2
    return 32, 32, 4, 2


@triton.jit
def _attend(acc, m_i, l_i, q, k_base, v_base, table_row, pos, low, start, end, qk_scale, stride_cache_block,
            BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Fold keys start..end-1 into the running softmax (acc, m_i, l_i) of the query tile q. MASKED: the causal
    diagonal, where keys past a row's position pos or at or before its low (a sliding window's edge) are dropped
    and the last block may run past end; otherwise every key is visible to every row and no mask is applied."""
    offs_d = tl.arange(0, HEAD_DIM)
    for n in range(start, end, BLOCK_N):
        keys = n + tl.arange(0, BLOCK_N)
        inside = keys < end
        if MASKED:
            blocks = tl.load(table_row + keys // BLOCK_SIZE, mask=inside, other=0)
        else:
            blocks = tl.load(table_row + keys // BLOCK_SIZE)
        slots = blocks.to(tl.int64) * stride_cache_block + (keys % BLOCK_SIZE) * HEAD_DIM
        if MASKED:
            k = tl.load(k_base + slots[None, :] + offs_d[:, None], mask=inside[None, :], other=0.0)
        else:
            k = tl.load(k_base + slots[None, :] + offs_d[:, None])
        s = tl.dot(q, k) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            s = tl.where((keys[None, :] <= pos[:, None]) & (keys[None, :] > low[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:  # a row may see none of this block yet (a window's edge): no -inf - -inf
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_base + slots[:, None] + offs_d[None, :], mask=inside[:, None], other=0.0)
        else:
            v = tl.load(v_base + slots[:, None] + offs_d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def extend_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, cu_seqlens_ptr,
                            context_lens_ptr, qk_scale, window, stride_qt, stride_qh, stride_ot, stride_oh, stride_table,
                            stride_cache_block, stride_cache_head, group,
                            BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    """Grid (cdiv(max_seqlen_q, BLOCK_M), seqs, heads). qk_scale is the softmax scale times log2(e); window > 0:
    each query sees its last `window` keys only."""
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    length = (tl.load(cu_seqlens_ptr + seq + 1) - q_start).to(tl.int32)
    if tile * BLOCK_M >= length:
        return
    context = tl.load(context_lens_ptr + seq).to(tl.int32)

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = rows < length
    tokens = q_start + rows
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=valid[:, None],
                other=0.0)
    pos = context - length + rows  # each query's position in its sequence
    first = context - length + tile * BLOCK_M  # the tile's first query: every row sees keys 0..first
    end = tl.minimum(first + BLOCK_M, context)  # the last valid row sees keys 0..end-1
    full = (first + 1) // BLOCK_N * BLOCK_N  # key blocks before this one need no mask

    kv_head = head // group
    k_base = k_cache_ptr + kv_head * stride_cache_head
    v_base = v_cache_ptr + kv_head * stride_cache_head
    table_row = block_tables_ptr + seq * stride_table
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if window > 0:  # every key block the tile's window touches, masked on both sides
        start = tl.maximum(first - window + 1, 0) // BLOCK_N * BLOCK_N
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, table_row, pos, pos - window, start, end,
                                qk_scale, stride_cache_block, BLOCK_SIZE, HEAD_DIM, BLOCK_N, True)
    else:
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, table_row, pos, pos - context, 0, full, qk_scale,
                                stride_cache_block, BLOCK_SIZE, HEAD_DIM, BLOCK_N, False)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, table_row, pos, pos - context - 1, full, end,
                                qk_scale, stride_cache_block, BLOCK_SIZE, HEAD_DIM, BLOCK_N, True)
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # 0: a row past the chunk that a window left no key
    tl.store(out_ptr + tokens[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=valid[:, None])


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, max_seqlen_q: int, scale: float,
                     out: torch.Tensor = None, window: int = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole context (window: its last `window` keys
    only), read through its block table.

    q (tokens, heads, head_dim): sequence i's new tokens are q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]], the last of its
    context_lens[i] tokens, all already stored in k_cache, v_cache (num_blocks, kv_heads, block_size, head_dim);
    block_tables (seqs, max_blocks); cu_seqlens_q (seqs + 1,) and context_lens (seqs,), int32 or int64;
    max_seqlen_q: a host int, at least the longest chunk. Writes and returns out (tokens, heads, head_dim) in q's
    dtype."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q: expected a (tokens, heads, head_dim) tensor, got {getattr(q, 'shape', type(q))}")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"q: expected bfloat16, float16 or float32, got {q.dtype}")
    if q.stride(-1) != 1:
        raise ValueError(f"q: expected a unit stride on head_dim, got strides {q.stride()}")
    tokens, heads, head_dim = q.shape
    if not (_power_of_two(head_dim) and 16 <= head_dim <= 256):
        raise ValueError(f"q: head_dim must be a power of two from 16 to 256, got {head_dim}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(cache, torch.Tensor) or cache.dim() != 4:
            raise ValueError(f"{name}: expected a (num_blocks, kv_heads, block_size, head_dim) tensor, "
                             f"got {getattr(cache, 'shape', type(cache))}")
        if cache.dtype != q.dtype or cache.device != q.device:
            raise ValueError(f"{name}: expected {q.dtype} on {q.device} like q, got {cache.dtype} on {cache.device}")
        if not cache.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    _, kv_heads, block_size, cache_dim = k_cache.shape
    if cache_dim != head_dim:
        raise ValueError(f"k_cache: expected head_dim {head_dim} like q, got {cache_dim}")
    if heads % kv_heads:
        raise ValueError(f"q: expected a multiple of the cache's {kv_heads} kv heads, got {heads} heads")
    if not _power_of_two(block_size):
        raise ValueError(f"k_cache: block_size must be a power of two, got {block_size}")
    if not isinstance(block_tables, torch.Tensor) or block_tables.dim() != 2:
        raise ValueError(f"block_tables: expected a (seqs, max_blocks) tensor, "
                         f"got {getattr(block_tables, 'shape', type(block_tables))}")
    seqs = block_tables.shape[0]
    for name, t, shape in (("block_tables", block_tables, None), ("cu_seqlens_q", cu_seqlens_q, (seqs + 1,)),
                           ("context_lens", context_lens, (seqs,))):
        if not isinstance(t, torch.Tensor) or (shape is not None and tuple(t.shape) != shape):
            raise ValueError(f"{name}: expected shape {shape} (seqs = block_tables.shape[0] = {seqs}), "
                             f"got {getattr(t, 'shape', type(t))}")
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: expected int32 or int64, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected a tensor on {q.device} like q, got {t.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a unit stride on its last dimension, got strides {t.stride()}")
    if isinstance(max_seqlen_q, bool) or not isinstance(max_seqlen_q, int) or max_seqlen_q < 0:
        raise ValueError(f"max_seqlen_q: expected a host int >= 0, got {max_seqlen_q!r}")
    if out is None:
        out = torch.empty_like(q)
    elif (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype
          or out.device != q.device or out.stride(-1) != 1):
        raise ValueError(f"out: expected a {tuple(q.shape)} {q.dtype} tensor on {q.device} with a unit stride on "
                         f"head_dim, got {getattr(out, 'shape', type(out))}")
    if tokens == 0 or seqs == 0 or max_seqlen_q == 0:
        return out
    block_m, block_n, num_warps, num_stages = launch_config(head_dim)
    grid = (triton.cdiv(max_seqlen_q, block_m), seqs, heads)
    extend_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, context_lens, float(scale) * LOG2E, window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), heads // kv_heads,
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages)
    return out
