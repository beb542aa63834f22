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
    bits = 4

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


class Int4Blocks:
    """A weight (out, in) in 4-bit blocks as a workspace stores it and the loaders cut it: codes q (out, in) uint8
    0..15 (one a byte here; two a byte on disk, see pack), d and mn (out, in / 32) float16, w = d * q + mn. Rows cut
    anywhere; columns only at multiples of 32 (whole blocks)."""

    def __init__(self, q: torch.Tensor, d: torch.Tensor, mn: torch.Tensor):
        self.q, self.d, self.mn = q, d, mn
        self.shape = tuple(q.shape)

    def rows(self, ranges: list) -> "Int4Blocks":
        """The rows [s, e) of each range, in order."""
        return Int4Blocks(*(torch.cat([t[s:e] for s, e in ranges]) for t in (self.q, self.d, self.mn)))

    def cols(self, ranges: list) -> Optional["Int4Blocks"]:
        """The columns [s, e) of each range, in order; None where a range cuts a block."""
        if any(s % BLOCK or e % BLOCK for s, e in ranges):
            return None
        q = torch.cat([self.q[:, s:e] for s, e in ranges], 1)
        d, mn = (torch.cat([t[:, s // BLOCK:e // BLOCK] for s, e in ranges], 1) for t in (self.d, self.mn))
        return Int4Blocks(q, d, mn)

    def dequantize(self) -> torch.Tensor:
        """float32 (out, in)."""
        n, k = self.shape
        q = self.q.view(n, k // BLOCK, BLOCK).float()
        return (q * self.d.float()[..., None] + self.mn.float()[..., None]).view(n, k)

    def weight(self) -> Int4Weight:
        """In the kernel's layout."""
        return Int4Weight(self.q, self.d, self.mn)

    @staticmethod
    def cat(parts: list) -> "Int4Blocks":
        """Stacked along the rows (fused projections)."""
        return Int4Blocks(*(torch.cat([getattr(p, a) for p in parts]) for a in ("q", "d", "mn")))

    def pack(self) -> dict:
        """Tensors to store under a weight's name + suffix: codes two a byte (element 2j in the low nibble)."""
        return {".q4": self.q[:, 0::2] | (self.q[:, 1::2] << 4), ".q4_scale": self.d, ".q4_min": self.mn}

    @classmethod
    def unpack(cls, tensors: dict) -> "Int4Blocks":
        packed = tensors[".q4"]
        q = torch.stack([packed & 0x0F, packed >> 4], 2).view(packed.shape[0], -1)
        return cls(q, tensors[".q4_scale"], tensors[".q4_min"])


SUFFIXES = (".q4", ".q4_scale", ".q4_min")


def can_quantize(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.shape[1] % BLOCK == 0 and bool(weight.abs().max() <= F16_MAX)


def quantize_blocks(weight: torch.Tensor) -> Optional[Int4Blocks]:
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
    return Int4Blocks(q.view(n, k), d.view(n, -1).half(), mn.view(n, -1).half())


def quantize(weight: torch.Tensor) -> Optional[Int4Weight]:
    """quantize_blocks in the kernel's layout."""
    blocks = quantize_blocks(weight)
    return None if blocks is None else blocks.weight()


def from_gguf(data, kind: str, shape: tuple) -> Optional[Int4Blocks]:
    """A GGUF tensor's Q4_0 or Q4_1 blocks as they are (Q4_0's w = d * (q - 8) is d * q + mn with mn = -8 d, exact
    in float16); None for other types. data: the tensor's raw bytes (rows, blocks * bytes a block) uint8."""
    import numpy as np

    head = {"Q4_1": 4, "Q4_0": 2}.get(kind)
    n, k = shape
    if head is None or k % BLOCK:
        return None
    raw = torch.from_numpy(np.array(data, np.uint8).reshape(n, k // BLOCK, head + 16))
    d = raw[..., :2].contiguous().view(torch.float16)[..., 0]
    mn = raw[..., 2:4].contiguous().view(torch.float16)[..., 0] if head == 4 else -8 * d
    qs = raw[..., head:]  # byte j: element j in the low nibble, element j + 16 in the high one
    q = torch.cat([qs & 0x0F, qs >> 4], 2).reshape(n, k)
    return Int4Blocks(q.contiguous(), d.contiguous(), mn.contiguous())
