"""int8 weights and activations (W8A8) for the linear layers on CPUs: weights quantized once, per output channel;
activations on the fly, per token. A few rows go through a native kernel (VNNI byte products, weights streamed
once), more through torch's fbgemm kernels (each row scaled to [-1, 1] first, so that fbgemm's per-tensor scale
acts per row). About twice the speed of bfloat16 products here (the 120 projections of SmolLM2 at 64 rows: 32
against 68 ms; at 8 rows 15 against 16-22), at a small loss of accuracy.
"""

import warnings

import torch

from lmcli.errors import UserError
from lmcli.kernels import native

# Up to this many rows the native kernel beats fbgemm (the 120 projections of SmolLM2 from memory: 7.4 vs 14.0 ms
# at 1 row, 15.3 vs 17.4 at 8, 21.8 vs 20.2 at 12).
GEMV_MAX_ROWS = 8


def _vnni() -> bool:
    flags = native._cpu_flags().split()
    return "avx512_vnni" in flags or "avx_vnni" in flags


# Without VNNI, fbgemm adds pairs of byte products in 16 bits, which can saturate; torch's own dynamic Linear then
# quantizes activations to 7 bits (reduce_range), and so do we.
REDUCE_RANGE = not _vnni()


def check() -> None:
    """Raise a UserError if this torch build cannot run int8 linear layers."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise UserError("int8 weights need torch's fbgemm kernels, which this torch build lacks")


class Int8Weight:
    """One weight (out, in) quantized per output channel: fbgemm's packed form for products of many rows, and the
    plain int8 matrix (its scales, its row sums) for the native kernel of a few rows."""

    def __init__(self, weight: torch.Tensor):
        w = weight.detach().float()
        scale = (w.abs().amax(1) / 127).clamp_min(1e-12)
        self.q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        self.scale, self.sum = scale.contiguous(), self.q.sum(1, dtype=torch.int32).contiguous()
        with warnings.catch_warnings():  # torch marks its quantized tensor constructors deprecated
            warnings.simplefilter("ignore")
            q = torch._make_per_channel_quantized_tensor(self.q, scale.double(), torch.zeros_like(self.sum,
                                                         dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(q, None)  # no bias: rows are scaled after


def pack(weight: torch.Tensor) -> Int8Weight:
    return Int8Weight(weight)


def linear(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor = None) -> torch.Tensor:
    """x (tokens, in) -> x . W^T (+ bias) in x's dtype."""
    native_bf16 = x.dtype == torch.bfloat16 and x.is_contiguous() and native.library() is not None
    if native_bf16 and x.shape[0] <= GEMV_MAX_ROWS:
        y = native.gemv_s8(x, weight.q, weight.scale, weight.sum)
    elif native_bf16:
        unit, rows = native.rows_to_unit(x)  # one pass each way instead of six small torch calls
        y = native.scale_rows_bf16(torch.ops.quantized.linear_dynamic(unit, weight.packed, REDUCE_RANGE), rows)
    else:
        xf = x.float()
        rows = xf.abs().amax(1, keepdim=True).clamp_min_(1e-12)
        y = torch.ops.quantized.linear_dynamic(xf / rows, weight.packed, REDUCE_RANGE).mul_(rows).to(x.dtype)
    return y if bias is None else y.add_(bias)
