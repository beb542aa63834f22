"""C kernels for the CPU, compiled at first use with the machine's C compiler into the user's cache, and called
through ctypes. Anything missing (no compiler, not Linux, LMCLI_NATIVE_KERNELS=0) leaves the PyTorch path.

The same sources are built once per instruction-set level (LEVELS): each C function has an AVX-512 body, an
AVX2 + FMA body and a plain one that any compiler vectorizes (ARM too), picked by the compiler flags of the level.
The best level this CPU has is the one loaded; LMCLI_CPU_ISA=avx512, =avx2 or =portable forces a lower one (so
that the lower paths are tested on a machine that has the higher ones too). Where LMCLI_KERNELS_DIR names a folder
of libraries built ahead of time for fixed instruction sets (kernels/prebuilt.py; a container image has no
compiler), the best one this CPU can run for the level is loaded instead of compiling."""

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import sys
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from lmcli.kernels.kv8 import Int8Cache

SOURCES = Path(__file__).parent / "cpu"
FLAGS = ["-O3", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]
# The dispatch table, best first: a level's name, the CPU features it needs (/proc/cpuinfo flags), its compiler
# flags. "amx" takes everything the CPU has (-march=native); "avx512" the same without AMX (AVX512-BF16 and VNNI
# where present).
LEVELS = (
    ("amx", ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "amx_bf16"), ["-march=native"]),
    ("avx512", ("avx512f", "avx512bw", "avx512vl"),
     ["-march=native", "-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8"]),
    ("avx2", ("avx2", "fma", "f16c"), ["-mavx2", "-mfma", "-mf16c"]),
    ("portable", (), []),
)
FILES = ("gemv.c", "gemm.c", "attention.c", "norm.c", "prefill.c", "fused.c", "blocks.c", "attention_s8.c", "unpack.c",
         "layer.c", "amx.c", "argmax.c", "mask.c", "gemma.c")
HEADERS = ("bf16.h",)
# each C entry point: (pointer arguments, then int64 arguments, then the types of any more arguments, result type)
SIGNATURES = {
    "gemv_bf16": (3, 3, (), None),
    "gemm_f32_bf16": (3, 3, (), ctypes.c_int),
    "paged_decode_attention": (6, 8, (ctypes.c_float,), ctypes.c_int),
    "add_rms_norm_bf16": (5, 2, (ctypes.c_float,), None),
    "prefill_attention": (5, 9, (ctypes.c_float,), ctypes.c_int),
    "rotary_store_bf16": (6, 5, (), None),
    "rotary_store_s8": (8, 5, (), None),
    "silu_mul_bf16": (2, 2, (), None),
    "gemma_norm_bf16": (3, 2, (ctypes.c_float,), None),
    "gelu_tanh_mul_bf16": (2, 2, (), None),
    "gemm_q4": (4, 5, (), ctypes.c_int),
    "gemm_s8": (4, 5, (), ctypes.c_int),
    "dequantize_blocks": (3, 4, (), ctypes.c_int),
    "decode_layer_blocks": (26, 9, (ctypes.c_float, ctypes.c_float), ctypes.c_int),
    "decode_layers_blocks": (9, 10, (ctypes.c_float, ctypes.c_float), ctypes.c_int),
    "decode_layers_gemma": (6, 9, (ctypes.c_float, ctypes.c_float), ctypes.c_int),
    "paged_decode_attention_s8": (8, 8, (ctypes.c_float,), ctypes.c_int),
    "amx_rows": (0, 0, (), ctypes.c_int),
    "argmax_f32": (2, 2, (), ctypes.c_int),
    "mask_logits_f32": (3, 3, (), None),
}


def missing_features(level: str) -> list:
    """The CPU features that this machine lacks for a level (empty: it can run it)."""
    have = set(_cpu_flags().split())
    return [f for f in dict((n, need) for n, need, _ in LEVELS)[level] if f not in have]


def available_levels() -> list:
    """The levels this CPU can run, best first (portable always)."""
    return [n for n, need, _ in LEVELS if not need or (x86() and not missing_features(n))]


def x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


@lru_cache(maxsize=None)
def level() -> str:
    """The level the kernels are built for here: LMCLI_CPU_ISA if set (a level this CPU can run), else the best."""
    forced = os.environ.get("LMCLI_CPU_ISA", "").strip().lower()
    if not forced:
        return available_levels()[0]
    names = [n for n, _, _ in LEVELS]
    if forced not in names:
        raise ValueError(f"LMCLI_CPU_ISA={forced}: not a kernel level (one of {', '.join(names)})")
    if forced not in available_levels():
        raise ValueError(f"LMCLI_CPU_ISA={forced}: this CPU lacks {', '.join(missing_features(forced))}")
    return forced


