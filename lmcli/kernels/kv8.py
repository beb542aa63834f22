"""The 8-bit KV cache (--quant-policy 8, LMDeploy's name): each key and value row (one token, one kv head) kept as
signed bytes with one float16 scale, its largest magnitude / 127: head_dim + 2 bytes a row against 2 * head_dim
in bfloat16 (1.94x the tokens in the same bytes at head_dim 64).

Int8Cache stands where a cache tensor would: indexing it with a slot assignment quantizes the rows stored, and
index_select returns whole blocks dequantized to float32, so the PyTorch reference paths (store, gather, decode)
run on it unchanged. The native decode kernel (cpu/attention_s8.c) reads the bytes and scales in place."""

import torch

LEVELS = 127.0


class Int8Cache:
    """data (blocks, kv_heads, block_size, head_dim) int8 and scale (blocks, kv_heads, block_size) float16."""

    dtype = torch.int8

    def __init__(self, data: torch.Tensor, scale: torch.Tensor):
        self.data, self.scale = data, scale

    @property
    def shape(self):
        return self.data.shape

    @property
    def device(self):
        return self.data.device

    def __setitem__(self, index, rows: torch.Tensor) -> None:
        """Store rows (..., head_dim) at index (as for a tensor of the cache's shape), quantized."""
        q, s = quantize(rows)
        self.data[index] = q
        self.scale[index] = s

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        """Whole blocks (dim 0), dequantized to float32."""
        assert dim == 0
        return self.data.index_select(0, index).float() * self.scale.index_select(0, index).float()[..., None]


def quantize(rows: torch.Tensor):
    """rows (..., head_dim) -> (int8 codes, float16 scales (...)); a zero row gets scale 0 and codes 0."""
    x = rows.float()
    scale = (x.abs().amax(-1) / LEVELS).half()
    s = scale.float()
    q = torch.where(s[..., None] > 0, torch.round(x / torch.where(s > 0, s, 1)[..., None]), 0)
    return q.clamp_(-LEVELS, LEVELS).to(torch.int8), scale
