"""Rotary embedding on q and k in place, then k and v stored in the paged KV cache: one pass over qkv, as
kernels.rotary_store (reference.rotary then reference.store_kv) does it in two."""

import torch
import triton
import triton.language as tl

NUM_WARPS = 1  # a program moves one head row (at most 256 values): one warp is enough


@triton.jit
def rotary_store_kernel(qkv, cos, sin, k_cache, v_cache, slots, heads, kv_heads, block_size, qkv_stride, cos_stride,
                        sin_stride, slot_stride, HALF: tl.constexpr):
    """Program (token, row) of qkv (tokens, heads + 2 * kv_heads, 2 * HALF): q and k rows rotated (Hugging Face's
    half-split layout, in float32) and written back; k and v rows then stored at the token's slot unless it is < 0."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, HALF)
    lanes = tl.zeros([HALF], dtype=tl.int32)  # the row and slot in every lane: the masks are blocks, not scalars
    row = tl.program_id(1) + lanes
    src = qkv + token * qkv_stride + row * (2 * HALF) + offs
    x1 = tl.load(src).to(tl.float32)
    x2 = tl.load(src + HALF).to(tl.float32)
    c1 = tl.load(cos + token * cos_stride + offs).to(tl.float32)
    c2 = tl.load(cos + token * cos_stride + HALF + offs).to(tl.float32)
    s1 = tl.load(sin + token * sin_stride + offs).to(tl.float32)
    s2 = tl.load(sin + token * sin_stride + HALF + offs).to(tl.float32)
    rotate = row < heads + kv_heads
    y1 = tl.where(rotate, x1 * c1 - x2 * s1, x1).to(qkv.dtype.element_ty)
    y2 = tl.where(rotate, x2 * c2 + x1 * s2, x2).to(qkv.dtype.element_ty)
    tl.store(src, y1, mask=rotate)
    tl.store(src + HALF, y2, mask=rotate)

    slot = tl.load(slots + token * slot_stride).to(tl.int64) + lanes
    keep = slot >= 0
    slot = tl.maximum(slot, 0)  # a masked store's address stays in range all the same
    is_k = rotate & (row >= heads) & keep
    is_v = (row >= heads + kv_heads) & keep
    head = tl.where(row >= heads + kv_heads, row - heads - kv_heads, row - heads)
    dst = ((slot // block_size * kv_heads + head) * block_size + slot % block_size) * (2 * HALF) + offs
    tl.store(k_cache + dst, y1, mask=is_k)
    tl.store(k_cache + dst + HALF, y2, mask=is_k)
    tl.store(v_cache + dst, y1, mask=is_v)
    tl.store(v_cache + dst + HALF, y2, mask=is_v)


def rotary_store(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor):
    """qkv (tokens, heads + 2 * kv_heads, head_dim): q and k rotated in place (cos, sin (tokens, head_dim) in
    qkv's dtype, computed in float32), then k and v stored in the paged caches (num_blocks, kv_heads, block_size,
    head_dim) at slot_mapping (tokens,) int64 or int32; a slot < 0 stores nothing. Returns the views q, k, v."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        raise ValueError(f"qkv: expected a (tokens, heads + 2 * kv_heads, head_dim) tensor, got {_describe(qkv)}")
    tokens, rows, dim = qkv.shape
    if heads < 1 or kv_heads < 1 or rows != heads + 2 * kv_heads:
        raise ValueError(f"qkv: expected {heads} + 2 * {kv_heads} heads (heads, kv_heads), got {rows}")
    if dim < 2 or dim > 256 or dim & (dim - 1):
        raise ValueError(f"qkv: expected a head_dim that is a power of two from 2 to 256, got {dim}")
    if qkv.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"qkv: expected bfloat16, float16 or float32, got {qkv.dtype}")
    if qkv.stride(2) != 1 or qkv.stride(1) != dim:
        raise ValueError(f"qkv: expected contiguous heads (strides (*, {dim}, 1)), got strides {qkv.stride()}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.shape != (tokens, dim) or t.dtype != qkv.dtype or t.stride(1) != 1:
            raise ValueError(f"{name}: expected ({tokens}, {dim}) {qkv.dtype} with contiguous rows, got {_describe(t)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != kv_heads or t.shape[3] != dim \
                or t.dtype != qkv.dtype or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous (num_blocks, {kv_heads}, block_size, {dim}) {qkv.dtype} "
                             f"tensor, got {_describe(t)}")
    block_size = k_cache.shape[2]
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"k_cache: expected a block_size (dim 2) that is a power of two, got {block_size}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"v_cache: expected k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.shape != (tokens,) \
            or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slot_mapping: expected ({tokens},) int64 or int32, got {_describe(slot_mapping)}")
    for name, t in (("cos", cos), ("sin", sin), ("k_cache", k_cache), ("v_cache", v_cache),
                    ("slot_mapping", slot_mapping)):
        if t.device != qkv.device:
            raise ValueError(f"{name}: expected a tensor on {qkv.device} (qkv's device), got one on {t.device}")
    if tokens:
        rotary_store_kernel[(tokens, rows)](qkv, cos, sin, k_cache, v_cache, slot_mapping, heads, kv_heads,
                                            block_size, qkv.stride(0), cos.stride(0), sin.stride(0),
                                            slot_mapping.stride(0), HALF=dim // 2, num_warps=NUM_WARPS)
    return qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{tuple(t.shape)} {t.dtype} with strides {t.stride()}"
    return type(t).__name__
