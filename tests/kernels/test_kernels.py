"""Kernels against plain PyTorch written the obvious way."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lmcli import kernels
from lmcli.kernels import native, reference
from lmcli.engine.batch import Batch, build_batch



@pytest.fixture(autouse=True, params=[name for name, _, _ in native.LEVELS])
def isa(request, monkeypatch):
    """Every test here runs once per kernel level this CPU can run (the lower ones forced, as LMCLI_CPU_ISA does);
    a level the CPU lacks is skipped, naming the missing features."""
    name = request.param
    if name not in native.available_levels():
        pytest.skip(f"the {name} kernels: this CPU lacks {', '.join(native.missing_features(name)) or 'x86'}")
    monkeypatch.setattr(native, "level", lambda: name)
    return name


@pytest.fixture
def bf16_products(isa):
    """The chunk attention kernel needs AVX512-BF16 (elsewhere it declines and torch's path runs: tested below)."""
    if isa not in ("amx", "avx512") or "avx512_bf16" not in native._cpu_flags().split():
        pytest.skip(f"the chunk attention kernel needs AVX512-BF16 ({isa} kernels"
                    + ("" if isa not in ("amx", "avx512") else ", this CPU lacks avx512_bf16") + ")")


@pytest.mark.parametrize("m,n,k", [(1, 3072, 576), (3, 10, 576), (4, 7, 100), (2, 576, 1536)])
def test_native_gemv_matches_float32_products(m, n, k):
    assert native.library() is not None, "the C compiler should build the kernel on this machine"
    torch.manual_seed(m * n + k)
    x, w = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    expected = F.linear(x.float(), w.float())
    got = native.gemv_bf16(x, w)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m,n,k", [(9, 10, 576), (13, 7, 100), (64, 576, 1536), (5, 3, 8), (130, 49, 1536),
                                   (4, 1, 3)])
def test_native_gemm_widening_bfloat16_matches_float32_products(isa, m, n, k):
    torch.manual_seed(m + n + k)
    x, w = torch.randn(m, k), torch.randn(n, k, dtype=torch.bfloat16)
    got = native.gemm_f32_bf16(x, w)
    if isa == "portable":
        assert got is None  # declined: the caller widens the weight and calls torch
        return
    assert got.dtype == torch.float32 and got.shape == (m, n)
    torch.testing.assert_close(got, F.linear(x, w.float()), rtol=1e-5, atol=1e-4)


def test_linear_dispatch_and_bias():
    torch.manual_seed(0)
    w, b = torch.randn(64, 96, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
    for rows in (1, 4, 5, kernels.GEMV_MAX_ROWS, kernels.GEMV_MAX_ROWS + 1, 32):  # native up to GEMV_MAX_ROWS
        x = torch.randn(rows, 96, dtype=torch.bfloat16)
        got = kernels.linear(x, w, b)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), F.linear(x.float(), w.float(), b.float()), rtol=2e-2, atol=5e-2)
        assert kernels.linear(x, w, out_dtype=torch.float32).dtype == torch.float32


def test_large_bfloat16_products_run_in_float32_without_native_bfloat16(isa, monkeypatch):
    """More rows than the GEMV takes: torch's bfloat16 GEMM where the CPU has bfloat16 products, else a float32
    product (torch would emulate bfloat16 there): the native kernel widening the weight in registers (AVX2 and up),
    or torch on the widened weight (portable); rounded back to bfloat16."""
    real = reference.linear
    native_bf16 = isa in ("amx", "avx512") and "avx512_bf16" in native._cpu_flags().split()
    assert native.bf16_products() == native_bf16
    torch.manual_seed(3)
    w, b = torch.randn(64, 96, dtype=torch.bfloat16), torch.randn(64).bfloat16()
    for rows in (32, kernels.GEMM_MAX_ROWS + 1):  # beyond GEMM_MAX_ROWS torch on the widened weight
        seen = []
        monkeypatch.setattr(reference, "linear", lambda x, w, *a: seen.append((x.dtype, w.dtype)) or real(x, w, *a))
        x = torch.randn(rows, 96, dtype=torch.bfloat16)
        got = kernels.linear(x, w, b)
        in_kernel = not native_bf16 and isa != "portable" and rows <= kernels.GEMM_MAX_ROWS
        assert seen == ([(torch.bfloat16,) * 2] if native_bf16 else [] if in_kernel else [(torch.float32,) * 2])
        assert got.dtype == torch.bfloat16
        if not native_bf16:  # float32 sums, maybe in another order: at most one bfloat16 step apart
            torch.testing.assert_close(got.float(), F.linear(x.float(), w.float(), b.float()), rtol=8e-3, atol=1e-5)
    assert native.describe().startswith(f"CPU kernels: {isa} ")
    assert ("products of many rows in float32" in native.describe()) != native_bf16


def test_float32_chunk_attention_matches_naive_attention():
    torch.manual_seed(4)
    bs, kv_heads, heads, d, context, length = 16, 2, 6, 64, 40, 9
    k_cache = torch.randn(4, kv_heads, bs, d, dtype=torch.bfloat16)
    v_cache = torch.randn(4, kv_heads, bs, d, dtype=torch.bfloat16)
    table = torch.tensor([2, 0, 3])
    q, out = torch.randn(length, heads, d, dtype=torch.bfloat16), torch.empty(length, heads, d, dtype=torch.bfloat16)
    assert kernels.float32_chunk_attention(q, k_cache, v_cache, table, context, d ** -0.5, out)
    ks = reference.gather_context(k_cache, table, context).transpose(0, 1)
    vs = reference.gather_context(v_cache, table, context).transpose(0, 1)
    expected = naive_attention(q, ks, vs, torch.arange(context - length, context))
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


def test_native_kernels_can_be_turned_off():
    code = "from lmcli.kernels import native; print(native.library())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"LMCLI_NATIVE_KERNELS": "0", "PATH": "/usr/bin:/bin"})
    assert done.stdout.strip() == "None", done.stderr


def test_the_cpu_isa_can_be_forced_and_is_checked(isa):
    """LMCLI_CPU_ISA picks the level (one per .so in the cache); a level the CPU lacks, or a wrong name, is an
    error that names what is wrong."""
    code = "from lmcli.kernels import native; print(native.level(), native.library()._name)"
    run = lambda value: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       env={"LMCLI_CPU_ISA": value, "PATH": "/usr/bin:/bin"})
    done = run(isa)
    assert done.returncode == 0, done.stderr
    name, path = done.stdout.split()
    assert name == isa and f"lmcli-{isa}-" in path
    wrong = run("sse9")
    assert wrong.returncode != 0 and "LMCLI_CPU_ISA=sse9: not a kernel level" in wrong.stderr
    for lacking in (n for n, _, _ in native.LEVELS if n not in native.available_levels()):
        done = run(lacking)
        assert done.returncode != 0 and "this CPU lacks" in done.stderr


