"""The Llama family (Llama 2/3, SmolLM2, Mistral), Qwen2 and Qwen3. Parameter names are the workspace's."""

import torch
from torch import nn

from lmcli import kernels
from lmcli.engine.layers.attention import Attention
from lmcli.engine.layers.embedding import VocabParallelEmbedding
from lmcli.engine.layers.linear import RowParallelLinear, gate_up
from lmcli.engine.layers.norm import RMSNorm
from lmcli.engine.layers.parallel import TP, shard
from lmcli.engine.layers.rotary import Rotary
from lmcli.errors import UserError
from lmcli.workspace import ModelConfig


def slides(window, batch) -> bool:
    """A sliding window that some sequence of the batch has outgrown: the one-call kernels see whole contexts."""
    return window is not None and batch.max_context > window


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, tp: TP):
        super().__init__()
        self.gate_up_proj = gate_up(hidden, intermediate, tp)
        self.down_proj = RowParallelLinear(intermediate, hidden, tp, [shard(intermediate, tp.size, tp.rank)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, i: int, tp: TP):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.qkv_bias, tp,
                                   c.rms_norm_eps if c.qk_norm else None, c.window(i))
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c.hidden_size, c.intermediate_size, tp)

    def forward(self, x, residual, cos, sin, batch):
        one_call = self.one_call(x, residual, cos, sin, batch)
        if one_call is not None:
            return one_call
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, batch)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def one_call(self, x, residual, cos, sin, batch):
        """The whole layer in one native call for a batch of decodes (kernels.decode_layer), where it applies; a
        one-row step on 4-bit weights spent as long in Python between the kernels as in them."""
        parts = self.native_parts()
        if parts is None or slides(self.self_attn.window, batch):
            return None
        return kernels.decode_layer(x, residual, *parts[:2], cos, sin, batch.group(self.self_attn.group), *parts[2:])

    def native_parts(self):
        """What kernels.decode_layer takes of this layer (norms, weights, caches, eps, scale, heads), or None."""
        a, mlp, n1, n2 = self.self_attn, self.mlp, self.input_layernorm, self.post_attention_layernorm
        qk = (None, None) if a.q_norm is None else (a.q_norm.weight, a.k_norm.weight)
        if a.o_proj.tp.size > 1 or n1.eps != n2.eps or \
                (a.q_norm is not None and not a.q_norm.eps == a.k_norm.eps == n1.eps):
            return None
        weights = tuple(p.packed for p in (a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj))
        return ((n1.weight, n2.weight, *qk, a.qkv_proj.bias), weights, a.k_cache, a.v_cache, n1.eps, a.scale,
                a.num_heads, a.num_kv_heads, a.head_dim)


class LlamaModel(nn.Module):
    def __init__(self, c: ModelConfig, tp: TP, max_positions: int, dtype):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(c, i, tp) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary = Rotary(c.head_dim, max_positions, c.rope_theta, c.rope_scaling, dtype)
        self.table = None  # all_layers: the layers' addresses for one native call, False where it cannot apply
        self.window = c.sliding_window

    def forward(self, input_ids, positions, batch):
        x, residual = self.embed_tokens(input_ids), None
        cos, sin = self.rotary(positions)
        done = self.all_layers(x, cos, sin, batch)
        if done is not None:
            x, residual = done
        else:
            for layer in self.layers:
                x, residual = layer(x, residual, cos, sin, batch)
        return self.norm(x, residual)[0]

    def all_layers(self, x, cos, sin, batch):
        """Every layer of a batch of decodes in one native call (kernels.decode_layers), where each layer's one call
        applies: the Python of 30 layer calls was about 1 ms of a 12 ms step of 16 decodes on 4-bit weights. The
        layers' addresses are taken once, at the first step (the KV cache is attached after the model is built)."""
        if self.table is None:  # one KV group only: the call reads one block table
            self.table = not any(layer.self_attn.group for layer in self.layers) and kernels.decode_layer_table(
                [layer.native_parts() for layer in self.layers]) or False
        if not self.table or slides(self.window, batch):
            return None
        return kernels.decode_layers(x, self.table, cos, sin, batch)


class LlamaForCausalLM(nn.Module):
    base_model, activation = LlamaModel, "silu"  # what a family with Llama's head (Gemma 3) replaces

    def __init__(self, c: ModelConfig, tp: TP, max_positions: int, dtype):
        super().__init__()
        if c.hidden_act != self.activation:
            raise UserError(f"activation {c.hidden_act!r} is not supported")
        self.tie = c.tie_word_embeddings
        self.model = self.base_model(c, tp, max_positions, dtype)
        self.lm_head = self.model.embed_tokens if self.tie else VocabParallelEmbedding(c.vocab_size, c.hidden_size, tp)

    def forward(self, input_ids, positions, batch) -> torch.Tensor:
        """Logits (sampled tokens, vocab) in float32 for the tokens at batch.sample_idx."""
        hidden = self.model(input_ids, positions, batch)[batch.sample_idx]
        return self.lm_head.logits(hidden)
