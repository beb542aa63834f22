/* One decoder layer of the Llama family for a batch of decodes (one new token a sequence) on 4-bit or 8-bit weights,
   in one call: the same kernels, in the same order and on the same values, as engine/models/llama.py's DecoderLayer
   runs them one by one from Python (there, between the kernels, the Python of a one-row step cost about as much as
   the kernels themselves). Built by lmcli/kernels/native.py. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

void add_rms_norm_bf16(const uint16_t *x, const uint16_t *residual, const uint16_t *weight, uint16_t *out,
                       uint16_t *sum, int64_t rows, int64_t dim, float eps);
int gemm_q4(const void *x, const uint8_t *codes, const uint16_t *scales, void *y, int64_t m, int64_t n, int64_t k,
            int64_t x_bf16, int64_t y_bf16);
int gemm_s8(const void *x, const uint8_t *codes, const float *ws, void *y, int64_t m, int64_t n, int64_t k,
            int64_t x_bf16, int64_t y_bf16);
void rotary_store_bf16(uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, const int64_t *slots,
                       uint16_t *k_cache, uint16_t *v_cache, int64_t tokens, int64_t heads, int64_t kv_heads,
                       int64_t dim, int64_t block_size);
int paged_decode_attention(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                           const int64_t *block_tables, const int64_t *lens, uint16_t *out, int64_t q_stride,
                           int64_t seqs, int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size,
                           int64_t max_blocks, int64_t window, float scale);
void silu_mul_bf16(const uint16_t *x, uint16_t *out, int64_t rows, int64_t n);
void rotary_store_s8(uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, const int64_t *slots, int8_t *k_codes,
                     uint16_t *k_scales, int8_t *v_codes, uint16_t *v_scales, int64_t tokens, int64_t heads,
                     int64_t kv_heads, int64_t dim, int64_t block_size);
int paged_decode_attention_s8(const uint16_t *q, const int8_t *k, const uint16_t *ks, const int8_t *v,
                              const uint16_t *vs, const int64_t *block_tables, const int64_t *lens, uint16_t *out,
                              int64_t q_stride, int64_t seqs, int64_t heads, int64_t kv_heads, int64_t dim,
                              int64_t block_size, int64_t max_blocks, int64_t window, float scale);

static int product(int64_t bits, const void *x, const uint8_t *codes, const void *scales, void *y, int64_t m,
                   int64_t n, int64_t k) {
    return bits == 4 ? gemm_q4(x, codes, (const uint16_t *)scales, y, m, n, k, 1, 1)
                     : gemm_s8(x, codes, (const float *)scales, y, m, n, k, 1, 1);
}

static void add_bf16(const uint16_t *a, const uint16_t *b, uint16_t *out, int64_t n) {  /* as torch adds bfloat16 */
    for (int64_t i = 0; i < n; i++) out[i] = f2bf16(bf16f(a[i]) + bf16f(b[i]));
}

/* Rotary on q and k, k and v stored, then decode attention, over the bfloat16 cache or (k_scales not NULL) the
   8-bit one; window 0: none. 0 on success. */
static int store_and_attend(uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, const int64_t *slots,
                            void *k_cache, void *v_cache, uint16_t *k_scales, uint16_t *v_scales,
                            const int64_t *block_tables, const int64_t *lens, uint16_t *att, int64_t m, int64_t heads,
                            int64_t kv_heads, int64_t dim, int64_t block_size, int64_t max_blocks, int64_t window,
                            float scale) {
    const int64_t width = (heads + 2 * kv_heads) * dim;
    if (k_scales) {
        rotary_store_s8(qkv, cos, sin, slots, k_cache, k_scales, v_cache, v_scales, m, heads, kv_heads, dim,
                        block_size);
        return paged_decode_attention_s8(qkv, k_cache, k_scales, v_cache, v_scales, block_tables, lens, att, width, m,
                                         heads, kv_heads, dim, block_size, max_blocks, window, scale);
    }
    rotary_store_bf16(qkv, cos, sin, slots, k_cache, v_cache, m, heads, kv_heads, dim, block_size);
    return paged_decode_attention(qkv, k_cache, v_cache, block_tables, lens, att, width, m, heads, kv_heads, dim,
                                  block_size, max_blocks, window, scale);
}

