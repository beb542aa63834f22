"""Self-attention over the paged KV cache, for this rank's heads."""

from typing import Optional

import torch
from torch import nn

from lmcli.engine.layers.linear import FusedColumnLinear, RowParallelLinear
from lmcli.engine.layers.norm import RMSNorm
from lmcli.engine.layers.parallel import TP, head_shard


class Attention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool, tp: TP,
                 qk_norm_eps: Optional[float] = None, window: Optional[int] = None, norm=RMSNorm,
                 scale: Optional[float] = None):
        """qk_norm_eps: a norm over each head's query and key, before rotary (Qwen3, Gemma 3), with this epsilon;
        norm: its class, norm(head_dim, eps). window: sliding-window attention, each token seeing the last `window`
        tokens (itself included). scale: of the scores, default head_dim ** -0.5."""
        super().__init__()
        self.window = window
        (q0, q1), (k0, k1) = head_shard(num_heads, num_kv_heads, tp)
        self.num_heads, self.num_kv_heads, self.head_dim = q1 - q0, k1 - k0, head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        d = head_dim
        self.qkv_proj = FusedColumnLinear(
            hidden, [num_heads * d, num_kv_heads * d, num_kv_heads * d],
            [(q0 * d, q1 * d), (k0 * d, k1 * d), (k0 * d, k1 * d)], bias=bias)
        self.o_proj = RowParallelLinear(num_heads * d, hidden, tp, [(q0 * d, q1 * d)])
        self.q_norm = self.k_norm = None
        if qk_norm_eps is not None:
            self.q_norm, self.k_norm = norm(head_dim, qk_norm_eps), norm(head_dim, qk_norm_eps)
        self.k_cache = self.v_cache = None  # (num_blocks, kv_heads, block_size, head_dim), set by the runner
        self.group = 0  # the KV group whose block tables this layer reads (ModelConfig.kv_groups), set with them

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch) -> torch.Tensor:
        h, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(-1, h + 2 * hk, d)
        if self.q_norm is not None:
            q, k, v = qkv.split([h, hk, hk], dim=1)
            q, k = self.q_norm(q.reshape(-1, d)).view(-1, h, d), self.k_norm(k.reshape(-1, d)).view(-1, hk, d)
            qkv = torch.cat([q, k, v], dim=1)
        batch = batch.group(self.group)
        ops = batch.backend
        q, k, v = ops.rotary_store(qkv, h, hk, cos, sin, self.k_cache, self.v_cache, batch)
        o = ops.attention(q, k, v, self.k_cache, self.v_cache, batch, self.scale, self.window)
        return self.o_proj(o.flatten(1))
