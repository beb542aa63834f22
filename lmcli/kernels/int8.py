"""int8 weights for the linear layers on CPUs: each output row quantized once to -127..127 with its own scale;
activations quantized on the fly to signed bytes per block of 32 (per row, as fbgemm needs, lost 3% perplexity
on SmolLM2: one channel's outlier flattens a whole row; per block 0.5%). The native kernel (cpu/blocks.c, shared
with 4-bit weights) keeps the weights in tiles of 8 output rows and runs at every kernel level and row count.

Quantizing after the tensor-parallel split (as the engine does) keeps every row's scale on its own rank."""

from typing import Optional

import torch

BLOCK = 32
TILE = 8


class Int8Weight:
    """One weight (out, in): codes + 128 (tiles, blocks, 8, 8, 4) uint8 (see cpu/blocks.c) and scales, each row's
    (out rounded up to tiles of 8,) float32. kernels.quantized_linear multiplies by it."""

    kernel = "gemm_s8"
    bits = 8

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        """q (out, in) int8 in -127..127, scale (out,) float32."""
        n, k = q.shape
        pad = -n % TILE
        u = (q.to(torch.int16) + 128).to(torch.uint8)
        if pad:
            u = torch.cat([u, torch.full((pad, k), 128, dtype=torch.uint8)])  # code 0: a zero weight
            scale = torch.cat([scale, scale.new_zeros(pad)])
        tiles, blocks = u.shape[0] // TILE, k // BLOCK
        # element 32g + 4c + b of row 8T + i -> chunk c, lane i, byte b
        self.codes = u.view(tiles, TILE, blocks, 8, 4).permute(0, 2, 3, 1, 4).contiguous()
        self.scales = scale.float().contiguous()
        self.shape = (n, k)

    def dequantize(self) -> torch.Tensor:
        """The weight in float32 (out, in): exactly what the kernel multiplies by."""
        n, k = self.shape
        tiles = self.codes.shape[0]
        q = self.codes.permute(0, 3, 1, 2, 4).reshape(tiles * TILE, k).float() - 128
        return (q * self.scales[:, None])[:n]


def pack(weight: torch.Tensor) -> Optional[Int8Weight]:
    """Per output row: scale = its largest magnitude / 127, codes the nearest. None where in features are not a
    multiple of 32 (the kernel's blocks)."""
    if weight.dim() != 2 or weight.shape[1] % BLOCK:
        return None
    w = weight.detach().float()
    scale = (w.abs().amax(1) / 127).clamp_min(1e-12)
    return Int8Weight(torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale)

