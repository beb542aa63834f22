"""The ops the model runs, behind one small interface. Every op has its PyTorch reference (the CPU path and the
test oracle); where a faster kernel exists for the device, it is picked here."""

import importlib
import os
import sys
from typing import Optional

import torch

from lmcli.errors import UserError
from lmcli.kernels import native, reference
from lmcli.kernels.kv8 import Int8Cache

# LMCLI_KERNELS=triton: the Triton kernels also on a machine without a GPU, under Triton's interpreter (slow: tests)
SETTING = "LMCLI_KERNELS"

# Up to this many tokens the native kernel beats torch's GEMM when the weights come from memory, as they do in a
# step (all 120 projections of SmolLM2: 9.3 vs 17.8 ms at 4 rows, 16.3-17.2 vs 21.0-22.4 ms at 8, 27.9-29.5 vs
# 26.8-30.2 ms at 12, 34.0 vs 30.6 ms at 16).
GEMV_MAX_ROWS = 8
# Without native bfloat16 products, up to this many rows the native float32 x bfloat16 GEMM beats torch's float32
# GEMM on the widened weight (the 120 projections on an AVX2 EPYC: 67 vs 304 ms at 32 rows, 299 vs 322 at 128,
# 1143 vs 961 at 512: beyond it the widening is paid once for many rows and torch's blocking wins).
GEMM_MAX_ROWS = 128
# From this many rows a 4-bit or 8-bit weight is widened back to rows (cpu/unpack.c: the 120 projections of SmolLM2
# in 27 ms, in bfloat16) and multiplied by torch's GEMM, which then beats the byte products (Intel Xeon with
# AVX-512, those projections from int4: 94 against 140 ms at 128 rows, 232 against 554 at 512; 70 against 73 at 64).
WIDEN_MIN_ROWS = 96
# Where the native products run on AMX (native.amx_rows()), they beat the widened weight up to 256 rows and tie at
# 512 (the same projections: 128 rows 64.5 against 93.8 ms, 256 114.8 against 160.9, 512 232 against 236): the
# widening starts there.
AMX_WIDEN_MIN_ROWS = 512


def triton_selected(device: torch.device) -> bool:
    """Whether the ops run as Triton kernels: on GPUs, and where LMCLI_KERNELS=triton asks for them."""
    return device.type == "cuda" or os.environ.get(SETTING) == "triton"