def bf16_products() -> bool:
    """Whether bfloat16 products run natively here (AVX512-BF16 or AMX at the level in force); elsewhere torch's
    bfloat16 GEMMs are emulated (about 8 GFLOP/s on an AVX2 EPYC against 39 in float32), so large products are
    computed in float32 instead."""
    flags = _cpu_flags().split()
    return level() in ("amx", "avx512") and ("avx512_bf16" in flags or "amx_bf16" in flags)


def describe() -> str:
    """One line for the server's start-up log: the kernel level and why, and how bfloat16 products run."""
    from lmcli.kernels import prebuilt

    why = "LMCLI_CPU_ISA" if os.environ.get("LMCLI_CPU_ISA") else f"the best of {', '.join(available_levels())}"
    kernels = level() if library() is not None else "none (LMCLI_NATIVE_KERNELS=0 or no C compiler): PyTorch only"
    loaded = prebuilt.find(level())
    if library() is not None and loaded:
        kernels += f" (prebuilt: {loaded})"
    products = ("bfloat16 products native" if bf16_products() else
                "no native bfloat16 products: bfloat16 weights kept, products of many rows in float32")
    if amx_rows():
        products += f"; 4-bit and 8-bit weights on AMX from {amx_rows()} rows"
    return f"CPU kernels: {kernels} ({why}); {products}"


def amx_rows() -> int:
    """The fewest rows of x that 4-bit and 8-bit products take on AMX tiles here (cpu/amx.c: the weights widened
    to bfloat16 in registers, x in bfloat16), 0 where they never do (no AMX at the level in force, or the OS
    refuses it)."""
    return _amx_rows(library())


@lru_cache(maxsize=None)
def _amx_rows(lib: Optional[ctypes.CDLL]) -> int:  # asked once per library: quantized_linear asks every call
    return lib.amx_rows() if lib is not None else 0


def library() -> Optional[ctypes.CDLL]:
    """The kernels of the level in force (see level()), or None where native kernels are off or cannot be built."""
    return build(level())


@lru_cache(maxsize=None)
def build(name: str) -> Optional[ctypes.CDLL]:
    if os.environ.get("LMCLI_NATIVE_KERNELS", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    from lmcli.kernels import prebuilt

    path = prebuilt.find(name) or _compiled(name)
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    for name, (pointers, ints, more, result) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int64] * ints + list(more)
        fn.restype = result
    return lib


def _compiled(name: str) -> Optional[Path]:
    """The level's library compiled for this CPU (-march=native) into the user's cache, once; None without a
    compiler."""
    from lmcli.known_models import cache_dir

    flags = [*FLAGS, *dict((n, f) for n, _, f in LEVELS)[name]]
    path = cache_dir() / "kernels" / f"lmcli-{name}-{key(flags, platform.processor(), _cpu_flags())}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            compile_and_link(os.environ.get("CC", "cc"), flags, tmp)
        except (OSError, subprocess.SubprocessError):
            return None
        tmp.replace(path)
    return path


def key(flags: list, *more: str) -> str:
    """A library's name tag: a digest of the sources, the flags and whatever else it was built for."""
    source = b"".join((SOURCES / f).read_bytes() for f in (*FILES, *HEADERS))
    return hashlib.sha256(source + " ".join(flags).encode() + b"linked apart" + "".join(more).encode()).hexdigest()[:16]


def compile_and_link(cc: str, flags: list, out: Path) -> None:
    """Each source compiled with flags (-ffast-math among them), then linked without -ffast-math: linked with it,
    gcc adds crtfastmath.o, whose constructor turns on flush-to-zero for the whole process that loads the library
    (numpy, hypothesis and the user's own code would then see no subnormal numbers)."""
    with tempfile.TemporaryDirectory() as build_dir:
        objects = []
        for f in FILES:
            objects.append(str(Path(build_dir) / (Path(f).stem + ".o")))
            subprocess.run([cc, *flags, "-c", str(SOURCES / f), "-o", objects[-1]], check=True, capture_output=True,
                           timeout=120)
        subprocess.run([cc, "-shared", "-fopenmp", *objects, "-o", str(out), "-lm"], check=True,
                       capture_output=True, timeout=120)