/* x (m, hidden) bfloat16: the layer's input (the previous layer's MLP output, or the embeddings for the first layer,
   where residual is NULL); residual (m, hidden) or NULL. Writes x_out (the MLP's output) and res_out (the residual
   stream after the attention), both (m, hidden); x and residual are left as they were. Weights: codes and scales of
   qkv ((heads + 2 kv_heads) dim, hidden), o (hidden, heads dim), gate and up (2 inter, hidden), down (hidden, inter)
   in cpu/blocks.c's layout, all of `bits` 4 or 8; norm weights (hidden,); cos, sin (m, dim); slots (m,); the paged
   caches, block tables (m, max_blocks) and lens (m,) as paged_decode_attention takes them, or with k_scales and
   v_scales (not NULL) the 8-bit caches (int8 codes and their float16 scales: kernels/kv8.py); q_norm and k_norm
   (dim,), or NULL: an RMS norm over each head's query and key before rotary (Qwen3); qkv_bias (width,) or NULL
   (Qwen2), added to the qkv product in bfloat16 as torch adds it; the norms' eps.
   0 on success; -1 where a shape is beyond the kernels or memory ran out: x and residual are as they were, so the
   caller runs the layer op by op instead (writing the same cache rows again). */
int decode_layer_blocks(const uint16_t *x, const uint16_t *residual, uint16_t *x_out, uint16_t *res_out,
                        const uint16_t *norm1, const uint16_t *norm2, const uint16_t *q_norm,
                        const uint16_t *k_norm, const uint16_t *qkv_bias, const uint8_t *qkv_c, const void *qkv_s,
                        const uint8_t *o_c, const void *o_s, const uint8_t *gu_c, const void *gu_s,
                        const uint8_t *down_c, const void *down_s, const uint16_t *cos, const uint16_t *sin,
                        const int64_t *slots, void *k_cache, void *v_cache, uint16_t *k_scales,
                        uint16_t *v_scales, const int64_t *block_tables,
                        const int64_t *lens, int64_t bits, int64_t m, int64_t hidden, int64_t heads,
                        int64_t kv_heads, int64_t dim, int64_t inter, int64_t block_size, int64_t max_blocks,
                        float eps, float scale) {
    if ((bits != 4 && bits != 8) || kv_heads < 1 || heads % kv_heads || heads / kv_heads > (k_scales ? 8 : 16) ||
        dim > 256 || dim % 2 || block_size > 256)
        return -1;
    const int64_t width = (heads + 2 * kv_heads) * dim;
    uint16_t *h = malloc(2 * (size_t)(m * hidden)), *qkv = malloc(2 * (size_t)(m * width));
    uint16_t *att = malloc(2 * (size_t)(m * heads * dim)), *gu = malloc(4 * (size_t)(m * inter));
    uint16_t *act = malloc(2 * (size_t)(m * inter)), *o = malloc(2 * (size_t)(m * hidden));
    int failed = !h || !qkv || !att || !gu || !act || !o;
    if (!failed) {
        if (residual) {
            add_rms_norm_bf16(x, residual, norm1, h, res_out, m, hidden, eps);
        } else {
            add_rms_norm_bf16(x, NULL, norm1, h, NULL, m, hidden, eps);
            memcpy(res_out, x, 2 * (size_t)(m * hidden));
        }
        failed = product(bits, h, qkv_c, qkv_s, qkv, m, width, hidden);
    }
    for (int64_t i = 0; !failed && qkv_bias && i < m; i++) add_bf16(qkv + i * width, qkv_bias, qkv + i * width, width);
    if (!failed && q_norm) {  /* in place, as the op-by-op path's norm over each head's row */
        for (int64_t i = 0; i < m; i++) {
            uint16_t *row = qkv + i * width;
            add_rms_norm_bf16(row, NULL, q_norm, row, NULL, heads, dim, eps);
            add_rms_norm_bf16(row + heads * dim, NULL, k_norm, row + heads * dim, NULL, kv_heads, dim, eps);
        }
    }
    if (!failed)  /* from here the cache is written (a failure below still leaves x and residual unchanged) */
        failed = store_and_attend(qkv, cos, sin, slots, k_cache, v_cache, k_scales, v_scales, block_tables, lens, att,
                                  m, heads, kv_heads, dim, block_size, max_blocks, 0, scale);
    if (!failed) {
        failed = product(bits, att, o_c, o_s, o, m, hidden, heads * dim);
    }
    if (!failed) {
        add_rms_norm_bf16(o, res_out, norm2, h, res_out, m, hidden, eps);
        failed = product(bits, h, gu_c, gu_s, gu, m, 2 * inter, hidden);
    }
    if (!failed) {
        silu_mul_bf16(gu, act, m, inter);
        failed = product(bits, act, down_c, down_s, x_out, m, hidden, inter);
    }
    free(h), free(qkv), free(att), free(gu), free(act), free(o);
    return failed ? -1 : 0;
}