def triton_kernel(name: str):
    """lmcli.kernels.triton.<name>. Without a GPU its kernels need Triton's interpreter, which is chosen when triton
    is first imported: set here if it was not imported yet, else TRITON_INTERPRET=1 must have been set before."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            raise UserError(f"{SETTING}=triton on a machine without a GPU runs Triton's interpreter, which must be "
                            "chosen before triton is imported: set TRITON_INTERPRET=1 in the environment too")
        os.environ["TRITON_INTERPRET"] = "1"
    return importlib.import_module(f"lmcli.kernels.triton.{name}")


def _native_caches(k_cache, v_cache) -> bool:
    """Whether the native kernels can read and write these caches in place: bfloat16 tensors, or kv8.Int8Cache
    pairs (codes and scales contiguous on CPU)."""
    if isinstance(k_cache, Int8Cache):
        return all(t.is_contiguous() and t.device.type == "cpu" for c in (k_cache, v_cache) for t in (c.data, c.scale))
    return _native_bf16(k_cache, v_cache)


def _native_bf16(*tensors) -> bool:
    return (all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)
            and native.library() is not None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor = None, out_dtype=None) -> torch.Tensor:
    """x (tokens, in) . weight (out, in)^T (+ bias), in out_dtype (default: x's dtype)."""
    if x.shape[0] <= GEMV_MAX_ROWS and x.dtype == torch.bfloat16 and _native_bf16(weight):
        y = native.gemv_bf16(x.contiguous(), weight)
        if bias is not None:
            y += bias
        return y.to(out_dtype or x.dtype)
    if x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu" and not native.bf16_products():
        # torch's bfloat16 GEMM would be emulated on this CPU: a float32 product, the weight widened in registers
        # by the native kernel (AVX2), else widened for this product only
        xf = x.float().contiguous()
        y = native.gemm_f32_bf16(xf, weight) if x.shape[0] <= GEMM_MAX_ROWS and _native_bf16(weight) else None
        if y is None:
            return reference.linear(xf, weight.float(), None if bias is None else bias.float(), out_dtype or x.dtype)
        if bias is not None:
            y += bias
        return y.to(out_dtype or x.dtype)
    return reference.linear(x, weight, bias, out_dtype)


def quantized_linear(x: torch.Tensor, weight, bias: torch.Tensor = None) -> torch.Tensor:
    """x (tokens, in) . W^T (+ bias) in x's dtype, W an int8.Int8Weight or int4.Int4Weight: through its native kernel
    (x bfloat16 or float32; from WIDEN_MIN_ROWS rows, or AMX_WIDEN_MIN_ROWS where the kernel runs on AMX, torch's
    GEMM on the weight widened natively: in bfloat16 where the CPU multiplies it natively, else in float32), else
    on the dequantized weight."""
    y = None
    if native.library() is not None and x.dtype in (torch.bfloat16, torch.float32):
        if x.shape[0] >= (AMX_WIDEN_MIN_ROWS if native.amx_rows() else WIDEN_MIN_ROWS):
            work = torch.bfloat16 if x.dtype == torch.bfloat16 and native.bf16_products() else torch.float32
            w = native.dequantize_blocks(weight.bits, weight.codes, weight.scales, *weight.shape, work)
            if w is not None:
                y = reference.linear(x.to(work), w, out_dtype=x.dtype)
        if y is None:
            y = native.gemm_blocks(weight.kernel, x.contiguous(), weight.codes, weight.scales, weight.shape[0])
    if y is None:
        y = reference.linear(x.float(), weight.dequantize(), out_dtype=x.dtype)
    return y if bias is None else y.add_(bias)


def decode_layer(x: torch.Tensor, residual, norms: tuple, weights: tuple, cos, sin, batch, k_cache, v_cache,
                 eps: float, scale: float, heads: int, kv_heads: int, dim: int):
    """A Llama decoder layer (input norm, qkv with Qwen2's bias, Qwen3's norms over each head's query and key, rotary
    and cache store, attention, o, post-attention norm, gate_up, silu, down) for a batch of decodes in one native
    call (cpu/layer.c: the same kernels on the same values as op by op), where it applies: norms (input,
    post-attention, q_norm, k_norm, qkv_bias; q_norm and k_norm None without them, qkv_bias None without one);
    fewer than WIDEN_MIN_ROWS sequences and no prefill chunk; every projection (qkv, o, gate_up, down) in 4-bit or
    8-bit blocks of one kind; bfloat16 activations and norms on CPU, the KV cache in bfloat16 or 8-bit
    (kv8.Int8Cache, up to 8 query heads a kv head). Returns (the MLP's output, the residual stream), or None: then
    the caller runs the layer op by op."""
    bits = _layer_bits(norms, weights, k_cache, v_cache, heads, kv_heads, dim)
    if bits is None or not _decode_batch(x, residual, cos, sin, batch):
        return None
    return native.decode_layer_blocks(x, residual, norms, weights, bits, cos, sin, batch.slot_mapping,
                                      k_cache, v_cache, batch.decode_block_tables, batch.decode_lens, eps, scale,
                                      heads, kv_heads, dim, weights[3].shape[1])


def _layer_bits(norms, weights, k_cache, v_cache, heads: int, kv_heads: int, dim: int) -> Optional[int]:
    """The weights' bits where a layer's parameters and caches suit the native decode layer, else None."""
    bits = {getattr(w, "bits", None) for w in weights}
    if len(bits) != 1 or None in bits or weights[0].shape[0] != (heads + 2 * kv_heads) * dim:
        return None
    if (norms[2] is None) != (norms[3] is None):
        return None
    if len(norms) == 5 and norms[4] is not None and norms[4].numel() != weights[0].shape[0]:
        return None  # a bias for the whole qkv product (the C reads that many)
    present = [n for n in norms if n is not None]
    return bits.pop() if _native_bf16(*present) and _native_caches(k_cache, v_cache) else None


def _native_rows(x, weight) -> bool:
    """A norm's bfloat16 rows on CPU for a native kernel, as a copy where x is a strided view (one KV head's key rows
    of a qkv: the one-call layers read them so)."""
    return x.dim() == 2 and _native_bf16(weight) and x.dtype == torch.bfloat16 and x.device.type == "cpu"


def _decode_batch(x, residual, cos, sin, batch) -> bool:
    """Whether a step's batch and activations suit the native decode layer: decodes only, few enough rows, the C
    kernels' backend (with LMCLI_KERNELS=triton the layers op by op run Triton's)."""
    if batch.prefills or x.shape[0] >= WIDEN_MIN_ROWS or x.dim() != 2 or triton_selected(x.device):
        return False
    return _native_bf16(x, cos, sin, *(() if residual is None else (residual,)))


def decode_layer_table(layers: list, extra: Optional[list] = None) -> Optional[tuple]:
    """For decode_layers: layers, each (norms, weights, k_cache, v_cache, eps, scale, heads, kv_heads, dim) as
    decode_layer takes them (None for a layer that cannot run natively); (their addresses (layers, 17) int64, the
    settings they share), or None unless every layer suits decode_layer alike. extra: more int64 columns a layer
    (gemma_decode_table's). Built once: the parameters and the caches stay where they are."""
    rows, shared = [], set()
    for i, layer in enumerate(layers):
        if layer is None:
            return None
        norms, weights, k_cache, v_cache, *settings = layer
        bits = _layer_bits(norms, weights, k_cache, v_cache, *settings[2:])
        if bits is None:
            return None
        caches = native.cache_tensors(k_cache, v_cache)
        rows.append([0 if t is None else t.data_ptr() for t in norms]
                    + [t.data_ptr() for w in weights for t in (w.codes, w.scales)]
                    + [0 if t is None else t.data_ptr() for t in caches] + (extra[i] if extra else []))
        shared.add((bits, caches[2] is not None, k_cache.shape[2], weights[3].shape[1], *settings))
    if len(shared) != 1:
        return None
    return torch.tensor(rows, dtype=torch.int64), shared.pop()


def decode_layers(x: torch.Tensor, table: tuple, cos, sin, batch):
    """Every layer of a decode step in one native call (decode_layer for each in turn, without the Python between
    them): table from decode_layer_table. Returns the last layer's (MLP output, residual stream), or None: then
    the caller runs the layers one by one."""
    if not _decode_batch(x, None, cos, sin, batch):
        return None
    addresses, (bits, _, block_size, inter, eps, scale, heads, kv_heads, dim) = table
    return native.decode_layers_blocks(addresses, x, bits, cos, sin, batch.slot_mapping, batch.decode_block_tables,
                                       batch.decode_lens, eps, scale, heads, kv_heads, dim, inter, block_size)


def gemma_decode_table(layers: list, extra: list) -> Optional[tuple]:
    """For gemma_decode_layers: layers as decode_layer_table takes them, with Gemma's six norms (input,
    post-attention, pre-feedforward, post-feedforward, q_norm, k_norm); extra: each layer's (KV group, sliding window
    or 0, rotary table: 0 global, 1 local). None where a layer cannot run natively."""
    if any(layer is None or len(layer[0]) != 6 or None in layer[0] for layer in layers):
        return None
    table = decode_layer_table(layers, extra)
    return None if table is None else (*table, 1 + max(group for group, _, _ in extra))


def gemma_decode_layers(x: torch.Tensor, table: tuple, rope: list, batch) -> Optional[torch.Tensor]:
    """Every Gemma 3 layer of a decode step in one native call (cpu/layer.c's decode_layers_gemma: each layer's
    kernels as DecoderLayer runs them one by one, windows and KV groups included): x the scaled embeddings, table
    from gemma_decode_table, rope [(cos, sin) global, (cos, sin) local]. The last layer's output, or None: then the
    caller runs the layers one by one."""
    if not _decode_batch(x, None, *rope[0], batch) or not _native_bf16(*rope[1]):
        return None
    addresses, (bits, _, block_size, inter, eps, scale, heads, kv_heads, dim), num_groups = table
    if len(batch.groups) + 1 != num_groups:
        return None
    groups = []
    for g in range(num_groups):
        view = batch.group(g)
        slots, tables = view.slot_mapping, view.decode_block_tables
        if not (slots.is_contiguous() and tables.is_contiguous() and slots.dtype == tables.dtype == torch.int64):
            return None
        groups.append((slots, tables))
    lens = batch.decode_lens.contiguous()
    return native.decode_layers_gemma(addresses, x, bits, rope, groups, lens, eps, scale, heads, kv_heads, dim, inter,
                                      block_size)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Each row's first index of its maximum (rows, n) -> (rows,) int64, as x.argmax(-1); float32 on CPU natively
    (64 rows of 49152 logits: torch's argmax 4.2 ms, its max alone 0.3)."""
    if x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous() and x.device.type == "cpu" \
            and native.library() is not None:
        out = native.argmax_f32(x)
        if out is not None:
            return out
    return x.argmax(-1)


def mask_logits(x: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: row rows[i] of the logits x (rows, vocab) keeps the tokens that bitmask row i allows (int32 words,
    bit t % 32 of word t // 32 for token t), the others become -inf (structured output's grammar)."""
    if x.dtype == torch.float32 and x.is_contiguous() and x.device.type == "cpu" and native.library() is not None:
        native.mask_logits_f32(x, rows.to(torch.int64).contiguous(), bitmask.contiguous())
        return
    reference.mask_logits(x, rows, bitmask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if triton_selected(x.device):
        return triton_kernel("norm").rms_norm(x, weight, eps)
    if _native_rows(x, weight):
        return native.add_rms_norm_bf16(x.contiguous(), None, weight, eps)[0]
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual); bfloat16 on CPU in one native pass; with Triton, the sum is written
    into residual."""
    if triton_selected(x.device):
        return triton_kernel("norm").add_rms_norm(x, residual, weight, eps)
    if _native_bf16(x, residual, weight) and x.dim() == 2:
        return native.add_rms_norm_bf16(x, residual, weight, eps)
    return reference.add_rms_norm(x, residual, weight, eps)


def rotary_store(qkv: torch.Tensor, heads: int, kv_heads: int, cos, sin, k_cache, v_cache, slot_mapping):
    """qkv (tokens, heads + 2 * kv_heads, head_dim): rotary embedding on q and k, then k and v stored in the paged
    caches at slot_mapping. Returns q, k, v (tokens, heads or kv_heads, head_dim). bfloat16 on CPU: one native
    pass, in place (also into the 8-bit cache, quantizing each row as kv8.quantize does)."""
    dim = qkv.shape[-1]
    if _native_bf16(qkv, cos, sin) and _native_caches(k_cache, v_cache) and dim % 2 == 0 and dim <= 512:
        store = native.rotary_store_s8 if isinstance(k_cache, Int8Cache) else native.rotary_store_bf16
        store(qkv, heads, kv_heads, cos, sin, k_cache, v_cache, slot_mapping.contiguous())
        qk = qkv
    else:
        qk = reference.rotary(qkv[:, :heads + kv_heads], cos, sin)  # q and k in one pass
        reference.store_kv(qk[:, heads:], qkv[:, heads + kv_heads:], k_cache, v_cache, slot_mapping,
                           k_cache.shape[2])
    return qk[:, :heads], qk[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x (tokens, 2 * intermediate): silu(gate) * up."""
    if triton_selected(x.device):
        return triton_kernel("activation").silu_and_mul(x)
    if _native_bf16(x) and x.dim() == 2:
        return native.silu_mul_bf16(x)
    return reference.silu_and_mul(x)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMS norm over the last dimension: x / rms(x) * (1 + weight); one native pass for bfloat16 rows on
    CPU (torch's is six ops)."""
    if _native_rows(x, weight):
        return native.gemma_norm_bf16(x.contiguous(), weight, eps)
    return reference.gemma_rms_norm(x, weight, eps)


def gelu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x (tokens, 2 * intermediate): gelu_tanh(gate) * up (Gemma's GeGLU)."""
    if _native_bf16(x) and x.dim() == 2:
        return native.gelu_tanh_mul_bf16(x)
    return reference.gelu_and_mul(x)


def paged_attention(q, k, v, k_cache, v_cache, batch, scale: float, window: Optional[int] = None) -> torch.Tensor:
    """See reference.paged_attention; in bfloat16 on CPU, the native kernels read K/V in place: one for the
    decodes, one for each chunk of several tokens (faster than torch's CPU flash kernel at every size measured:
    64 tokens 0.054 vs 0.172 ms, 1024 tokens 6.7 vs 19.5 ms, 40 tokens after 1060 cached ones 0.57 vs 1.48 ms),
    both with sliding windows. Without native bfloat16 products (AVX2 CPUs, or a lower LMCLI_CPU_ISA) the chunks
    run in float32. Over the 8-bit cache (kernels/kv8.py) the decodes have a native kernel of their own, and
    chunks widen their context's blocks to bfloat16 for the chunk kernel (float32 where it does not apply)."""
    decode = chunk = None
    lib = q.dtype == torch.bfloat16 and q.device.type == "cpu" and native.library() is not None
    if isinstance(k_cache, Int8Cache):

        def decode_s8(qd, kc, vc, b, s, w):
            out = native.paged_decode_attention_s8(qd, kc, vc, b.decode_block_tables, b.decode_lens, s, w) \
                if lib else None
            return reference.decode_attention(qd, kc, vc, b, s, w) if out is None else out
        chunk = s8_chunk_attention if lib and native.bf16_products() else float32_chunk_attention
        return reference.paged_attention(q, k, v, k_cache, v_cache, batch, scale, decode_s8, chunk, window)
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        chunk = native.prefill_attention if lib and native.bf16_products() else float32_chunk_attention
    if lib:

        def decode(qd, kc, vc, b, s, w):
            out = native.paged_decode_attention(qd, kc, vc, b.decode_block_tables, b.decode_lens, s, w)
            return reference.decode_attention(qd, kc, vc, b, s, w) if out is None else out
    return reference.paged_attention(q, k, v, k_cache, v_cache, batch, scale, decode, chunk, window)


def s8_chunk_attention(q, k_cache: Int8Cache, v_cache: Int8Cache, block_table, context: int, scale: float,
                       out, window: Optional[int] = None) -> bool:
    """One sequence's chunk over the 8-bit cache: the context's blocks widened to bfloat16 (the default cache's
    precision), then the native chunk kernel (float32 through torch where it does not apply). 64 prompts of 64
    tokens, 30 layers: see docs/benchmarks.md."""
    blocks = block_table[:-(-context // k_cache.shape[2])]
    widened = [c.index_select(0, blocks).bfloat16() for c in (k_cache, v_cache)]
    if native.prefill_attention(q, *widened, torch.arange(len(blocks)), context, scale, out, window):
        return True
    return float32_chunk_attention(q, k_cache, v_cache, block_table, context, scale, out, window)


def float32_chunk_attention(q, k_cache, v_cache, block_table, context: int, scale: float, out,
                            window: Optional[int] = None) -> bool:
    """One sequence's chunk (see reference.paged_attention) in float32, for CPUs without native bfloat16 products,
    where torch's bfloat16 attention would be emulated."""
    length = q.shape[0]
    ki = reference.gather_context(k_cache, block_table, context).float()
    vi = reference.gather_context(v_cache, block_table, context).float()
    mask = reference.chunk_mask(length, context, window, q.device)
    out.copy_(reference.sdpa(q.float().transpose(0, 1), ki, vi, attn_mask=mask, scale=scale).transpose(0, 1))
    return True
