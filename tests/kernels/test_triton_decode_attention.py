"""The Triton paged decode attention against the PyTorch reference (the Triton interpreter without a GPU)."""

import types

import pytest
import torch

from triton_case import DEVICE, DTYPE, TOL, compile_for_gpus  # first: it sets the Triton interpreter up
from lmcli.kernels import reference
from lmcli.kernels.triton.decode_attention import decode_attention, default_splits


def make_case(lens, heads, kv_heads, head_dim, block_size, table_dtype=torch.int64, seed=0, window=None):
    """Caches whose blocks are handed out shuffled (block 0, the tables' padding, is never handed out); every
    slot outside a context holds NaN, so a kernel that reads one fails. Returns (inputs, the float32 oracle)."""
    gen = torch.Generator().manual_seed(seed)
    counts = [-(-n // block_size) for n in lens]
    num_blocks = sum(counts) + 3
    ids = torch.randperm(num_blocks - 1, generator=gen) + 1
    tables = torch.zeros(len(lens), max(counts) + 1, dtype=torch.int64)
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    taken = 0
    for i, (n, count) in enumerate(zip(lens, counts)):
        tables[i, :count] = ids[taken:taken + count]
        taken += count
        used.view(-1)[(tables[i, :count, None] * block_size + torch.arange(block_size)).flatten()[:n]] = True
    shape = (num_blocks, kv_heads, block_size, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    q = torch.randn(len(lens), heads, head_dim, generator=gen)
    context_lens = torch.tensor(lens, dtype=torch.int64)
    unused = ~used[:, None, :, None]
    batch = types.SimpleNamespace(decode_block_tables=tables, decode_lens=context_lens)
    scale = head_dim ** -0.5
    want = reference.decode_attention(q.to(DTYPE).float(), k_cache.masked_fill(unused, 0).to(DTYPE).float(),
                                      v_cache.masked_fill(unused, 0).to(DTYPE).float(), batch, scale, window)
    inputs = dict(q=q.to(DEVICE, DTYPE), k_cache=k_cache.masked_fill(unused, float("nan")).to(DEVICE, DTYPE),
                  v_cache=v_cache.masked_fill(unused, float("nan")).to(DEVICE, DTYPE),
                  block_tables=tables.to(DEVICE, table_dtype), context_lens=context_lens.to(DEVICE), scale=scale)
    return inputs, want


MIXED = torch.randint(1, 201, (64,), generator=torch.Generator().manual_seed(1)).tolist()

CASES = {  # lens, heads, kv_heads, head_dim, block_size, table dtype, num_splits
    "context1": ([1], 8, 8, 64, 16, torch.int64, 1),
    "context1-empty-splits": ([1, 2], 4, 4, 64, 16, torch.int32, 4),
    "boundaries16-gqa3": ([15, 16, 17, 1], 6, 2, 128, 16, torch.int32, 2),
    "boundaries64-gqa8": ([63, 64, 65], 8, 1, 64, 64, torch.int64, 3),
    "long-gqa8": ([4096], 8, 1, 128, 64, torch.int64, 8),
    "long-default-splits": ([4100], 4, 2, 64, 16, torch.int32, None),
    "batch64-gqa3": (MIXED, 3, 1, 64, 16, torch.int32, 1),
    "batch64-gqa8-split": (MIXED, 8, 1, 128, 64, torch.int64, 4),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_reference(name):
    lens, heads, kv_heads, head_dim, block_size, table_dtype, num_splits = CASES[name]
    inputs, want = make_case(lens, heads, kv_heads, head_dim, block_size, table_dtype)
    got = decode_attention(**inputs, num_splits=num_splits)
    assert got.dtype == DTYPE and got.shape == want.shape
    torch.testing.assert_close(got.float().cpu(), want, **TOL)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_a_sliding_window_sees_the_last_keys_only(num_splits):
    """Contexts shorter and longer than the window, its start inside a block and on a block's edge."""
    lens = [5, 20, 40, 33, 100, 36]
    inputs, want = make_case(lens, 6, 3, 64, 16, window=20)
    got = decode_attention(**inputs, num_splits=num_splits, window=20)
    torch.testing.assert_close(got.float().cpu(), want, **TOL)
    whole, _ = make_case(lens, 6, 3, 64, 16)
    assert not torch.allclose(decode_attention(**whole, num_splits=num_splits).float().cpu(), want, **TOL)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_strided_q_and_out(num_splits):
    """q as the query part of a fused qkv row and out as a slice of a wider buffer: both written through strides."""
    inputs, want = make_case([5, 40, 33], 6, 3, 64, 16)
    seqs, heads, head_dim = inputs["q"].shape
    qkv = torch.full((seqs, heads + 6, head_dim), float("nan"), dtype=DTYPE, device=DEVICE)
    qkv[:, :heads] = inputs["q"]
    inputs["q"] = qkv[:, :heads]
    buffer = torch.zeros((seqs, heads + 2, head_dim), dtype=DTYPE, device=DEVICE)
    out = buffer[:, 1:heads + 1]
    assert decode_attention(**inputs, out=out, num_splits=num_splits) is out
    torch.testing.assert_close(out.float().cpu(), want, **TOL)
    assert not buffer[:, 0].any() and not buffer[:, -1].any()


def test_default_splits():
    assert default_splits(1, 8, 4096) == 16  # few programs, long context: 256-token splits
    assert default_splits(1, 1, 1 << 20) == 64  # capped
    assert default_splits(64, 8, 4096) == 1  # 512 programs already fill the GPU
    assert default_splits(4, 8, 200) == 1  # too short to split


def _errors():
    """(what to change, the text the ValueError must contain)"""
    return [
        (lambda a: a.update(k_cache=a["k_cache"].to(torch.float16)), "k_cache"),
        (lambda a: a.update(q=a["q"].to(torch.int32)), "q"),
        (lambda a: a.update(block_tables=a["block_tables"].float()), "block_tables"),
        (lambda a: a.update(context_lens=a["context_lens"][:1]), "context_lens"),
        (lambda a: a.update(q=a["q"][..., :32].contiguous()), "head_dim"),
        (lambda a: a.update(q=a["q"][:, :3]), "multiple"),
        (lambda a: a.update(v_cache=a["v_cache"][:1]), "v_cache"),
        (lambda a: a.update(k_cache=a["k_cache"][:, :, :8].contiguous(), v_cache=a["v_cache"][:, :, :8].contiguous()),
         "block_size"),
        (lambda a: a.update(out=torch.empty_like(a["q"], dtype=torch.float16)), "out"),
        (lambda a: a.update(num_splits=0), "num_splits"),
    ]


@pytest.mark.parametrize("index", range(len(_errors())))
def test_launcher_errors(index):
    change, needle = _errors()[index]
    inputs, _ = make_case([3, 20], 4, 2, 64, 16)
    change(inputs)
    with pytest.raises(ValueError, match=needle):
        decode_attention(**inputs)


AOT = """
import torch
from lmcli.kernels.triton.decode_attention import decode_reduce_kernel, decode_split_kernel, reduce_meta, split_meta

def split_args(dtype, table, part):
    pointers = {"q_ptr": dtype, "k_ptr": dtype, "v_ptr": dtype, "tables_ptr": table, "lens_ptr": "*i64",
                "part_ptr": part, "lse_ptr": part, "scale": "fp32", "num_splits": "i32", "window": "i32"}
    return {**pointers, **dict.fromkeys(["stride_qs", "stride_qh", "stride_ts", "stride_kb", "stride_kh", "stride_kt",
                                         "stride_ps", "stride_ph", "stride_pp", "stride_ls", "stride_lh"], "i32")}

reduce_args = {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16", "num_splits": "i32", **dict.fromkeys(
    ["stride_ps", "stride_ph", "stride_pp", "stride_ls", "stride_lh", "stride_os", "stride_oh"], "i32")}
for group, head_dim, block_size, splits, table in [(8, 128, 64, 1, "*i64"), (8, 128, 64, 8, "*i32"),
                                                   (3, 256, 128, 1, "*i32")]:
    compile_both(decode_split_kernel, split_args("*bf16", table, "*bf16" if splits == 1 else "*fp32"),
                 split_meta(group, head_dim, block_size, torch.bfloat16), num_warps=4)
compile_both(decode_reduce_kernel, reduce_args, reduce_meta(8, 128), num_warps=4)
compile_both(decode_split_kernel, split_args("*fp32", "*i64", "*fp32"), split_meta(1, 64, 16, torch.float32),
             num_warps=4)
print("ok")
"""


def test_compiles_for_hopper_and_ampere():
    """Both kernels, with the launcher's constexprs, compile to sm_90 and sm_80 code (no GPU needed)."""
    assert compile_for_gpus(AOT).strip() == "ok"