/* Every layer of a decode step in one call, one after another as decode_layer_blocks runs each (the Python of 30
   layer calls cost about 1 ms of a 12 ms 16-row step). table (layers, 17): each layer's addresses of norm1, norm2,
   q_norm, k_norm and qkv_bias (0 for none), the codes and scales of qkv, o, gate_up and down, k_cache, v_cache,
   k_scales and v_scales (0 for a bfloat16 cache); x (m, hidden) the embeddings. Writes the last layer's x_out and
   res_out. 0 on success; -1 as decode_layer_blocks (then the caller runs the layers one by one, writing the same
   cache rows again). */
int decode_layers_blocks(const int64_t *table, const uint16_t *x, uint16_t *x_out, uint16_t *res_out,
                         const uint16_t *cos, const uint16_t *sin, const int64_t *slots, const int64_t *block_tables,
                         const int64_t *lens, int64_t layers, int64_t bits, int64_t m, int64_t hidden, int64_t heads,
                         int64_t kv_heads, int64_t dim, int64_t inter, int64_t block_size, int64_t max_blocks,
                         float eps, float scale) {
    uint16_t *spare = malloc(2 * 2 * (size_t)(m * hidden));  /* the other layers' outputs, in turn with x_out */
    if (!spare) return -1;
    const uint16_t *in = x, *res = NULL;
    int failed = 0;
    for (int64_t l = 0; l < layers && !failed; l++) {
        const int last_parity = (layers - 1 - l) % 2 == 0;  /* the last layer writes x_out and res_out */
        uint16_t *out = last_parity ? x_out : spare, *res_next = last_parity ? res_out : spare + m * hidden;
        const int64_t *p = table + 17 * l;
        failed = decode_layer_blocks(in, res, out, res_next, (const uint16_t *)p[0], (const uint16_t *)p[1],
                                     (const uint16_t *)p[2], (const uint16_t *)p[3], (const uint16_t *)p[4],
                                     (const uint8_t *)p[5], (const void *)p[6], (const uint8_t *)p[7],
                                     (const void *)p[8], (const uint8_t *)p[9], (const void *)p[10],
                                     (const uint8_t *)p[11], (const void *)p[12], cos, sin, slots, (void *)p[13],
                                     (void *)p[14], (uint16_t *)p[15], (uint16_t *)p[16], block_tables, lens, bits, m,
                                     hidden, heads, kv_heads, dim, inter, block_size, max_blocks, eps, scale);
        in = out, res = res_next;
    }
    free(spare);
    return failed ? -1 : 0;
}

void gemma_norm_bf16(const uint16_t *x, const uint16_t *weight, uint16_t *out, int64_t rows, int64_t dim, float eps);
void gelu_tanh_mul_bf16(const uint16_t *x, uint16_t *out, int64_t rows, int64_t n);


