"""The ops the model runs, behind one small interface. Every op has its PyTorch reference (the CPU path and the
test oracle); where a faster kernel exists for the device, it is picked here."""

import torch

from lmcli.kernels import native, reference
from lmcli.kernels.reference import (  # noqa: F401
    rotary,
    silu_and_mul,
    store_kv,
)

# Up to this many tokens the native kernel beats torch's GEMM when the weights come from memory, as they do in a
# step (all 120 projections of SmolLM2: 9.3 vs 17.8 ms at 4 rows, 16.3-17.2 vs 21.0-22.4 ms at 8, 27.9-29.5 vs
# 26.8-30.2 ms at 12, 34.0 vs 30.6 ms at 16).
GEMV_MAX_ROWS = 8

def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor = None, out_dtype=None) -> torch.Tensor:
    """x (tokens, in) . weight (out, in)^T (+ bias), in out_dtype (default: x's dtype)."""
    if (x.shape[0] <= GEMV_MAX_ROWS and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and x.device.type == "cpu" and weight.is_contiguous() and native.library() is not None):
        y = native.gemv_bf16(x.contiguous(), weight)
        if bias is not None:
            y += bias
        return y.to(out_dtype or x.dtype)
    return reference.linear(x, weight, bias, out_dtype)


def _native_norm(*tensors) -> bool:
    return (all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)
            and tensors[0].dim() == 2 and native.library() is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _native_norm(x, weight):
        return native.add_rms_norm_bf16(x, None, weight, eps)[0]
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual); bfloat16 on CPU in one native pass."""
    if _native_norm(x, residual, weight):
        return native.add_rms_norm_bf16(x, residual, weight, eps)
    return reference.add_rms_norm(x, residual, weight, eps)


def paged_attention(q, k, v, k_cache, v_cache, batch, scale: float) -> torch.Tensor:
    """See reference.paged_attention; in bfloat16 on CPU, the native kernels read K/V in place: one for the
    decodes, one for each chunk of several tokens (faster than torch's CPU flash kernel at every size measured:
    64 tokens 0.054 vs 0.172 ms, 1024 tokens 6.7 vs 19.5 ms, 40 tokens after 1060 cached ones 0.57 vs 1.48 ms)."""
    decode = chunk = None
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and native.library() is not None:
        chunk = native.prefill_attention

        def decode(qd, kc, vc, b, s):
            out = native.paged_decode_attention(qd, kc, vc, b.decode_block_tables, b.decode_lens, s)
            return reference.decode_attention(qd, kc, vc, b, s) if out is None else out.to(qd.dtype)
    return reference.paged_attention(q, k, v, k_cache, v_cache, batch, scale, decode, chunk)
