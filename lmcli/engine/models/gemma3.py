"""Gemma 3 (text). Llama's attention, projections, tensor parallelism and head, with Gemma's own parts: norms that
scale by 1 + weight (layers/norm.py), four a layer (before and after the attention and the MLP), a norm over each
head's query and key, GeGLU (gelu, tanh approximation), the embedding scaled by sqrt(hidden), the attention scale
query_pre_attn_scalar ** -0.5, and sliding-window layers (their own rope theta) between full-attention ones (the
global theta and the rope scaling). Parameter names are the workspace's."""

import torch
from torch import nn

from lmcli import kernels
from lmcli.engine.layers.attention import Attention
from lmcli.engine.layers.embedding import VocabParallelEmbedding
from lmcli.engine.layers.norm import GemmaRMSNorm
from lmcli.engine.layers.parallel import TP
from lmcli.engine.layers.rotary import Rotary
from lmcli.engine.models.llama import MLP, LlamaForCausalLM
from lmcli.errors import UserError
from lmcli.workspace import ModelConfig


class GeGLU(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.gelu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, i: int, tp: TP):
        super().__init__()
        self.sliding = c.layer_types[i] == "sliding_attention"  # also picks the rope tables
        self.input_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.qkv_bias, tp,
                                   c.rms_norm_eps, c.window(i), GemmaRMSNorm,
                                   (c.query_pre_attn_scalar or c.head_dim) ** -0.5)
        self.post_attention_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = GeGLU(c.hidden_size, c.intermediate_size, tp)
        self.post_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)

    def native_parts(self):
        """What kernels.gemma_decode_table takes of this layer (norms, weights, caches, eps, scale, heads; its KV
        group, window and rotary table), or None."""
        a, mlp = self.self_attn, self.mlp
        norms = (self.input_layernorm, self.post_attention_layernorm, self.pre_feedforward_layernorm,
                 self.post_feedforward_layernorm, a.q_norm, a.k_norm)
        if a.qkv_proj.bias is not None or a.o_proj.tp.size > 1 or len({n.eps for n in norms}) != 1:
            return None
        weights = tuple(p.packed for p in (a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj))
        parts = (tuple(n.weight for n in norms), weights, a.k_cache, a.v_cache, norms[0].eps, a.scale, a.num_heads,
                 a.num_kv_heads, a.head_dim)
        return parts, [a.group, a.window or 0, int(self.sliding)]

    def forward(self, x, cos, sin, batch):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, batch))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(nn.Module):
    def __init__(self, c: ModelConfig, tp: TP, max_positions: int, dtype):
        super().__init__()
        if c.layer_types is None:
            raise UserError("this Gemma 3 workspace lacks layer_types; convert the model again")
        self.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.hidden_size, tp)
        # sqrt(hidden) in the weights' dtype first, as transformers scales (25.25 for 640 in bfloat16)
        self.embed_scale = torch.tensor(c.hidden_size ** 0.5, dtype=torch.float32).to(dtype).item()
        self.layers = nn.ModuleList(DecoderLayer(c, i, tp) for i in range(c.num_layers))
        self.norm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary = Rotary(c.head_dim, max_positions, c.rope_theta, c.rope_scaling, dtype)
        self.local_rotary = Rotary(c.head_dim, max_positions, c.rope_local_theta or c.rope_theta, None, dtype)
        self.table = None  # the layers' addresses for one native call, False where it cannot apply

    def forward(self, input_ids, positions, batch):
        x = self.embed_tokens(input_ids) * self.embed_scale
        tables = {False: self.rotary(positions), True: self.local_rotary(positions)}
        done = self.all_layers(x, [tables[False], tables[True]], batch)
        if done is not None:
            return self.norm(done)
        for layer in self.layers:
            x = layer(x, *tables[layer.sliding], batch)
        return self.norm(x)

    def all_layers(self, x, rope, batch):
        """Every layer of a batch of decodes in one native call (kernels.gemma_decode_layers), where the layers'
        weights are 4-bit or 8-bit: their Python between the kernels cost as much as the kernels at one row. The
        addresses are taken at the first step (the KV cache is attached after the model is built)."""
        if self.table is None:
            parts = [layer.native_parts() for layer in self.layers]
            self.table = None not in parts and kernels.gemma_decode_table(*map(list, zip(*parts))) or False
        if not self.table:
            return None
        return kernels.gemma_decode_layers(x, self.table, rope, batch)


class Gemma3ForCausalLM(LlamaForCausalLM):
    base_model, activation = Gemma3Model, "gelu_pytorch_tanh"  # the LM head: the embedding's, unscaled
