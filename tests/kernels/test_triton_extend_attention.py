"""The Triton extend (prefill) attention kernel against the PyTorch reference, on a mixed batch of chunks read
through shuffled block tables. Without a GPU it runs under the Triton interpreter, in float32."""

from types import SimpleNamespace

import pytest
import torch

from triton_case import DEVICE, DTYPE, TOL, compile_for_gpus  # first: it sets the Triton interpreter up
from lmcli.kernels import reference
from lmcli.kernels.triton.extend_attention import extend_attention, launch_config


def make_case(lengths, contexts, kv_heads, group, head_dim, block_size, seed=0, table_dtype=torch.int64,
              cu_dtype=torch.int32):
    """Queries and a paged cache holding every sequence's whole context, on shuffled blocks. Block 0 (the tables'
    padding), the spare blocks and the slots past each context hold NaN: a read outside the context shows."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-c // block_size) for c in contexts]
    num_blocks = sum(need) + 3
    ids = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    shape = (num_blocks, kv_heads, block_size, head_dim)
    k_cache, v_cache = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    tables = torch.zeros(len(lengths), max(need) + 1, dtype=torch.int64)
    for i, context in enumerate(contexts):
        tables[i, :need[i]] = torch.tensor(ids[:need[i]])
        ids = ids[need[i]:]
        pos = torch.arange(context)
        slots = tables[i, pos // block_size] * block_size + pos % block_size
        k, v = (torch.randn(context, kv_heads, head_dim, generator=g) for _ in range(2))
        reference.store_kv(k, v, k_cache, v_cache, slots, block_size)
    q = torch.randn(sum(lengths), kv_heads * group, head_dim, generator=g) * 2
    cu = torch.tensor([0] + lengths).cumsum(0)
    to = dict(device=DEVICE)
    return SimpleNamespace(q=q.to(DEVICE, DTYPE), k_cache=k_cache.to(DEVICE, DTYPE), v_cache=v_cache.to(DEVICE, DTYPE),
                           tables=tables.to(table_dtype).to(**to), cu=cu.to(cu_dtype).to(**to),
                           contexts=torch.tensor(contexts).to(**to), lengths=lengths, scale=head_dim ** -0.5)


def oracle(c, window=None):
    """reference.paged_attention in float32, its new tokens' k, v gathered back from the cache."""
    q, k_cache, v_cache = c.q.float(), c.k_cache.float(), c.v_cache.float()
    prefills, ks, vs = [], [], []
    for i, (start, length) in enumerate(zip(c.cu.tolist(), c.lengths)):
        context, table = int(c.contexts[i]), c.tables[i].long()
        prefills.append((start, length, context, table))
        for cache, new in ((k_cache, ks), (v_cache, vs)):
            new.append(reference.gather_context(cache, table, context)[:, context - length:].transpose(0, 1))
    batch = SimpleNamespace(num_decode=0, prefills=prefills)
    return reference.paged_attention(q, torch.cat(ks), torch.cat(vs), k_cache, v_cache, batch, c.scale,
                                     window=window)


def run(c, **kwargs):
    return extend_attention(c.q, c.k_cache, c.v_cache, c.tables, c.cu, c.contexts, max(c.lengths), c.scale, **kwargs)


def check(c, **kwargs):
    out = run(c, **kwargs)
    assert out.dtype == c.q.dtype and out.shape == c.q.shape
    torch.testing.assert_close(out.float(), oracle(c, kwargs.get("window")), **TOL)
    return out


@pytest.mark.parametrize("head_dim,block_size,kv_heads,group", [(64, 16, 2, 1), (128, 64, 1, 3)])
def test_single_prompt_without_a_cached_prefix(head_dim, block_size, kv_heads, group):
    check(make_case([100], [100], kv_heads, group, head_dim, block_size))


@pytest.mark.parametrize("head_dim,block_size,group", [(128, 64, 3), (64, 16, 8)])
def test_chunk_after_a_cached_prefix(head_dim, block_size, group):
    check(make_case([40], [1100], 1, group, head_dim, block_size, table_dtype=torch.int32))


@pytest.mark.parametrize("head_dim,block_size,kv_heads,group,table_dtype,cu_dtype", [
    (64, 16, 1, 8, torch.int64, torch.int32),
    (128, 64, 2, 3, torch.int32, torch.int64),
    (64, 64, 2, 1, torch.int32, torch.int32),
    (128, 16, 1, 1, torch.int64, torch.int64),
])
def test_mixed_batch_straddling_block_boundaries(head_dim, block_size, kv_heads, group, table_dtype, cu_dtype):
    """Chunks one under, at and over BLOCK_M, BLOCK_N and block_size, after prefixes ending on either side of a
    boundary, with decodes (length 1) among them: the first one a whole prompt of one token."""
    block_m, block_n, _, _ = launch_config(head_dim)
    lengths = [1, block_m - 1, block_m, block_m + 1, 1, block_n + 1, 2 * block_m + 3, 1, 5]
    prefixes = [0, 1, block_n, block_size - 1, 2 * block_size, 0, block_n - 1, block_size, 3 * block_size + 1]
    contexts = [n + p for n, p in zip(lengths, prefixes)]
    check(make_case(lengths, contexts, kv_heads, group, head_dim, block_size, seed=head_dim + block_size,
                    table_dtype=table_dtype, cu_dtype=cu_dtype))


