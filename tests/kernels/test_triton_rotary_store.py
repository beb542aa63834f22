"""The Triton rotary + KV store kernel against reference.rotary and reference.store_kv: under the Triton interpreter
in float32 here, on the GPU in bfloat16 with LMCLI_TEST_DEVICE=cuda."""

import re

import pytest
import torch

from triton_case import DEVICE, DTYPE, TOL, compile_for_gpus  # first: it sets the Triton interpreter up
from lmcli.kernels import reference
from lmcli.kernels.triton.rotary_store import rotary_store


def cos_sin(positions: torch.Tensor, dim: int):
    """Llama's rotary tables (Hugging Face layout: the frequencies twice) at these positions, in DTYPE."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = positions.float()[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(DEVICE, DTYPE), angles.sin().to(DEVICE, DTYPE)


@pytest.mark.parametrize("heads, kv_heads, dim, block_size, slot_dtype", [
    (4, 4, 64, 16, torch.int64),  # no GQA
    (6, 2, 128, 64, torch.int64),  # 3 query heads a kv head
    (8, 1, 64, 64, torch.int32),  # 8, with int32 slots
    (9, 3, 128, 16, torch.int64),  # SmolLM2's heads at head_dim 128
])
def test_rotary_store_matches_reference(heads, kv_heads, dim, block_size, slot_dtype):
    torch.manual_seed(0)
    tokens, blocks = 9, 5
    qkv = torch.randn(tokens, heads + 2 * kv_heads, dim).to(DEVICE, DTYPE)
    cos, sin = cos_sin(torch.randint(0, 4096, (tokens,)), dim)
    k_cache = torch.randn(blocks, kv_heads, block_size, dim).to(DEVICE, DTYPE)
    v_cache = torch.randn_like(k_cache)
    # slots spread over every block, first and last offsets of a block included; token 4 is padding
    slots = torch.tensor([0, block_size - 1, block_size, 3 * block_size + 5, -1, 2 * block_size + 1,
                          blocks * block_size - 1, 4 * block_size, block_size + 7])
    slot_mapping = slots.to(DEVICE, slot_dtype)

    want_qk = reference.rotary(qkv[:, :heads + kv_heads].float(), cos.float(), sin.float()).to(DTYPE)
    want_v = qkv[:, heads + kv_heads:].clone()
    want_k_cache, want_v_cache = k_cache.clone(), v_cache.clone()
    stored = (slots >= 0).to(DEVICE)
    reference.store_kv(want_qk[stored, heads:], want_v[stored], want_k_cache, want_v_cache,
                       slot_mapping[stored].long(), block_size)
    untouched = torch.ones(blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False

    q, k, v = rotary_store(qkv, heads, kv_heads, cos, sin, k_cache, v_cache, slot_mapping)

    assert q.data_ptr() == qkv.data_ptr() and k.shape == (tokens, kv_heads, dim) and v.shape == want_v.shape
    torch.testing.assert_close(qkv[:, :heads + kv_heads], want_qk, **TOL)  # rotated in place
    assert torch.equal(v, want_v)
    torch.testing.assert_close(k_cache, want_k_cache, **TOL)
    torch.testing.assert_close(v_cache, want_v_cache, **TOL)
    by_slot = [c.transpose(1, 2).reshape(blocks * block_size, kv_heads, dim)[untouched.to(DEVICE)]
               for c in (k_cache, v_cache, want_k_cache, want_v_cache)]
    assert torch.equal(by_slot[0], by_slot[2]) and torch.equal(by_slot[1], by_slot[3])  # padding stored nothing


def test_rotary_store_one_token():
    torch.manual_seed(1)
    qkv = torch.randn(1, 3 * 2, 64).to(DEVICE, DTYPE)  # heads 2, kv_heads 2
    cos, sin = cos_sin(torch.tensor([4000]), 64)
    k_cache = torch.zeros(2, 2, 16, 64, device=DEVICE, dtype=DTYPE)
    v_cache = torch.zeros_like(k_cache)
    want = reference.rotary(qkv[:, :4].float(), cos.float(), sin.float()).to(DTYPE)
    v_row = qkv[0, 4:].clone()
    rotary_store(qkv, 2, 2, cos, sin, k_cache, v_cache, torch.tensor([17], device=DEVICE))
    torch.testing.assert_close(qkv[:, :4], want, **TOL)
    torch.testing.assert_close(k_cache[1, :, 1], want[0, 2:], **TOL)
    assert torch.equal(v_cache[1, :, 1], v_row) and k_cache[0].abs().sum() == 0


@pytest.mark.parametrize("change, needle", [
    (dict(heads=5), "qkv: expected 5 + 2 * 2 heads"),
    (dict(cos=torch.zeros(3, 64)), "cos: expected (4, 64)"),
    (dict(k_cache=torch.zeros(2, 2, 16, 64, dtype=torch.float16)), "k_cache: expected a contiguous"),
    (dict(v_cache=torch.zeros(2, 2, 12, 64)), "v_cache: expected"),
    (dict(slot_mapping=torch.zeros(4)), "slot_mapping: expected (4,) int64 or int32"),
])
def test_rotary_store_rejects_bad_arguments(change, needle):
    args = dict(qkv=torch.zeros(4, 8, 64), heads=4, kv_heads=2, cos=torch.zeros(4, 64), sin=torch.zeros(4, 64),
                k_cache=torch.zeros(2, 2, 16, 64), v_cache=torch.zeros(2, 2, 16, 64),
                slot_mapping=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=re.escape(needle)):
        rotary_store(**{**args, **change})


AOT = """
from lmcli.kernels.triton import rotary_store as m
signature = {"qkv": "*bf16", "cos": "*bf16", "sin": "*bf16", "k_cache": "*bf16", "v_cache": "*bf16",
             "slots": "*i64", "heads": "i32", "kv_heads": "i32", "block_size": "i32", "qkv_stride": "i32",
             "cos_stride": "i32", "sin_stride": "i32", "slot_stride": "i32"}
for half in (32, 64):
    compile_both(m.rotary_store_kernel, signature, {"HALF": half}, num_warps=m.NUM_WARPS)
"""


def test_rotary_store_compiles_for_hopper_and_ampere():
    compile_for_gpus(AOT)