@lru_cache(maxsize=None)
def _cpu_flags() -> str:
    """The CPU's feature names (x86's "flags" line of /proc/cpuinfo, ARM's "Features")."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith(("flags", "Features"))), "")
            return line.partition(":")[2]
    except OSError:
        return ""


def argmax_f32(x: torch.Tensor) -> Optional[torch.Tensor]:
    """x (rows, n) float32 contiguous -> each row's first index of its maximum (int64), as torch.argmax(-1);
    None where a row holds NaN."""
    out = torch.empty(x.shape[0], dtype=torch.int64)
    return None if library().argmax_f32(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1]) else out


def mask_logits_f32(x: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: row rows[i] of x (float32 contiguous) keeps the tokens bitmask row i (int32 words) allows."""
    library().mask_logits_f32(x.data_ptr(), bitmask.data_ptr(), rows.data_ptr(), rows.shape[0], x.shape[1],
                              bitmask.shape[1])


def gemv_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (m, k) bfloat16 contiguous, w (n, k) bfloat16 contiguous -> (m, n) float32."""
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    library().gemv_bf16(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.shape[0], w.shape[0], w.shape[1])
    return y


def gemm_f32_bf16(x: torch.Tensor, w: torch.Tensor) -> Optional[torch.Tensor]:
    """x (m, k) float32 contiguous, w (n, k) bfloat16 contiguous -> (m, n) float32, the weight widened in registers
    (AVX2 + FMA); None where this level has no such kernel (portable)."""
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    failed = library().gemm_f32_bf16(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.shape[0], w.shape[0], w.shape[1])
    return None if failed else y


def paged_decode_attention(q, k_cache, v_cache, block_tables, lens, scale: float,
                           window: Optional[int] = None) -> Optional[torch.Tensor]:
    """q (seqs, heads, dim) bfloat16 (rows may be strided); caches (blocks, kv_heads, block_size, dim) bfloat16;
    block_tables (seqs, max_blocks) int64; lens (seqs,) int64 -> (seqs, heads, dim) bfloat16; None for shapes
    beyond the kernel (more than 16 query heads per kv head, head_dim over 256, blocks over 256 tokens). window:
    each query sees its last `window` keys only."""
    seqs, heads, dim = q.shape
    if q.stride(2) != 1 or q.stride(1) != dim:
        q = q.contiguous()
    out = torch.empty(q.shape, dtype=torch.bfloat16)
    failed = library().paged_decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                              block_tables.data_ptr(), lens.data_ptr(), out.data_ptr(), q.stride(0),
                                              seqs, heads, k_cache.shape[1], dim, k_cache.shape[2],
                                              block_tables.shape[1], window or 0, scale)
    return None if failed else out


def paged_decode_attention_s8(q, k_cache, v_cache, block_tables, lens, scale: float,
                              window: Optional[int] = None) -> Optional[torch.Tensor]:
    """As paged_decode_attention (window: each sequence attends its last `window` keys), over 8-bit caches
    (kernels/kv8.Int8Cache: codes and float16 scales read in place); None for shapes beyond the kernel (more than 8
    query heads per kv head, head_dim or blocks over 256)."""
    seqs, heads, dim = q.shape
    if q.stride(2) != 1 or q.stride(1) != dim:
        q = q.contiguous()
    out = torch.empty(q.shape, dtype=torch.bfloat16)
    failed = library().paged_decode_attention_s8(
        q.data_ptr(), k_cache.data.data_ptr(), k_cache.scale.data_ptr(), v_cache.data.data_ptr(),
        v_cache.scale.data_ptr(), block_tables.data_ptr(), lens.data_ptr(), out.data_ptr(), q.stride(0), seqs, heads,
        k_cache.shape[1], dim, k_cache.shape[2], block_tables.shape[1], window or 0, scale)
    return None if failed else out


def add_rms_norm_bf16(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float):
    """x, residual (rows, dim) and weight (dim,) bfloat16, contiguous -> (rms_norm(x + residual) * weight,
    x + residual), or with no residual (rms_norm(x) * weight, None)."""
    out = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else None
    library().add_rms_norm_bf16(x.data_ptr(), residual.data_ptr() if residual is not None else None,
                                weight.data_ptr(), out.data_ptr(), total.data_ptr() if total is not None else None,
                                x.shape[0], x.shape[1], eps)
    return out, total


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                      context: int, scale: float, out: torch.Tensor, window: Optional[int] = None) -> bool:
    """Causal attention of one sequence's L new tokens, q (L, heads, dim) bfloat16 (rows may be strided), the
    last L of its `context` positions, over the keys in the paged caches (blocks, kv_heads, block_size, dim)
    through block_table (int64); written into out (L, heads, dim) bfloat16. False where the kernel does not apply
    (no AVX512-BF16, head_dim not a multiple of 32 or over 256). window: each query sees its last `window` keys
    only."""
    length, heads, dim = q.shape
    if q.stride(2) != 1 or q.stride(1) != dim or out.stride(2) != 1 or out.stride(1) != dim:
        return False
    table = block_table.contiguous()
    failed = library().prefill_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), table.data_ptr(),
                                         out.data_ptr(), length, context, heads, k_cache.shape[1], dim,
                                         k_cache.shape[2], q.stride(0), out.stride(0), window or 0, scale)
    return not failed


def rotary_store_bf16(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """qkv (tokens, heads + 2 * kv_heads, dim) bfloat16, contiguous: q and k rotated in place, then k and v
    written to the caches (blocks, kv_heads, block_size, dim) at slot_mapping (int64); cos, sin (tokens, dim)."""
    library().rotary_store_bf16(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(),
                                k_cache.data_ptr(), v_cache.data_ptr(), qkv.shape[0], heads, kv_heads,
                                qkv.shape[2], k_cache.shape[2])


def rotary_store_s8(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor, k_cache,
                    v_cache, slot_mapping: torch.Tensor) -> None:
    """As rotary_store_bf16, into 8-bit caches (kernels/kv8.Int8Cache: codes and float16 scales), each k and v row
    quantized as kv8.quantize does."""
    library().rotary_store_s8(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(),
                              k_cache.data.data_ptr(), k_cache.scale.data_ptr(), v_cache.data.data_ptr(),
                              v_cache.scale.data_ptr(), qkv.shape[0], heads, kv_heads, qkv.shape[2],
                              k_cache.shape[2])


def silu_mul_bf16(x: torch.Tensor) -> torch.Tensor:
    """x (rows, 2n) bfloat16, contiguous -> silu(x[:, :n]) * x[:, n:] (rows, n)."""
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
    library().silu_mul_bf16(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1] // 2)
    return out


def gemma_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (rows, dim) and weight (dim,) bfloat16, contiguous -> Gemma's rms_norm(x) * (1 + weight)."""
    out = torch.empty_like(x)
    library().gemma_norm_bf16(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps)
    return out