/* Every layer of a Gemma 3 decode step in one call: engine/models/gemma3.py's DecoderLayer op by op, on the same
   kernels. table (layers, 21): each layer's addresses of its norms (input, post-attention, pre-feedforward,
   post-feedforward, q_norm, k_norm), the codes and scales of qkv, o, gate_up and down, k_cache, v_cache, k_scales and
   v_scales (0 for a bfloat16 cache), then its KV group, its sliding window (0: none) and its rotary table (0 global,
   1 local). groups (KV groups, 3): each group's slots, decode block tables and their width. rope: cos, sin of the
   global table, then of the local one, each (m, dim). x (m, hidden): the scaled embeddings; writes the last layer's
   output to x_out. 0 on success; -1 as decode_layers_blocks. */
int decode_layers_gemma(const int64_t *table, const int64_t *groups, const uint16_t *const *rope, const uint16_t *x,
                        uint16_t *x_out, const int64_t *lens, int64_t layers, int64_t bits, int64_t m, int64_t hidden,
                        int64_t heads, int64_t kv_heads, int64_t dim, int64_t inter, int64_t block_size, float eps,
                        float scale) {
    if ((bits != 4 && bits != 8) || kv_heads < 1 || heads % kv_heads || heads / kv_heads > 8 || dim > 256 ||
        dim % 2 || block_size > 256)
        return -1;
    const int64_t width = (heads + 2 * kv_heads) * dim;
    uint16_t *h = malloc(2 * (size_t)(m * hidden)), *qkv = malloc(2 * (size_t)(m * width));
    uint16_t *att = malloc(2 * (size_t)(m * heads * dim)), *gu = malloc(4 * (size_t)(m * inter));
    uint16_t *act = malloc(2 * (size_t)(m * inter)), *o = malloc(2 * (size_t)(m * hidden));
    uint16_t *mid = malloc(2 * (size_t)(m * hidden)), *spare = malloc(2 * (size_t)(m * hidden));
    int failed = !h || !qkv || !att || !gu || !act || !o || !mid || !spare;
    const uint16_t *in = x;
    for (int64_t l = 0; l < layers && !failed; l++) {
        const int64_t *p = table + 21 * l, *g = groups + 3 * p[18], window = p[19];
        const uint16_t *const *n = (const uint16_t *const *)p, *cos = rope[2 * p[20]], *sin = rope[2 * p[20] + 1];
        const int64_t *slots = (const int64_t *)g[0], *tables = (const int64_t *)g[1];
        uint16_t *out = (layers - 1 - l) % 2 == 0 ? x_out : spare;  /* the last layer writes x_out */
        gemma_norm_bf16(in, n[0], h, m, hidden, eps);
        failed = product(bits, h, (const uint8_t *)p[6], (const void *)p[7], qkv, m, width, hidden);
        if (failed) break;
        for (int64_t i = 0; i < m; i++) {  /* in place, as the op-by-op path's norm over each head's row */
            uint16_t *row = qkv + i * width;
            gemma_norm_bf16(row, n[4], row, heads, dim, eps);
            gemma_norm_bf16(row + heads * dim, n[5], row + heads * dim, kv_heads, dim, eps);
        }
        failed = store_and_attend(qkv, cos, sin, slots, (void *)p[14], (void *)p[15], (uint16_t *)p[16],
                                  (uint16_t *)p[17], tables, lens, att, m, heads, kv_heads, dim, block_size, g[2],
                                  window, scale);
        failed = failed || product(bits, att, (const uint8_t *)p[8], (const void *)p[9], o, m, hidden, heads * dim);
        if (failed) break;
        gemma_norm_bf16(o, n[1], o, m, hidden, eps);
        add_bf16(in, o, mid, m * hidden);  /* the residual stream after the attention */
        gemma_norm_bf16(mid, n[2], h, m, hidden, eps);
        failed = product(bits, h, (const uint8_t *)p[10], (const void *)p[11], gu, m, 2 * inter, hidden);
        if (failed) break;
        gelu_tanh_mul_bf16(gu, act, m, inter);
        failed = product(bits, act, (const uint8_t *)p[12], (const void *)p[13], o, m, hidden, inter);
        if (failed) break;
        gemma_norm_bf16(o, n[3], o, m, hidden, eps);
        add_bf16(mid, o, out, m * hidden);
        in = out;
    }
    free(h), free(qkv), free(att), free(gu), free(act), free(o), free(mid), free(spare);
    return failed ? -1 : 0;
}
