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

    def attention(self, q, k, v, k_cache, v_cache, batch, scale: float) -> torch.Tensor:
        return kernels.paged_attention(q, k, v, k_cache, v_cache, batch, scale)


def choose(device: torch.device):
    return NativeBackend()
