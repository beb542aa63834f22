"""Attention backends: one per device, chosen once when the engine starts. Each stores K/V (rotary fused in) and runs
paged attention for a step's Batch, and derives what its kernels need from the batch in prepare(), once per step
rather than once per layer. The model and layer files are the same on every device."""

import torch

from lmcli import kernels


class NativeBackend:
    """The CPU's: the C kernels where they apply (kernels.rotary_store, kernels.paged_attention), PyTorch elsewhere.
    They read the batch's block tables and lengths as they are."""

    name = "native"

    def prepare(self, batch) -> None:
        pass

    def rotary_store(self, qkv, heads, kv_heads, cos, sin, k_cache, v_cache, batch):
        return kernels.rotary_store(qkv, heads, kv_heads, cos, sin, k_cache, v_cache, batch.slot_mapping)

    def attention(self, q, k, v, k_cache, v_cache, batch, scale: float, window=None) -> torch.Tensor:
        return kernels.paged_attention(q, k, v, k_cache, v_cache, batch, scale, window)


class TritonBackend:
    """GPUs' (and the interpreter's): the decodes through the split-KV decode kernel, the chunks of several tokens
    through the extend kernel over the paged cache, both in one launch each for the whole batch."""

    name = "triton"

    def __init__(self):
        self._decode = kernels.triton_kernel("decode_attention").decode_attention
        self._extend = kernels.triton_kernel("extend_attention").extend_attention
        self._store = kernels.triton_kernel("rotary_store").rotary_store

    def prepare(self, batch) -> None:
        nd = batch.num_decode
        if len(batch.prefills):
            batch.meta["extend_cu"] = batch.cu_seqlens_q[nd:] - nd

    def rotary_store(self, qkv, heads, kv_heads, cos, sin, k_cache, v_cache, batch):
        return self._store(qkv, heads, kv_heads, cos, sin, k_cache, v_cache, batch.slot_mapping)

    def attention(self, q, k, v, k_cache, v_cache, batch, scale: float, window=None) -> torch.Tensor:
        out = torch.empty_like(q)
        nd = batch.num_decode
        if nd:
            self._decode(q[:nd], k_cache, v_cache, batch.decode_block_tables, batch.decode_lens, scale, out=out[:nd],
                         window=window)
        if batch.prefills:
            self._extend(q[nd:], k_cache, v_cache, batch.block_tables[nd:], batch.meta["extend_cu"],
                         batch.context_lens[nd:], batch.max_seqlen_q, scale, out=out[nd:], window=window)
        return out


def choose(device: torch.device, head_dim: int, block_size: int):
    """Triton on GPUs (or where LMCLI_KERNELS=triton asks for it) for the shapes its kernels take: head_dim a power
    of two from 16 to 256 and blocks of at least 16 tokens; else the PyTorch path (slower, any shape)."""
    fits = head_dim in (16, 32, 64, 128, 256) and block_size >= 16
    return TritonBackend() if kernels.triton_selected(device) and fits else NativeBackend()