@pytest.mark.parametrize("head_dim,block_size,group,window", [(64, 16, 2, 37), (128, 64, 3, 64), (64, 16, 1, 1)])
def test_a_sliding_window_sees_each_querys_last_keys_only(head_dim, block_size, group, window):
    """Prompts and chunks shorter and longer than the window, after prefixes, with decodes among them; window 1:
    each query sees only itself."""
    block_m, _, _, _ = launch_config(head_dim)
    lengths = [1, 20, block_m + 5, 2 * block_m + 3, 1, 9]
    prefixes = [0, 0, 0, 30, 200, 100]
    c = make_case(lengths, [n + p for n, p in zip(lengths, prefixes)], 2, group, head_dim, block_size, seed=window)
    check(c, window=window)
    assert not torch.allclose(run(c).float(), oracle(c, window), **TOL)


def test_batch_of_64_short_sequences():
    g = torch.Generator().manual_seed(7)
    lengths = [1 if i % 3 else int(torch.randint(2, 30, (), generator=g)) for i in range(64)]
    contexts = [n + int(torch.randint(0, 90, (), generator=g)) for n in lengths]
    check(make_case(lengths, contexts, 2, 3, 64, 16, seed=3))


def test_long_prompt():
    check(make_case([2500], [2500], 1, 1, 64, 64, seed=11))


def test_long_chunk_after_a_long_prefix():
    check(make_case([300], [3300], 1, 1, 128, 64, seed=12))


def test_strided_q_and_given_out():
    """q a view into a fused projection (a token stride larger than heads * head_dim), out given with a head stride
larger than head_dim: written in place."""
    c = make_case([70, 1, 9], [70, 33, 140], 2, 2, 64, 16, seed=5)
    fused = torch.cat([c.q, torch.zeros_like(c.q)], dim=1)
    c.q = fused[:, :c.q.shape[1]]
    out = torch.full_like(fused, 7.0)[:, ::2]  # every other head
    assert check(c, out=out).data_ptr() == out.data_ptr()


def test_nothing_to_do():
    c = make_case([3], [3], 1, 1, 64, 16)
    empty = c.q[:0]
    out = extend_attention(empty, c.k_cache, c.v_cache, c.tables, c.cu.new_zeros(2), c.contexts, 0, c.scale)
    assert out.shape == (0, 1, 64)


def test_launcher_rejects_bad_arguments():
    c = make_case([4, 1], [4, 20], 2, 2, 64, 16)
    args = dict(q=c.q, k_cache=c.k_cache, v_cache=c.v_cache, block_tables=c.tables, cu_seqlens_q=c.cu,
                context_lens=c.contexts, max_seqlen_q=4, scale=c.scale)
    bad = {
        "q": [c.q[0], c.q.to(torch.int32), c.q[..., :48], c.q.transpose(1, 2), c.q.repeat(1, 2, 1)[:, :3]],
        "k_cache": [c.k_cache[0], c.k_cache.transpose(2, 3), c.k_cache.to(torch.float16), c.k_cache[..., :15, :]],
        "v_cache": [c.v_cache[:-1]],
        "block_tables": [c.tables[0], c.tables.float(), c.tables[:1], c.tables.t().contiguous().t()],
        "cu_seqlens_q": [c.cu[:2], c.cu.float()],
        "context_lens": [c.contexts[:1], c.contexts.to(torch.int16)],
        "max_seqlen_q": [-1, 4.0, torch.tensor(4), True],
        "out": [torch.empty(1), c.q.new_empty(c.q.shape, dtype=torch.float16)],
    }
    for name, values in bad.items():
        for value in values:
            with pytest.raises(ValueError, match=name):
                extend_attention(**{**args, name: value})
    with pytest.raises(ValueError, match="head_dim"):
        extend_attention(**{**args, "q": c.q[..., :8], "k_cache": c.k_cache[..., :8].contiguous(),
                            "v_cache": c.v_cache[..., :8].contiguous()})


AOT = """
from lmcli.kernels.triton import extend_attention as m
signature = {"q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "out_ptr": "*bf16",
             "block_tables_ptr": "*i64", "cu_seqlens_ptr": "*i32", "context_lens_ptr": "*i64", "qk_scale": "fp32",
             "window": "i32", "stride_qt": "i32", "stride_qh": "i32", "stride_ot": "i32", "stride_oh": "i32", "stride_table": "i32",
             "stride_cache_block": "i32", "stride_cache_head": "i32", "group": "i32"}
limits = {90: 232448, 80: 166912}
for head_dim in (64, 128, 256):
    block_m, block_n, num_warps, num_stages = m.launch_config(head_dim)
    constexprs = {"BLOCK_SIZE": 64, "HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n}
    kernels = compile_both(m.extend_attention_kernel, signature, constexprs, num_warps=num_warps,
                           num_stages=num_stages)
    for arch, kernel in kernels.items():
        shared = kernel.metadata.shared
        print(f"head_dim {head_dim} sm_{arch}: {len(kernel.asm['cubin'])} bytes of cubin, {shared} of shared memory")
        assert shared <= limits[arch], (head_dim, arch, shared)
"""


def test_compiles_for_hopper_and_ampere():
    compile_for_gpus(AOT)
