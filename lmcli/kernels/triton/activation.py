"""The MLP's activation: silu(gate) * up in one pass, rounded as reference.silu_and_mul (torch) rounds it."""

import torch
import triton
import triton.language as tl

BLOCK = 1024  # values of a row per program
NUM_WARPS = 4


@triton.jit
def silu_and_mul_kernel(x, out, intermediate, x_stride, out_stride, BLOCK: tl.constexpr):
    """Program (row, chunk): out[row, chunk] = silu(gate) * up, x's row = gate then up. silu in float32, rounded to
    the dtype before the product, as torch's silu then mul_ round."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < intermediate
    gate = tl.load(x + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x + row * x_stride + intermediate + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(out.dtype.element_ty).to(tl.float32)
    tl.store(out + row * out_stride + offs, (silu * up).to(out.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x (tokens, 2 * intermediate), gate then up -> silu(gate) * up (tokens, intermediate), a new tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] % 2 or x.stride(-1) != 1:
        shape = f"{tuple(x.shape)} with strides {x.stride()}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a (tokens, 2 * intermediate) tensor with contiguous rows, got {shape}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x: expected bfloat16, float16 or float32, got {x.dtype}")
    tokens, intermediate = x.shape[0], x.shape[1] // 2
    out = torch.empty((tokens, intermediate), dtype=x.dtype, device=x.device)
    if tokens and intermediate:
        silu_and_mul_kernel[(tokens, triton.cdiv(intermediate, BLOCK))](x, out, intermediate, x.stride(0),
                                                                       out.stride(0), BLOCK=BLOCK,
                                                                       num_warps=NUM_WARPS)
    return out
