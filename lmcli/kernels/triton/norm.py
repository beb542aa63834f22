"""RMS norm, alone or after the residual add, one program a row: the rounding of reference.rms_norm and
reference.add_rms_norm (statistics in float32, the normalized row rounded to x's dtype, then times the weight)."""

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 16384  # one block holds the whole row


@triton.jit
def rms_norm_kernel(x, residual, weight, out, hidden, eps, x_stride, residual_stride, out_stride, ADD: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Row program_id(0) of x (rows, hidden): with ADD, x + residual first (rounded, written into residual)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    v = tl.load(x + row * x_stride + offs, mask=mask, other=0.0)
    if ADD:
        r = tl.load(residual + row * residual_stride + offs, mask=mask, other=0.0)
        v = (v.to(tl.float32) + r.to(tl.float32)).to(x.dtype.element_ty)
        tl.store(residual + row * residual_stride + offs, v, mask=mask)
    v = v.to(tl.float32)
    scale = tl.rsqrt(tl.sum(v * v, axis=0) / hidden + eps)
    normed = (v * scale).to(x.dtype.element_ty).to(tl.float32)
    w = tl.load(weight + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + row * out_stride + offs, (normed * w).to(out.dtype.element_ty), mask=mask)


def num_warps(block: int) -> int:
    """Warps for a row of block values: about 8 values a thread, 1 to 16 warps."""
    return min(max(block // 256, 1), 16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (rows, hidden), weight (hidden,) in x's dtype -> rms_norm(x) * weight, a new tensor in x's dtype."""
    _check(x, weight)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch(x, x, weight, out, eps, add=False)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual) * weight, x + residual). In place: the sum is written into residual, which is
    returned (as its second value); x is left as it was."""
    _check(x, weight)
    if not isinstance(residual, torch.Tensor) or residual.shape != x.shape or residual.dtype != x.dtype \
            or residual.stride(-1) != 1:
        raise ValueError(f"residual: expected {tuple(x.shape)} {x.dtype} with contiguous rows (x's), got "
                         f"{_describe(residual)}")
    if residual.device != x.device:
        raise ValueError(f"residual: expected a tensor on {x.device} (x's device), got one on {residual.device}")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch(x, residual, weight, out, eps, add=True)
    return out, residual


def _check(x, weight) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x: expected a (rows, hidden) tensor with contiguous rows, got {_describe(x)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x: expected bfloat16, float16 or float32, got {x.dtype}")
    if not 1 <= x.shape[1] <= MAX_HIDDEN:
        raise ValueError(f"x: expected a hidden size (dim 1) from 1 to {MAX_HIDDEN}, got {x.shape[1]}")
    if not isinstance(weight, torch.Tensor) or weight.shape != x.shape[1:] or weight.dtype != x.dtype \
            or not weight.is_contiguous():
        raise ValueError(f"weight: expected a contiguous ({x.shape[1]},) {x.dtype} tensor (x's hidden size and "
                         f"dtype), got {_describe(weight)}")
    if weight.device != x.device:
        raise ValueError(f"weight: expected a tensor on {x.device} (x's device), got one on {weight.device}")


def _launch(x, residual, weight, out, eps: float, add: bool) -> None:
    rows, hidden = x.shape
    if rows:
        block = triton.next_power_of_2(hidden)
        rms_norm_kernel[(rows,)](x, residual, weight, out, hidden, eps, x.stride(0), residual.stride(0),
                                 out.stride(0), ADD=add, BLOCK=block, num_warps=num_warps(block))


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{tuple(t.shape)} {t.dtype} with strides {t.stride()}"
    return type(t).__name__