def naive_attention(q, ks, vs, positions, window=None):
    """q (t, h, d) of one sequence at the given positions; ks, vs (context, kv_heads, d); window: each position
    sees its last `window` keys only."""
    group = q.shape[1] // ks.shape[1]
    k, v = ks.repeat_interleave(group, 1).float(), vs.repeat_interleave(group, 1).float()
    scores = torch.einsum("thd,lhd->htl", q.float(), k) / q.shape[-1] ** 0.5
    keys = torch.arange(k.shape[0])[None, None, :]
    hidden = keys > positions[None, :, None]
    if window is not None:
        hidden |= keys <= positions[None, :, None] - window
    return torch.einsum("htl,lhd->thd", scores.masked_fill(hidden, float("-inf")).softmax(-1), v)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("impl", [kernels.paged_attention, reference.paged_attention])
@pytest.mark.parametrize("dtype,num_decode", [(torch.float32, 3), (torch.bfloat16, 2), (torch.bfloat16, 9)])
def test_paged_attention_matches_naive_attention(dtype, num_decode, impl, window):
    """window 5: sliding-window attention, which most of these contexts outgrow (the shortest decode's does not)."""
    torch.manual_seed(num_decode)
    bs, kv_heads, heads, d, num_blocks = 4, 2, 6, 8, 64
    k_cache = torch.randn(num_blocks, kv_heads, bs, d, dtype=dtype)
    v_cache = torch.randn(num_blocks, kv_heads, bs, d, dtype=dtype)
    blocks = iter(torch.randperm(num_blocks).tolist())
    # decodes of various context lengths, a prefill chunk after a cached prefix, and a fresh prompt
    items, contexts = [], []
    for i in range(num_decode):
        c = 3 + 2 * i
        items.append(([1], c, [next(blocks) for _ in range(-(-(c + 1) // bs))], True))
    items.append(([1] * 5, 6, [next(blocks) for _ in range(3)], True))
    items.append(([1] * 7, 0, [next(blocks) for _ in range(2)], True))
    batch, _ = build_batch(items, bs)
    t = batch.input_ids.shape[0]
    q = torch.randn(t, heads, d, dtype=dtype)
    k, v = torch.randn(t, kv_heads, d, dtype=dtype), torch.randn(t, kv_heads, d, dtype=dtype)
    reference.store_kv(k, v, k_cache, v_cache, batch.slot_mapping, bs)
    out = impl(q, k, v, k_cache, v_cache, batch, d ** -0.5, window=window)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    start = 0
    order = [i for i, it in enumerate(items) if len(it[0]) == 1] + [i for i, it in enumerate(items) if len(it[0]) > 1]
    for i in order:
        new, c, table, _ = items[i]
        n = len(new)
        flat = torch.tensor(table)
        ks = k_cache[flat].transpose(0, 1).flatten(1, 2)[:, :c + n].transpose(0, 1)
        vs = v_cache[flat].transpose(0, 1).flatten(1, 2)[:, :c + n].transpose(0, 1)
        expected = naive_attention(q[start:start + n], ks, vs, torch.arange(c, c + n), window)
        torch.testing.assert_close(out[start:start + n].float(), expected, **tol)
        start += n


@pytest.mark.parametrize("heads,kv_heads,d,bs", [(9, 3, 64, 64), (8, 1, 128, 16), (12, 1, 32, 32), (4, 2, 48, 8),
                                                 (24, 1, 64, 16), (4, 4, 40, 8), (14, 2, 64, 16)])
@pytest.mark.parametrize("window", [None, 37])
def test_native_decode_attention_matches_naive_attention(heads, kv_heads, d, bs, window):
    """The native kernel's vector paths (AVX-512: head_dim a multiple of 32; AVX2: of 8; up to 8 query heads a kv
    head), its plain loops (other shapes), and its refusal (more than 16 query heads a kv head: None, the caller falls back).
    The queries are a strided view (of a fused qkv, as in the model); the output is bfloat16. window 37: the last
    37 keys only, from inside a block."""
    torch.manual_seed(d + heads)
    lens = [1, 5, bs, bs + 1, 3 * bs + 7, 200]
    num_blocks = sum(-(-n // bs) for n in lens) + 3
    k_cache = torch.randn(num_blocks, kv_heads, bs, d, dtype=torch.bfloat16)
    v_cache = torch.randn(num_blocks, kv_heads, bs, d, dtype=torch.bfloat16)
    order = iter(torch.randperm(num_blocks).tolist())
    tables = [[next(order) for _ in range(-(-n // bs))] for n in lens]
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = (torch.randn(len(lens), heads + 2 * kv_heads, d, dtype=torch.bfloat16) * 3)[:, :heads]
    out = native.paged_decode_attention(q, k_cache, v_cache, block_tables, torch.tensor(lens), d ** -0.5, window)
    if heads // kv_heads > 16:
        assert out is None
        return
    for i, (n, table) in enumerate(zip(lens, tables)):
        ks = k_cache[table].transpose(0, 1).flatten(1, 2)[:, :n].transpose(0, 1)
        vs = v_cache[table].transpose(0, 1).flatten(1, 2)[:, :n].transpose(0, 1)
        expected = naive_attention(q[i:i + 1], ks, vs, torch.tensor([n - 1]), window)[0]
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out[i].float(), expected, rtol=2 ** -8, atol=1e-5)  # within bfloat16 rounding


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_native_norm_matches_the_reference(rows):
    """The sum x + residual is exact; the normalized row is within one bfloat16 step of torch's (the float32 sum
    of squares adds up in another order; the weight can stretch that step)."""
    torch.manual_seed(rows)
    x = torch.randn(rows, 576, dtype=torch.bfloat16) * 4
    residual, weight = torch.randn(rows, 576, dtype=torch.bfloat16), torch.randn(576, dtype=torch.bfloat16)
    out, total = native.add_rms_norm_bf16(x, residual, weight, 1e-5)
    expected_out, expected_total = reference.add_rms_norm(x, residual, weight, 1e-5)
    one_step = dict(rtol=2 ** -6, atol=1e-6)  # one bfloat16 step of the normalized value, times the weight
    assert torch.equal(total, expected_total)
    torch.testing.assert_close(out.float(), expected_out.float(), **one_step)
    assert (out != expected_out).float().mean() < 1e-3
    plain, none = native.add_rms_norm_bf16(x, None, weight, 1e-5)
    assert none is None
    torch.testing.assert_close(plain.float(), reference.rms_norm(x, weight, 1e-5).float(), **one_step)
    # the dispatcher: native for bfloat16, the reference for float32
    assert torch.equal(kernels.add_rms_norm(x, residual, weight, 1e-5)[0], out)
    xf, rf, wf = x.float(), residual.float(), weight.float()
    torch.testing.assert_close(kernels.add_rms_norm(xf, rf, wf, 1e-5)[0], reference.add_rms_norm(xf, rf, wf, 1e-5)[0])


def test_paged_attention_falls_back_when_the_native_kernel_refuses():
    """More than 16 query heads a kv head: the native kernel says no and the PyTorch decode path answers."""
    torch.manual_seed(3)
    bs, heads, d = 16, 20, 64
    k_cache = torch.randn(8, 1, bs, d, dtype=torch.bfloat16)
    v_cache = torch.randn(8, 1, bs, d, dtype=torch.bfloat16)
    items = [([1], 20, [2, 5], True), ([1], 7, [6], True)]
    batch, _ = build_batch(items, bs)
    q = torch.randn(2, heads, d, dtype=torch.bfloat16)
    k, v = torch.randn(2, 1, d, dtype=torch.bfloat16), torch.randn(2, 1, d, dtype=torch.bfloat16)
    reference.store_kv(k, v, k_cache, v_cache, batch.slot_mapping, bs)
    assert native.paged_decode_attention(q, k_cache, v_cache, batch.decode_block_tables, batch.decode_lens,
                                         d ** -0.5) is None
    got = kernels.paged_attention(q, k, v, k_cache, v_cache, batch, d ** -0.5)
    torch.testing.assert_close(got, reference.paged_attention(q, k, v, k_cache, v_cache, batch, d ** -0.5))


@pytest.mark.parametrize("heads,kv_heads,d,bs", [(9, 3, 64, 64), (8, 1, 128, 16), (4, 4, 32, 8), (16, 2, 64, 32)])
@pytest.mark.parametrize("length,context", [(1, 1), (2, 2), (64, 64), (100, 100), (257, 257), (40, 1100), (5, 37),
                                            (70, 100), (33, 300)])
@pytest.mark.parametrize("window", [None, 29])
def test_native_chunk_attention_matches_naive_attention(heads, kv_heads, d, bs, length, context, window,
                                                        bf16_products):
    """One sequence's chunk of new tokens (a whole prompt, or the last `length` of `context` positions) read from
    the paged cache in place: tails of 32 keys and of 16 rows, query rows with a stride (a view of the fused qkv),
    and NaN in the cache slots past the context, which must not leak in; window 29: each row's last 29 keys."""
    torch.manual_seed(length * 7 + context + d)
    nb = -(-context // bs)
    k_cache = torch.full((nb + 4, kv_heads, bs, d), float("nan"), dtype=torch.bfloat16)
    v_cache = torch.full((nb + 4, kv_heads, bs, d), float("nan"), dtype=torch.bfloat16)
    table = torch.randperm(nb + 4)[:nb]
    ks = torch.randn(context, kv_heads, d, dtype=torch.bfloat16)
    vs = torch.randn(context, kv_heads, d, dtype=torch.bfloat16)
    slots = table[torch.arange(context) // bs] * bs + torch.arange(context) % bs
    reference.store_kv(ks, vs, k_cache, v_cache, slots, bs)
    qkv = torch.randn(length, heads + 2 * kv_heads, d, dtype=torch.bfloat16) * 2
    q = qkv[:, :heads]
    out = torch.full((length, heads, d), float("nan"), dtype=torch.bfloat16)
    assert native.prefill_attention(q, k_cache, v_cache, table, context, d ** -0.5, out, window)
    expected = naive_attention(q, ks, vs, torch.arange(context - length, context), window)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=1e-2)


def test_native_chunk_attention_declines_without_bf16_products(isa):
    """Below AVX512-BF16 the chunk kernel says no (and the dispatcher's PyTorch path answers, as below)."""
    if isa in ("amx", "avx512") and "avx512_bf16" in native._cpu_flags().split():
        pytest.skip("this CPU has AVX512-BF16: the kernel runs here (tested above)")
    k_cache = v_cache = torch.randn(4, 1, 16, 64, dtype=torch.bfloat16)
    q, out = torch.randn(8, 2, 64, dtype=torch.bfloat16), torch.empty(8, 2, 64, dtype=torch.bfloat16)
    assert not native.prefill_attention(q, k_cache, v_cache, torch.tensor([0]), 8, 0.125, out)


def test_native_chunk_attention_declines_other_head_sizes():
    """head_dim not a multiple of 32: the kernel declines and the dispatcher's PyTorch path answers."""
    torch.manual_seed(1)
    bs, kv_heads, heads, d = 16, 2, 4, 48
    k_cache = torch.randn(8, kv_heads, bs, d, dtype=torch.bfloat16)
    v_cache = torch.randn(8, kv_heads, bs, d, dtype=torch.bfloat16)
    q = torch.randn(20, heads, d, dtype=torch.bfloat16)
    out = torch.empty(20, heads, d, dtype=torch.bfloat16)
    assert not native.prefill_attention(q, k_cache, v_cache, torch.tensor([3, 1]), 20, d ** -0.5, out)
    batch, _ = build_batch([([1] * 20, 0, [3, 1], True)], bs)
    k, v = torch.randn(20, kv_heads, d, dtype=torch.bfloat16), torch.randn(20, kv_heads, d, dtype=torch.bfloat16)
    reference.store_kv(k, v, k_cache, v_cache, batch.slot_mapping, bs)
    got = kernels.paged_attention(q, k, v, k_cache, v_cache, batch, d ** -0.5)
    expected = naive_attention(q, k, v, torch.arange(20))
    torch.testing.assert_close(got.float(), expected, rtol=3e-2, atol=3e-2)


def test_paged_attention_takes_the_native_chunk_kernel(monkeypatch, bf16_products):
    """A batch of decodes, a fresh prompt and a chunk after a cached context: in bfloat16 every chunk goes through
    the native kernel (counted), and the whole batch matches naive attention."""
    torch.manual_seed(5)
    bs, kv_heads, heads, d = 64, 3, 9, 64
    k_cache = torch.randn(16, kv_heads, bs, d, dtype=torch.bfloat16)
    v_cache = torch.randn(16, kv_heads, bs, d, dtype=torch.bfloat16)
    items = [([1], 80, [11, 12], True), ([1] * 100, 0, [1, 2], True), ([1] * 70, 30, [9, 10], True)]
    calls = []
    real = native.prefill_attention
    def counted(*args):
        done = real(*args)
        calls.append((args[4], done))
        return done

    monkeypatch.setattr(native, "prefill_attention", counted)
    batch, _ = build_batch(items, bs)
    t = batch.input_ids.shape[0]
    q = torch.randn(t, heads, d, dtype=torch.bfloat16)
    k, v = torch.randn(t, kv_heads, d, dtype=torch.bfloat16), torch.randn(t, kv_heads, d, dtype=torch.bfloat16)
    reference.store_kv(k, v, k_cache, v_cache, batch.slot_mapping, bs)
    out = kernels.paged_attention(q, k, v, k_cache, v_cache, batch, d ** -0.5)
    assert calls == [(100, True), (100, True)]  # the contexts of the two chunks, each computed natively
    start = 0
    for new, c, table, _ in items:
        n = len(new)
        flat = torch.tensor(table)
        ks = k_cache[flat].transpose(0, 1).flatten(1, 2)[:, :c + n].transpose(0, 1)
        vs = v_cache[flat].transpose(0, 1).flatten(1, 2)[:, :c + n].transpose(0, 1)
        expected = naive_attention(q[start:start + n], ks, vs, torch.arange(c, c + n))
        torch.testing.assert_close(out[start:start + n].float(), expected, rtol=3e-2, atol=3e-2)
        start += n


@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_native_rotary_store_matches_the_reference(tokens):
    """q and k rotated in place and k, v written to their cache slots: bit for bit the PyTorch reference."""
    torch.manual_seed(tokens)
    heads, kv_heads, d, bs = 9, 3, 64, 16
    qkv = torch.randn(tokens, heads + 2 * kv_heads, d, dtype=torch.bfloat16) * 3
    angles = torch.rand(tokens, d // 2) * 40
    cos, sin = torch.cat((angles, angles), -1).cos().bfloat16(), torch.cat((angles, angles), -1).sin().bfloat16()
    slots = torch.randperm(8 * bs)[:tokens]
    caches = [torch.zeros(8, kv_heads, bs, d, dtype=torch.bfloat16) for _ in range(4)]
    expected_qk = reference.rotary(qkv[:, :heads + kv_heads], cos, sin)
    reference.store_kv(expected_qk[:, heads:], qkv[:, heads + kv_heads:], caches[0], caches[1], slots, bs)
    got = qkv.clone()
    q, k, v = kernels.rotary_store(got, heads, kv_heads, cos, sin, caches[2], caches[3], slots)
    assert q.data_ptr() == got.data_ptr()  # the native path: in place
    assert torch.equal(q, expected_qk[:, :heads]) and torch.equal(k, expected_qk[:, heads:])
    assert torch.equal(v, qkv[:, heads + kv_heads:])
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])
    # float32 takes the reference path and gives the same numbers up to bfloat16 rounding
    q32, k32, _ = kernels.rotary_store(qkv.float(), heads, kv_heads, cos.float(), sin.float(),
                                       caches[0].float(), caches[1].float(), slots)
    torch.testing.assert_close(q32, q.float(), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("tokens", [1, 40])
def test_native_rotary_store_into_the_8bit_cache_quantizes_as_the_reference(tokens):
    """Into kv8.Int8Cache the native pass rotates in place and stores each k and v row's codes and float16 scale
    bit for bit as the reference store (kv8.quantize) does: zero rows, and rows so small their scale is a float16
    subnormal, included."""
    torch.manual_seed(tokens)
    heads, kv_heads, d, bs = 9, 3, 64, 16
    qkv = (torch.randn(tokens, heads + 2 * kv_heads, d) * 3).bfloat16()
    qkv[0, heads + 1] = 0
    qkv[-1, heads + kv_heads] *= 1e-6
    angles = torch.rand(tokens, d // 2).repeat(1, 2) * 40
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    slots = torch.randperm(8 * bs)[:tokens]
    expected, got = _int8_caches(8, kv_heads, bs, d), _int8_caches(8, kv_heads, bs, d)
    expected_qk = reference.rotary(qkv[:, :heads + kv_heads], cos, sin)
    reference.store_kv(expected_qk[:, heads:], qkv[:, heads + kv_heads:], *expected, slots, bs)
    rows = qkv.clone()
    q, _, _ = kernels.rotary_store(rows, heads, kv_heads, cos, sin, *got, slots)
    assert q.data_ptr() == rows.data_ptr() and torch.equal(rows[:, :heads + kv_heads], expected_qk)
    for a, b in zip(got, expected):
        assert torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale)
    assert expected[0].scale.abs().max() > 0 and 0 < expected[1].scale[slots[-1] // bs, 0, slots[-1] % bs] < 2 ** -14


@pytest.mark.parametrize("rows", [1, 64, 300])
def test_native_silu_and_mul_matches_the_reference(rows):
    torch.manual_seed(rows)
    x = torch.randn(rows, 2 * 1536, dtype=torch.bfloat16) * 4
    got, expected = kernels.silu_and_mul(x), reference.silu_and_mul(x)
    assert got.shape == (rows, 1536) and got.dtype == torch.bfloat16
    # expf against torch's vector exp differ in the last float bit: a silu right at a bfloat16 rounding tie can
    # land one step away (here only gate 5.9375), then times up
    torch.testing.assert_close(got.float(), expected.float(), rtol=2 ** -6, atol=1e-6)
    assert (got != expected).float().mean() < 1e-2


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_native_gemma_norm_matches_the_reference(rows):
    """Gemma's norm (the product with 1 + weight in float32, one rounding): within one bfloat16 step of torch's,
    for rows of 640 (its hidden size) and 256 (a head: its query and key norms); float32 takes the reference."""
    torch.manual_seed(rows)
    for dim in (640, 256, 100):
        x = torch.randn(rows, dim, dtype=torch.bfloat16) * 4
        weight = torch.randn(dim, dtype=torch.bfloat16)
        got, expected = kernels.gemma_rms_norm(x, weight, 1e-6), reference.gemma_rms_norm(x, weight, 1e-6)
        assert got.dtype == torch.bfloat16 and torch.equal(got, native.gemma_norm_bf16(x, weight, 1e-6))
        torch.testing.assert_close(got.float(), expected.float(), rtol=2 ** -7, atol=1e-6)
        assert (got != expected).float().mean() < 1e-2
    xf, wf = x.float(), weight.float()
    assert torch.equal(kernels.gemma_rms_norm(xf, wf, 1e-6), reference.gemma_rms_norm(xf, wf, 1e-6))


def test_silu_and_gelu_of_extreme_gates_stay_finite():
    """Huge gates: silu(g) is g (its cubic term is zero, never 0 * inf), gates far below zero give about 0 (no nan
    where exp overflows), gelu saturates as torch's does; along a whole row, so that every level's vector body and
    scalar tail both see them."""
    gates = torch.tensor([2e19, 3e38, -3e38, -100., -88., -50., 1e4, -1e4, 0., 3.] * 4, dtype=torch.bfloat16)
    x = torch.cat([gates, torch.ones_like(gates)])[None]
    silu, gelu = kernels.silu_and_mul(x)[0].float(), kernels.gelu_and_mul(x)[0].float()
    assert torch.isfinite(silu).all() and torch.isfinite(gelu).all()
    torch.testing.assert_close(silu, reference.silu_and_mul(x.float())[0].bfloat16().float(), rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(gelu[4:], reference.gelu_and_mul(x.float())[0, 4:].bfloat16().float(), rtol=2 ** -7,
                               atol=1e-6)


def test_norms_of_a_strided_view_are_those_of_its_copy():
    """The key norm's rows where a qkv has one KV head: a strided view, read by the same kernel as its copy (the
    one-call decode layers read the copy: the layer op by op must not take another path)."""
    torch.manual_seed(0)
    qkv = torch.randn(300, 6, 256, dtype=torch.bfloat16) * 4
    k, weight = qkv[:, 4:5].reshape(-1, 256), torch.randn(256, dtype=torch.bfloat16)
    assert not k.is_contiguous()
    assert torch.equal(kernels.rms_norm(k, weight, 1e-6), native.add_rms_norm_bf16(k.contiguous(), None, weight,
                                                                                   1e-6)[0])
    assert torch.equal(kernels.gemma_rms_norm(k, weight, 1e-6), native.gemma_norm_bf16(k.contiguous(), weight, 1e-6))


@pytest.mark.parametrize("rows", [1, 64, 300])
def test_native_gelu_and_mul_matches_the_reference(rows):
    """GeGLU as a / (1 + exp(-2y)): within a bfloat16 step of torch's 0.5 a (1 + tanh(y)) wherever the output
    is not tiny; below zero torch's tanh saturates to -1 (an output of 0) where this keeps a tiny value."""
    torch.manual_seed(rows)
    x = torch.randn(rows, 2 * 2048, dtype=torch.bfloat16) * 4
    got, expected = kernels.gelu_and_mul(x), reference.gelu_and_mul(x)
    assert got.shape == (rows, 2048) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2 ** -6, atol=1e-4)
    large = expected.float().abs() > 1e-2
    assert (got != expected)[large].float().mean() < 1e-2
    assert torch.equal(kernels.gelu_and_mul(x.float()), reference.gelu_and_mul(x.float()))


ROUND16_CHECK = r"""
#include <stdio.h>
#include <stdlib.h>
#include "bf16.h"
int main(void) {  /* round16 against f2bf16 on random bit patterns, every 7th an inf or a nan */
    long differ = 0, n = 0;
    srand(1);
    for (long it = 0; it < 200000; it++) {
        float f[16];
        uint16_t got[16];
        for (int i = 0; i < 16; i++) {
            uint32_t u = ((uint32_t)rand() << 16) ^ (uint32_t)rand();
            if (it % 7 == 0) u = (u & 0x807FFFFFu) | 0x7F800000u;
            memcpy(&f[i], &u, 4);
        }
        _mm256_storeu_si256((void *)got, round16(_mm512_loadu_ps(f)));
        for (int i = 0; i < 16; i++, n++) differ += got[i] != f2bf16(f[i]);
    }
    printf("%ld %ld\n", differ, n);
    return 0;
}
"""


def test_avx512_rounding_without_bf16_instructions_is_f2bf16(tmp_path):
    """The vector bfloat16 rounding of the elementwise passes on AVX-512 CPUs without AVX512-BF16 (Skylake to Ice
    Lake): built here with those instructions turned off, it must give f2bf16's bits, specials included."""
    missing = native.missing_features("avx512")
    if missing:
        pytest.skip(f"needs AVX-512 ({', '.join(missing)} missing)")
    (tmp_path / "r16.c").write_text(ROUND16_CHECK)
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-march=native", "-mno-avx512bf16", f"-I{native.SOURCES}", str(tmp_path / "r16.c"),
                    "-o", str(tmp_path / "r16")], check=True)
    differ, n = map(int, subprocess.run([str(tmp_path / "r16")], capture_output=True, text=True,
                                        check=True).stdout.split())
    assert n == 3_200_000 and differ == 0


@pytest.mark.parametrize("rows,n", [(1, 1), (3, 7), (64, 49152), (2, 100003)])
def test_native_argmax_is_torchs(rows, n, monkeypatch):
    torch.manual_seed(n)
    x = torch.randn(rows, n)
    x[0, n // 3] = x[0, n // 2] = 100.0  # a tie: the first index wins, as in torch
    called = []
    monkeypatch.setattr(native, "argmax_f32", lambda t, f=native.argmax_f32: called.append(1) or f(t))
    assert torch.equal(kernels.argmax(x), x.argmax(-1))
    assert called  # the native kernel answered, not torch
    assert kernels.argmax(x.bfloat16()).tolist() == x.bfloat16().argmax(-1).tolist()  # other dtypes: torch's


def test_native_argmax_leaves_nan_rows_to_torch():
    x = torch.randn(4, 1000)
    x[2, 17] = float("nan")
    assert native.argmax_f32(x) is None
    assert kernels.argmax(x).tolist() == x.argmax(-1).tolist()


@pytest.mark.parametrize("m,n,k", [(1, 3072, 576), (3, 17, 96), (4, 7, 32), (9, 576, 1536), (16, 200, 160),
                                   (21, 96, 64), (64, 33, 64), (37, 200, 160)])
def test_int8_kernel_is_the_dequantized_product(m, n, k, isa):
    """At every level the 8-bit kernel computes exactly (to float32 rounding) x's 8-bit blocks (with VNNI, with the
    sign trick of AVX2, in plain loops) times the dequantized weight, or on AMX x and the weight in bfloat16
    (_products), each row with its own scale: a row of tiny values beside a row of huge ones keeps its precision;
    bias added after; float32 and bfloat16."""
    from lmcli.kernels import int8

    torch.manual_seed(m * n)
    w, x, bias = torch.randn(n, k), torch.randn(m, k), torch.randn(n)
    x[0] *= 1e-3
    x[-1, :32] *= 1e3
    weight = int8.pack(w)
    deq = weight.dequantize()
    assert deq.shape == (n, k) and ((deq - w).abs() <= w.abs().amax(1, keepdim=True) / 254 + 1e-7).all()
    got = kernels.quantized_linear(x, weight, bias)
    expected = _products(x, deq) + bias
    assert got.dtype == torch.float32 and got.shape == (m, n)
    err = (got - expected).abs() / expected.abs().amax(1, keepdim=True)  # each row on its own scale
    assert err.max() <= 1e-5, err.max()
    # bfloat16 in and out: the same arithmetic, rounded once at the end (bfloat16 inputs tie often when quantized,
    # and the compiler may round a tie differently from torch: hence the float32 run on the same values)
    xb = x.bfloat16()
    assert torch.equal(kernels.quantized_linear(xb, weight), kernels.quantized_linear(xb.float(), weight).bfloat16())
    assert int8.pack(torch.randn(4, 40)) is None


def _products(x: torch.Tensor, deq: torch.Tensor) -> torch.Tensor:
    """What the 4-bit and 8-bit kernels multiply: from native.amx_rows() rows (where AMX runs) x in bfloat16 times
    the weight in bfloat16, else x's 8-bit blocks times the weight; float32 sums."""
    if native.amx_rows() and x.shape[0] >= native.amx_rows():
        return x.bfloat16().float() @ deq.bfloat16().float().t()
    return _blocks_to_int8(x) @ deq.t()


def _blocks_to_int8(x: torch.Tensor) -> torch.Tensor:
    """What the kernels of cpu/blocks.c multiply for x: each block of 32 rounded to -127..127 of its own scale."""
    m, k = x.shape
    b = x.float().view(m, k // 32, 32)
    amax = b.abs().amax(2, keepdim=True)
    return (torch.round(b * torch.where(amax > 0, 127 / amax, 0)) * (amax / 127)).view(m, k)


@pytest.mark.parametrize("m,n,k", [(1, 3072, 576), (3, 17, 96), (4, 7, 32), (5, 576, 1536), (16, 200, 160),
                                   (21, 96, 64), (64, 33, 64), (37, 200, 160)])
def test_int4_kernel_is_the_dequantized_product(m, n, k):
    """At every level the 4-bit kernel computes exactly (to float32 rounding) x's 8-bit blocks times the dequantized
    weight, or on AMX both in bfloat16 (_products): output rows that do not fill a tile of 8 (or 16), row counts
    that do not fill 4 (or 16), bfloat16 and float32 in and out, a block of zeros in x."""
    from lmcli.kernels import int4

    torch.manual_seed(m * n)
    w, x = torch.randn(n, k), torch.randn(m, k)
    x[0, :32] = 0
    weight = int4.quantize(w)
    deq = weight.dequantize()
    assert deq.shape == (n, k) and (deq - w).abs().max() <= 0.07 * w.abs().max()  # half a step of 15 over the block
    for xin in (x, x.bfloat16()):
        got = kernels.quantized_linear(xin, weight)
        expected = _products(xin, deq)
        assert got.dtype == xin.dtype and got.shape == (m, n)
        tol = 1e-5 if xin.dtype == torch.float32 else 2 ** -8  # bfloat16 out: one rounding
        torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_weights_widen_back_to_their_rows_exactly(bits):
    """cpu/unpack.c gives back exactly the weight the byte products multiply by, in float32 and in bfloat16 (rounded
    once, to nearest even), for out features that do not fill a tile of 8."""
    from lmcli.kernels import int4, int8

    torch.manual_seed(bits)
    for n, k in [(17, 96), (8, 32), (576, 1536)]:
        weight = (int4.quantize if bits == 4 else int8.pack)(torch.randn(n, k))
        deq = weight.dequantize()
        for dtype in (torch.float32, torch.bfloat16):
            got = native.dequantize_blocks(bits, weight.codes, weight.scales, n, k, dtype)
            assert got.dtype == dtype and torch.equal(got, deq.to(dtype)), (n, k, dtype)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_linear_of_many_rows_multiplies_the_widened_weight(bits):
    """From WIDEN_MIN_ROWS rows (AMX_WIDEN_MIN_ROWS where AMX runs) the product runs on the widened weight: x itself,
    not its 8-bit blocks, times the dequantized weight (float32 to float32 rounding; bfloat16 as torch multiplies
    it where the CPU has bfloat16 products, else in float32), bias added. Where AMX runs, from native.amx_rows()
    rows up to there the kernel multiplies x and the weight in bfloat16. Below, x's 8-bit blocks."""
    from lmcli.kernels import int4, int8

    torch.manual_seed(bits)
    amx = native.amx_rows()
    m, n, k = kernels.AMX_WIDEN_MIN_ROWS if amx else kernels.WIDEN_MIN_ROWS, 40, 96
    weight = (int4.quantize if bits == 4 else int8.pack)(torch.randn(n, k))
    x, bias = torch.randn(m, k), torch.randn(n)
    deq = weight.dequantize()
    exact = x @ deq.t() + bias
    scale = exact.abs().max().item()
    got = kernels.quantized_linear(x, weight, bias)
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5 * scale)
    low = amx or m  # below this many rows, x's 8-bit blocks
    if amx:  # amx .. m - 1 rows: x and the weight in bfloat16, float32 sums
        for rows in (amx, m - 1):
            on_amx = x[:rows].bfloat16().float() @ deq.bfloat16().float().t() + bias
            torch.testing.assert_close(kernels.quantized_linear(x[:rows], weight, bias), on_amx, rtol=1e-5,
                                       atol=1e-5 * scale)
            assert (on_amx - exact[:rows]).abs().max() > 1e-3  # so the checks can tell the paths apart
    blocked = kernels.quantized_linear(x[:low - 1], weight, bias)
    torch.testing.assert_close(blocked, _blocks_to_int8(x[:low - 1]) @ deq.t() + bias, rtol=1e-5, atol=1e-4)
    assert (blocked - exact[:low - 1]).abs().max() > 1e-3
    xb = x.bfloat16()
    work = torch.bfloat16 if native.bf16_products() else torch.float32
    assert torch.equal(kernels.quantized_linear(xb, weight), (xb.to(work) @ deq.to(work).t()).bfloat16())


def test_int4_keeps_q4_blocks_exactly_and_refuses_what_it_cannot_hold():
    """A weight already in 4-bit blocks (d * q + mn, d and mn in float16, as a Q4_1 GGUF dequantizes) comes back
    bit for bit; in features not a multiple of 32, or values beyond float16, are not quantized."""
    from lmcli.kernels import int4

    torch.manual_seed(0)
    q = torch.randint(0, 16, (16, 4, 32)).float()
    q[:, :, 0], q[:, :, 1] = 0, 15  # every block spans its whole range, as a Q4_1 quantizer leaves it
    d, mn = (torch.rand(16, 4, 1) / 10).half().float(), (torch.randn(16, 4, 1) / 10).half().float()
    w = (q * d + mn).view(16, 128)
    assert torch.equal(int4.quantize(w).dequantize(), w)
    assert int4.quantize(torch.randn(8, 40)) is None
    assert int4.quantize(torch.full((8, 32), 1e6)) is None


def test_int4_without_native_kernels_widens_the_weight(monkeypatch):
    from lmcli.kernels import int4

    torch.manual_seed(1)
    weight, x, bias = int4.quantize(torch.randn(9, 64)), torch.randn(2, 64), torch.randn(9)
    monkeypatch.setattr(native, "library", lambda: None)
    torch.testing.assert_close(kernels.quantized_linear(x, weight, bias), x @ weight.dequantize().t() + bias)


def _int8_caches(num_blocks, kv_heads, bs, d):
    from lmcli.kernels.kv8 import Int8Cache

    return tuple(Int8Cache(torch.zeros(num_blocks, kv_heads, bs, d, dtype=torch.int8),
                           torch.zeros(num_blocks, kv_heads, bs, dtype=torch.float16)) for _ in range(2))


def test_the_8bit_cache_keeps_each_row_within_half_a_step():
    """Stored through the reference store (as the engine stores): each row's codes times its float16 scale are within
    half a step (scale / 2, plus the scale's own float16 rounding) of the row; a zero row stays zero."""
    torch.manual_seed(0)
    k_cache, v_cache = _int8_caches(6, 3, 8, 64)
    k, v = torch.randn(20, 3, 64) * 5, torch.randn(20, 3, 64).bfloat16()
    k[4, 1] = 0
    slots = torch.randperm(48)[:20]
    reference.store_kv(k, v, k_cache, v_cache, slots, 8)
    for cache, rows in ((k_cache, k.float()), (v_cache, v.float())):
        back = cache.index_select(0, torch.arange(6))[slots // 8, :, slots % 8]
        step = rows.abs().amax(-1, keepdim=True) / 127
        assert ((back - rows).abs() <= step * (0.5 + 2 ** -9) + 1e-7).all()
    zero = (slots[4] // 8, 1, slots[4] % 8)
    assert (k_cache.data[zero] == 0).all() and k_cache.scale[zero] == 0


@pytest.mark.parametrize("heads,kv_heads,d,bs,window", [(9, 3, 64, 64, None), (8, 1, 128, 16, None),
                                                       (4, 4, 40, 8, None), (16, 1, 64, 16, None),
                                                       (9, 3, 64, 64, 70), (4, 1, 256, 16, 21), (4, 4, 40, 8, 5),
                                                       (4, 4, 40, 8, 8), (4, 2, 32, 16, 1)])
def test_native_decode_attention_over_the_8bit_cache(heads, kv_heads, d, bs, window):
    """At every level, the 8-bit decode kernel is exact attention over the dequantized rows (to float32 rounding and
    the bfloat16 output), head_dim 40 through its tail loop; past 8 query heads a kv head it declines (None) and
    kernels.paged_attention falls back to the reference over the same cache. window: each sequence sees its last
    `window` keys (most of these outgrow it, from inside a block or a block's start; 1: the new key alone), the
    blocks wholly before them unread (their
    table entries point at block 0, which holds nan scales here)."""
    torch.manual_seed(d + heads)
    lens = [1, 5, bs, bs + 1, 3 * bs + 7, 200]
    num_blocks = sum(-(-n // bs) for n in lens) + 3
    k_cache, v_cache = _int8_caches(num_blocks, kv_heads, bs, d)
    slots = torch.arange(num_blocks * bs)
    reference.store_kv(torch.randn(len(slots), kv_heads, d), torch.randn(len(slots), kv_heads, d), k_cache, v_cache,
                       slots, bs)
    order = iter(torch.randperm(num_blocks - 1).add(1).tolist())  # block 0: the null page
    tables = [[next(order) for _ in range(-(-n // bs))] for n in lens]
    if window is not None:  # a sliding window's blocks left behind (BlockManager.slide) point at the null page
        k_cache.scale[0], v_cache.scale[0] = float("nan"), float("nan")
        tables = [[0 if (j + 1) * bs <= n - window else b for j, b in enumerate(t)] for n, t in zip(lens, tables)]
        assert sum(t.count(0) for t in tables) > 3
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = (torch.randn(len(lens), heads + 2 * kv_heads, d, dtype=torch.bfloat16) * 3)[:, :heads]
    out = native.paged_decode_attention_s8(q, k_cache, v_cache, block_tables, torch.tensor(lens), d ** -0.5, window)
    tol = dict(rtol=2 ** -7, atol=1e-4)
    if heads // kv_heads > 8:
        assert out is None
        batch = Batch(None, None, None, len(lens), block_tables, torch.tensor(lens), None, 1, [], None)
        out = kernels.paged_attention(q, None, None, k_cache, v_cache, batch, d ** -0.5)
        tol = dict(rtol=6e-2, atol=6e-2)  # the reference computes 6 sequences' products in bfloat16
    keys, values = (c.index_select(0, torch.arange(num_blocks)) for c in (k_cache, v_cache))
    for i, (n, table) in enumerate(zip(lens, tables)):
        ks = keys[table].transpose(0, 1).flatten(1, 2)[:, :n].transpose(0, 1)
        vs = values[table].transpose(0, 1).flatten(1, 2)[:, :n].transpose(0, 1)
        expected = naive_attention(q[i:i + 1], ks.nan_to_num(), vs.nan_to_num(), torch.tensor([n - 1]), window)[0]
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out[i].float(), expected, **tol)


def test_paged_attention_over_the_8bit_cache_mixes_decodes_and_chunks():
    """Decodes, a chunk after a cached prefix and a fresh prompt in one batch, over the 8-bit cache, against naive
    attention over what the cache holds (the chunks' own keys included: stored first, then read back)."""
    torch.manual_seed(3)
    bs, kv_heads, heads, d, num_blocks = 4, 2, 6, 8, 64
    k_cache, v_cache = _int8_caches(num_blocks, kv_heads, bs, d)
    blocks = iter(torch.randperm(num_blocks).tolist())
    items = [([1], c, [next(blocks) for _ in range(-(-(c + 1) // bs))], True) for c in (3, 9)]
    items += [([1] * 5, 6, [next(blocks) for _ in range(3)], True),
              ([1] * 7, 0, [next(blocks) for _ in range(2)], True)]
    batch, _ = build_batch(items, bs)
    t = batch.input_ids.shape[0]
    q = torch.randn(t, heads, d, dtype=torch.bfloat16)
    k, v = torch.randn(t, kv_heads, d, dtype=torch.bfloat16), torch.randn(t, kv_heads, d, dtype=torch.bfloat16)
    reference.store_kv(torch.randn(num_blocks * bs, kv_heads, d), torch.randn(num_blocks * bs, kv_heads, d), k_cache,
                       v_cache, torch.arange(num_blocks * bs), bs)  # earlier context everywhere
    reference.store_kv(k, v, k_cache, v_cache, batch.slot_mapping, bs)
    out = kernels.paged_attention(q, k, v, k_cache, v_cache, batch, d ** -0.5)
    keys, values = (c.index_select(0, torch.arange(num_blocks)) for c in (k_cache, v_cache))
    start = 0
    for new, c, table, _ in items:  # decodes come first in the batch, as listed here
        n = len(new)
        ks = keys[table].transpose(0, 1).flatten(1, 2)[:, :c + n].transpose(0, 1)
        vs = values[table].transpose(0, 1).flatten(1, 2)[:, :c + n].transpose(0, 1)
        expected = naive_attention(q[start:start + n], ks, vs, torch.arange(c, c + n))
        torch.testing.assert_close(out[start:start + n].float(), expected, rtol=2 ** -7, atol=1e-4)
        start += n


@pytest.mark.parametrize("length,context", [(64, 64), (5, 40), (1, 1)])
def test_chunks_over_the_8bit_cache_take_the_native_chunk_kernel(length, context, bf16_products, monkeypatch):
    """With native bfloat16 products a chunk over the 8-bit cache widens its context's blocks to bfloat16 and runs
    the native chunk kernel: naive attention over what the cache holds, rounded to bfloat16."""
    torch.manual_seed(length + context)
    heads, kv_heads, d, bs, num_blocks = 9, 3, 64, 16, 12
    k_cache, v_cache = _int8_caches(num_blocks, kv_heads, bs, d)
    reference.store_kv(torch.randn(num_blocks * bs, kv_heads, d), torch.randn(num_blocks * bs, kv_heads, d), k_cache,
                       v_cache, torch.arange(num_blocks * bs), bs)
    table = torch.randperm(num_blocks)[:-(-context // bs)]
    q = torch.randn(length, heads, d).bfloat16()
    calls = []
    monkeypatch.setattr(native, "prefill_attention", lambda *a, f=native.prefill_attention: calls.append(1) or f(*a))
    out = torch.empty_like(q)
    assert kernels.s8_chunk_attention(q, k_cache, v_cache, table, context, d ** -0.5, out) and calls
    keys, values = (c.index_select(0, table).transpose(0, 1).flatten(1, 2)[:, :context].transpose(0, 1)
                    for c in (k_cache, v_cache))
    # the widened rows are the cache's values rounded to bfloat16; the tolerance is the chunk kernel's own (above)
    expected = naive_attention(q, keys.bfloat16(), values.bfloat16(), torch.arange(context - length, context))
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("bits,first,kv8,qk,bias", [(4, False, False, False, False), (8, True, False, False, False),
                                                    (4, False, True, False, False), (4, False, False, True, False),
                                                    (8, True, True, True, False), (4, False, False, False, True),
                                                    (8, False, True, False, True)])
def test_decode_layer_in_one_call_is_the_layer_op_by_op(bits, first, kv8, qk, bias):
    """kernels.decode_layer (cpu/layer.c) at every level: the same MLP output, residual stream and cache rows, bit
    for bit, as the layer's kernels called one by one (the first layer: no residual yet; the 8-bit KV cache; Qwen3's
    norms over each head's query and key; Qwen2's bias of the qkv product)."""
    from types import SimpleNamespace

    from lmcli.kernels import int4, int8

    torch.manual_seed(bits)
    m, hidden, heads, kv_heads, dim, inter, bs, eps = 3, 64, 4, 2, 16, 96, 16, 1e-5
    shapes = [((heads + 2 * kv_heads) * dim, hidden), (hidden, heads * dim), (2 * inter, hidden), (hidden, inter)]
    weights = tuple((int4.quantize if bits == 4 else int8.pack)(torch.randn(n, k) / 4) for n, k in shapes)
    norms = tuple((torch.rand(hidden) + 0.5).bfloat16() for _ in range(2))
    norms += tuple((torch.rand(dim) + 0.5).bfloat16() for _ in range(2)) if qk else (None, None)
    norms += ((torch.randn(shapes[0][0]) * 2).bfloat16() if bias else None,)
    x = torch.randn(m, hidden).bfloat16()
    residual = None if first else torch.randn(m, hidden).bfloat16()
    caches = [torch.randn(8, kv_heads, bs, dim).bfloat16() for _ in range(2)]
    if kv8:
        from lmcli.kernels.kv8 import Int8Cache, quantize

        caches = [Int8Cache(*quantize(c)) for c in caches]
    lens, tables = torch.tensor([5, 16, 20]), torch.tensor([[6, 1], [2, 3], [4, 5]])
    slots = tables[torch.arange(m), (lens - 1) // bs] * bs + (lens - 1) % bs
    angles = torch.rand(m, dim // 2).repeat(1, 2) * 6
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    batch = SimpleNamespace(prefills=[], num_decode=m, slot_mapping=slots, decode_block_tables=tables,
                            decode_lens=lens)
    scale = dim ** -0.5
    clone = (lambda c: Int8Cache(c.data.clone(), c.scale.clone())) if kv8 else (lambda c: c.clone())
    same = (lambda a, b: torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale)) if kv8 else torch.equal
    kc, vc = (clone(c) for c in caches)
    before = clone(kc)
    got = kernels.decode_layer(x, residual, norms, weights, cos, sin, batch, *caches, eps, scale, heads, kv_heads, dim)
    assert got is not None
    if residual is None:
        h, res = kernels.rms_norm(x, norms[0], eps), x
    else:
        h, res = kernels.add_rms_norm(x, residual, norms[0], eps)
    qkv = kernels.quantized_linear(h, weights[0], norms[4]).view(m, heads + 2 * kv_heads, dim)
    if qk:  # as layers/attention.py does
        q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
        q = kernels.rms_norm(q.reshape(-1, dim), norms[2], eps).view(m, heads, dim)
        k = kernels.rms_norm(k.reshape(-1, dim), norms[3], eps).view(m, kv_heads, dim)
        qkv = torch.cat([q, k, v], dim=1)
    q, k, v = kernels.rotary_store(qkv, heads, kv_heads, cos, sin, kc, vc, slots)
    o = kernels.paged_attention(q, k, v, kc, vc, batch, scale)
    h, res = kernels.add_rms_norm(kernels.quantized_linear(o.flatten(1), weights[1]), res, norms[1], eps)
    out = kernels.quantized_linear(kernels.silu_and_mul(kernels.quantized_linear(h, weights[2])), weights[3])
    assert torch.equal(got[0], out) and torch.equal(got[1], res)
    assert same(caches[0], kc) and same(caches[1], vc) and not same(kc, before)
    batch.prefills = [(0, 1, 1, tables[0])]  # a prefill chunk in the batch: op by op
    assert kernels.decode_layer(x, residual, norms, weights, cos, sin, batch, *caches, eps, scale, heads, kv_heads,
                                dim) is None
    batch.prefills = []
    with pytest.MonkeyPatch.context() as patch:  # LMCLI_KERNELS=triton: the layers op by op run Triton's kernels
        patch.setattr(kernels, "triton_selected", lambda device: True)
        assert kernels.decode_layer(x, residual, norms, weights, cos, sin, batch, *caches, eps, scale, heads,
                                    kv_heads, dim) is None


@pytest.mark.parametrize("rows,n", [(1, 1), (3, 33), (64, 49152), (2, 100003)])
def test_native_mask_logits_is_the_reference(rows, n, monkeypatch):
    """A grammar's bitmask on some rows of the logits: the native kernel writes exactly what the torch reference
    does (-inf where a bit is clear, every other logit untouched), whatever the vocabulary's remainder mod 32."""
    torch.manual_seed(n)
    x = torch.randn(rows + 2, n)
    picked = torch.arange(rows) + 1  # rows 0 and rows + 1 have no grammar
    bitmask = torch.randint(-2**31, 2**31 - 1, (rows, (n + 31) // 32), dtype=torch.int32)
    bitmask[0, 0] = 0b101  # tokens 0 and 2 of the first masked row; token 1 not
    expected = x.clone()
    reference.mask_logits(expected, picked, bitmask)
    called = []
    monkeypatch.setattr(native, "mask_logits_f32", lambda *a, f=native.mask_logits_f32: called.append(1) or f(*a))
    got = x.clone()
    kernels.mask_logits(got, picked, bitmask)
    assert called and torch.equal(got, expected)
    assert torch.equal(got[0], x[0]) and torch.equal(got[-1], x[-1])
    assert got[1, 0] == x[1, 0] and (n < 2 or got[1, 1] == float("-inf"))
    bits = ((bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(rows, -1)[:, :n].bool()
    assert torch.equal(got[1:-1].isinf(), ~bits)
