"""Rotary position embedding: cos/sin tables for every position, with Llama 3's, linear and per-frequency
(llama.cpp's rope_freqs) rope scaling."""

import math
from typing import Optional

import torch
from torch import nn

from lmcli.errors import UserError


def inv_frequencies(head_dim: int, theta: float, scaling: Optional[dict]) -> torch.Tensor:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "freq_factors":  # llama.cpp's rope_freqs tensor: a divisor per frequency (Llama 3.x GGUFs)
        factors = torch.tensor(scaling["factors"], dtype=torch.float32)
        if factors.shape != inv.shape:
            raise UserError(f"rope freq_factors: {factors.numel()} factors for {inv.numel()} frequencies")
        return inv / factors
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        middle = (1 - smooth) * scaled / factor + smooth * scaled
        is_middle = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_middle, middle, scaled)
    raise UserError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3, freq_factors)")


class Rotary(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: Optional[dict], dtype):
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32),
                            inv_frequencies(head_dim, theta, scaling))
        angles = torch.cat((freqs, freqs), dim=-1)  # (positions, head_dim)
        # computed in float32, used in the model's dtype, as transformers does
        self.register_buffer("cos", angles.cos().to(dtype), persistent=False)
        self.register_buffer("sin", angles.sin().to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor):
        return self.cos[positions], self.sin[positions]
