"""4-bit weights for the linear layers on CPUs: blocks of 32 along the input, each with a scale and a minimum in
float16 (GGUF's Q4_1: w = d * q + mn, q in 0..15; 5 bits a weight in all), activations quantized on the fly to
signed bytes per block of 32 (as llama.cpp's Q8 activations). The native kernel (cpu/blocks.c) keeps the codes in
tiles of 8 output rows and runs at every kernel level; without native kernels the weight is widened per product.

Quantizing after the tensor-parallel split (as the engine does) puts every block inside one rank's shard."""

from typing import Optional

import torch

BLOCK = 32
TILE = 8
F16_MAX = 65504.0


class Int4Weight:
    """One weight (out, in) in the kernel's layout (cpu/blocks.c): codes (tiles, blocks, 4, 8, 4) uint8 and scales
    (tiles, blocks, 2, 8) float16, out rounded up to tiles of 8 rows (zeros). kernels.quantized_linear multiplies by
    it."""

    kernel = "gemm_q4"

    def __init__(self, q: torch.Tensor, d: torch.Tensor, mn: torch.Tensor):
        """q (out, in) codes 0..15 (uint8), d and mn (out, in / 32) float16."""
        n, k = q.shape
        pad = -n % TILE
        if pad:
            q, d, mn = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (q, d, mn))
        tiles, blocks = q.shape[0] // TILE, k // BLOCK
        # element 32g + 16h + 4c + b of row 8T + i -> chunk c, lane i, byte b; h picks the nibble
        t = q.view(tiles, TILE, blocks, 2, 4, 4).permute(0, 2, 3, 4, 1, 5)
        self.codes = (t[:, :, 0] | (t[:, :, 1] << 4)).contiguous()
        self.scales = torch.stack([d.view(tiles, TILE, blocks), mn.view(tiles, TILE, blocks)], 2) \
            .permute(0, 3, 2, 1).contiguous()
        self.shape = (n, k)

    def dequantize(self) -> torch.Tensor:
        """The weight in float32 (out, in): exactly what the kernel multiplies by."""
        n, k = self.shape
        tiles, blocks = self.codes.shape[:2]
        q = torch.stack([self.codes & 0x0F, self.codes >> 4], 2)  # (tiles, blocks, h, c, i, b)
        q = q.permute(0, 4, 1, 2, 3, 5).reshape(tiles * TILE, blocks, BLOCK).float()
        s = self.scales.float().permute(0, 3, 1, 2).reshape(tiles * TILE, blocks, 2)
        return (q * s[..., :1] + s[..., 1:]).view(-1, k)[:n]


def can_quantize(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.shape[1] % BLOCK == 0 and bool(weight.abs().max() <= F16_MAX)


def quantize(weight: torch.Tensor) -> Optional[Int4Weight]:
    """Per block of 32: mn = the block's minimum, d = (max - mn) / 15, both rounded to float16 first, then each
    code the nearest. None where the layout cannot hold the weight (in features not a multiple of 32, values
    beyond float16)."""
    if not can_quantize(weight):
        return None
    n, k = weight.shape
    w = weight.detach().float().view(n, k // BLOCK, BLOCK)
    lo, hi = w.amin(2, keepdim=True), w.amax(2, keepdim=True)
    mn = lo.half().float()
    d = ((hi - mn) / 15).half().float()
    q = torch.where(d > 0, torch.round((w - mn) / torch.where(d > 0, d, 1)), 0).clamp_(0, 15).to(torch.uint8)
    return Int4Weight(q.view(n, k), d.view(n, -1).half(), mn.view(n, -1).half())