def gelu_tanh_mul_bf16(x: torch.Tensor) -> torch.Tensor:
    """x (rows, 2n) bfloat16, contiguous -> gelu_tanh(x[:, :n]) * x[:, n:] (rows, n)."""
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
    library().gelu_tanh_mul_bf16(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1] // 2)
    return out


def gemm_blocks(kernel: str, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                n: int) -> Optional[torch.Tensor]:
    """x (m, k) bfloat16 or float32, contiguous, times a weight (n, k) in cpu/blocks.c's tiles: kernel gemm_s8 (int8
    weights, kernels/int8.py) or gemm_q4 (4-bit blocks, kernels/int4.py) -> (m, n) in x's dtype, x quantized per
    block of 32 on the way (from amx_rows() rows, x in bfloat16 times the weight widened to bfloat16); None if
    the kernel could not allocate."""
    m, k = x.shape
    y = torch.empty(m, n, dtype=x.dtype)
    bf16 = int(x.dtype == torch.bfloat16)
    failed = getattr(library(), kernel)(x.data_ptr(), codes.data_ptr(), scales.data_ptr(), y.data_ptr(), m, n, k,
                                        bf16, bf16)
    return None if failed else y


def dequantize_blocks(bits: int, codes: torch.Tensor, scales: torch.Tensor, n: int, k: int,
                      dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A weight in cpu/blocks.c's tiles (bits 4: kernels/int4.py, 8: kernels/int8.py) as rows (n, k) of dtype
    (bfloat16 or float32): exactly the weight the byte products multiply by."""
    w = torch.empty(n, k, dtype=dtype)
    failed = library().dequantize_blocks(codes.data_ptr(), scales.data_ptr(), w.data_ptr(), bits, n, k,
                                         int(dtype == torch.bfloat16))
    return None if failed else w


def cache_tensors(k_cache, v_cache) -> tuple:
    """The layer calls' cache arguments: K and V data, then their scales (None for a bfloat16 cache)."""
    if isinstance(k_cache, Int8Cache):
        return k_cache.data, v_cache.data, k_cache.scale, v_cache.scale
    return k_cache, v_cache, None, None


def decode_layer_blocks(x: torch.Tensor, residual: Optional[torch.Tensor], norms: tuple, weights: tuple, bits: int,
                        cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, block_tables: torch.Tensor, lens: torch.Tensor, eps: float,
                        scale: float, heads: int, kv_heads: int, dim: int, inter: int):
    """One Llama decoder layer for a batch of decodes in one call (cpu/layer.c): x, residual (m, hidden) bfloat16
    (residual None for the first layer); norms (input, post-attention, q_norm, k_norm, qkv_bias: q_norm and k_norm
    None, or Qwen3's norms over each head's query and key; qkv_bias None, or Qwen2's bias of the qkv product);
    weights (qkv, o, gate_up, down), each an int4.Int4Weight or int8.Int8Weight of `bits`; the caches bfloat16
    tensors or both kv8.Int8Cache; the rest as rotary_store_bf16 and paged_decode_attention take them. Returns (the
    MLP's output, the residual stream), as DecoderLayer.forward does, or None where the call declined (nothing
    changed but cache rows it would write again)."""
    m, hidden = x.shape
    x_out, res_out = torch.empty_like(x), torch.empty_like(x)
    pointers = [x, residual, x_out, res_out, *norms]
    for w in weights:
        pointers += [w.codes, w.scales]
    pointers += [cos, sin, slots, *cache_tensors(k_cache, v_cache), block_tables, lens]
    failed = library().decode_layer_blocks(*(None if t is None else t.data_ptr() for t in pointers), bits, m, hidden,
                                           heads, kv_heads, dim, inter, k_cache.shape[2], block_tables.shape[1], eps,
                                           scale)
    return None if failed else (x_out, res_out)


def decode_layers_blocks(table: torch.Tensor, x: torch.Tensor, bits: int, cos: torch.Tensor, sin: torch.Tensor,
                         slots: torch.Tensor, block_tables: torch.Tensor, lens: torch.Tensor, eps: float,
                         scale: float, heads: int, kv_heads: int, dim: int, inter: int, block_size: int):
    """Every layer of a decode step in one call (cpu/layer.c): table (layers, 17) int64, each layer's addresses as
    kernels.decode_layer_table builds them; x (m, hidden) bfloat16, the embeddings; the rest as decode_layer_blocks
    takes them. Returns the last layer's (MLP output, residual stream), or None where the call declined."""
    x_out, res_out = torch.empty_like(x), torch.empty_like(x)
    failed = library().decode_layers_blocks(
        table.data_ptr(), x.data_ptr(), x_out.data_ptr(), res_out.data_ptr(), cos.data_ptr(), sin.data_ptr(),
        slots.data_ptr(), block_tables.data_ptr(), lens.data_ptr(), table.shape[0], bits, *x.shape, heads,
        kv_heads, dim, inter, block_size, block_tables.shape[1], eps, scale)
    return None if failed else (x_out, res_out)


def decode_layers_gemma(table: torch.Tensor, x: torch.Tensor, bits: int, rope: list, groups: list,
                        lens: torch.Tensor, eps: float, scale: float, heads: int, kv_heads: int, dim: int, inter: int,
                        block_size: int) -> Optional[torch.Tensor]:
    """Every layer of a Gemma 3 decode step in one call (cpu/layer.c): table (layers, 21) int64 as
    kernels.gemma_decode_table builds it; x (m, hidden) bfloat16, the scaled embeddings; rope [(cos, sin) of the
    global table, (cos, sin) of the local one], each (m, dim) bfloat16; groups: each KV group's (slots (m,),
    decode block tables (m, width)) int64, contiguous; lens (m,). Returns the last layer's output, or None where the
    call declined."""
    x_out = torch.empty_like(x)
    group_rows = torch.tensor([[s.data_ptr(), t.data_ptr(), t.shape[1]] for s, t in groups], dtype=torch.int64)
    rope_ptrs = (ctypes.c_void_p * 4)(*(t.data_ptr() for pair in rope for t in pair))
    failed = library().decode_layers_gemma(
        table.data_ptr(), group_rows.data_ptr(), ctypes.addressof(rope_ptrs), x.data_ptr(), x_out.data_ptr(),
        lens.data_ptr(), table.shape[0], bits, *x.shape, heads, kv_heads, dim, inter, block_size, eps, scale)
    return None if failed else x_out
