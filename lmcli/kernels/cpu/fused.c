/* Small per-layer ops fused into one pass each over bfloat16 rows (each replaced five to ten torch calls, 30
   layers a step). Rounding follows the PyTorch reference op by op. Built by lmcli/kernels/native.py. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* Rotary embedding (Hugging Face's half-split layout) of the first `count` heads of a token's row, in place; cos,
   sin: the token's (dim,). As the reference: x * cos and rotate(x) * sin each rounded to bfloat16, then their sum. */
static void rotate(uint16_t *row, const uint16_t *c, const uint16_t *s, int64_t count, int64_t dim) {
    const int64_t half = dim / 2;
    for (int64_t hd = 0; hd < count; hd++) {
        uint16_t *x = row + hd * dim;
#ifdef __AVX512F__
        if (half % 16 == 0) {  /* the same roundings 16 lanes at a time */
            for (int64_t d = 0; d < half; d += 16) {
                const __m512 lo = load16(x + d), hi = load16(x + half + d);
                const __m512 a = bf16_round(_mm512_mul_ps(lo, load16(c + d)));
                const __m512 b = bf16_round(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), hi), load16(s + d)));
                const __m512 e = bf16_round(_mm512_mul_ps(hi, load16(c + half + d)));
                const __m512 f = bf16_round(_mm512_mul_ps(lo, load16(s + half + d)));
                store16(x + d, _mm512_add_ps(a, b));
                store16(x + half + d, _mm512_add_ps(e, f));
            }
            continue;
        }
#endif
        float a[512];
        for (int64_t d = 0; d < dim; d++) a[d] = bf16f(x[d]);
        for (int64_t d = 0; d < dim; d++) {
            const float rot = d < half ? -a[d + half] : a[d - half];
            x[d] = f2bf16(bf16f(f2bf16(a[d] * bf16f(c[d]))) + bf16f(f2bf16(rot * bf16f(s[d]))));
        }
    }
}

/* One row into the 8-bit cache as kernels/kv8.py's quantize: scale = its largest magnitude / 127 in float16,
   codes = round(x / scale) (0 for a zero row) */
static void store_s8(const uint16_t *x, int8_t *codes, uint16_t *scale, int64_t dim) {
    float top = 0.f;
    for (int64_t d = 0; d < dim; d++) top = fmaxf(top, fabsf(bf16f(x[d])));
    *scale = f2f16(top / 127.f);
    const float s = f16f(*scale);
    for (int64_t d = 0; d < dim; d++) {
        const float q = s > 0.f ? rintf(bf16f(x[d]) / s) : 0.f;
        codes[d] = (int8_t)(q > 127.f ? 127.f : q < -127.f ? -127.f : q);
    }
}

/* Rotary embedding of q and k in place, then k and v into the paged caches: bfloat16 ones (k_scales NULL), or the
   8-bit ones (kernels/kv8.py: int8 codes with the same layout, float16 scales (blocks, kv_heads, block_size)).
   qkv (tokens, (heads + 2 * kv_heads) * dim): q heads, k heads, v heads; cos, sin (tokens, dim); slots (tokens,):
   block * block_size + offset; caches (blocks, kv_heads, block_size, dim). */
static void rotary_store(uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, const int64_t *slots, void *k_cache,
                         uint16_t *k_scales, void *v_cache, uint16_t *v_scales, int64_t tokens, int64_t heads,
                         int64_t kv_heads, int64_t dim, int64_t block_size) {
    const int64_t width = (heads + 2 * kv_heads) * dim;
    #pragma omp parallel for schedule(static) if (tokens >= 32)
    for (int64_t t = 0; t < tokens; t++) {
        uint16_t *row = qkv + t * width;
        rotate(row, cos + t * dim, sin + t * dim, heads + kv_heads, dim);
        const int64_t block = slots[t] / block_size, offset = slots[t] % block_size;
        for (int64_t h = 0; h < kv_heads; h++) {
            const int64_t at = (block * kv_heads + h) * block_size + offset;
            const uint16_t *k = row + (heads + h) * dim, *v = row + (heads + kv_heads + h) * dim;
            if (k_scales) {
                store_s8(k, (int8_t *)k_cache + at * dim, k_scales + at, dim);
                store_s8(v, (int8_t *)v_cache + at * dim, v_scales + at, dim);
            } else {
                memcpy((uint16_t *)k_cache + at * dim, k, 2 * (size_t)dim);
                memcpy((uint16_t *)v_cache + at * dim, v, 2 * (size_t)dim);
            }
        }
    }
}

void rotary_store_bf16(uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, const int64_t *slots,
                       uint16_t *k_cache, uint16_t *v_cache, int64_t tokens, int64_t heads, int64_t kv_heads,
                       int64_t dim, int64_t block_size) {
    rotary_store(qkv, cos, sin, slots, k_cache, NULL, v_cache, NULL, tokens, heads, kv_heads, dim, block_size);
}

void rotary_store_s8(uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, const int64_t *slots, int8_t *k_codes,
                     uint16_t *k_scales, int8_t *v_codes, uint16_t *v_scales, int64_t tokens, int64_t heads,
                     int64_t kv_heads, int64_t dim, int64_t block_size) {
    rotary_store(qkv, cos, sin, slots, k_codes, k_scales, v_codes, v_scales, tokens, heads, kv_heads, dim,
                 block_size);
}

/* out (rows, n) = g / (1 + exp(-(k1 g + k3 g^3))) * u, x (rows, 2n) holding g = x[:, :n] and u = x[:, n:]: the
   activation rounded to bfloat16, then the product. silu is k1 = 1, k3 = 0; gelu's tanh form 0.5 g (1 + tanh(y)),
   y = sqrt(2 / pi) (g + 0.044715 g^3), is the same shape with k1 = 2 sqrt(2 / pi), k3 = 0.044715 k1 (g^3 taken
   as g min(g^2, 10^8), gelu long saturated there). Gates below -10^4 count as -10^4: about 0, never nan. */
void sigmoid_gate_mul_bf16(const uint16_t *x, uint16_t *out, int64_t rows, int64_t n, float k1, float k3) {
    #pragma omp parallel for schedule(static) if (rows * n >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *g = x + r * 2 * n, *u = g + n;
        uint16_t *o = out + r * n;
        int64_t i = 0;
#ifdef __AVX512F__
        for (; i + 16 <= n; i += 16) {  /* by a vector 2^x and a refined reciprocal (not libm's expf: about 1
                                           output in 1000 lands a bfloat16 step away, as expf's does) */
            const __m512 a = load16(g + i);  /* the square of a clamped: no 0 * inf for silu's huge gates */
            const __m512 c = _mm512_max_ps(_mm512_min_ps(a, _mm512_set1_ps(1e4f)), _mm512_set1_ps(-1e4f));
            const __m512 z = _mm512_mul_ps(a, _mm512_fmadd_ps(_mm512_mul_ps(c, c), _mm512_set1_ps(k3),
                                                              _mm512_set1_ps(k1)));
            const __m512 t = _mm512_min_ps(_mm512_mul_ps(z, _mm512_set1_ps(-1.44269504f)), _mm512_set1_ps(126.f));
            const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), exp2v(t));  /* finite: 1 + 2^t, t <= 126 */
            __m512 inv = _mm512_rcp14_ps(d);
            inv = _mm512_mul_ps(inv, _mm512_fnmadd_ps(d, inv, _mm512_set1_ps(2.f)));
            const __m512 low = _mm512_max_ps(a, _mm512_set1_ps(-1e4f));  /* t clamped: the gate too */
            store16(o + i, _mm512_mul_ps(bf16_round(_mm512_mul_ps(low, inv)), load16(u + i)));
        }
#endif
        for (; i < n; i++) {
            const float a = bf16f(g[i]), c = fmaxf(fminf(a, 1e4f), -1e4f);
            const float t = fminf(-a * (k1 + k3 * c * c), 87.f);  /* -ffast-math: no inf */
            o[i] = f2bf16(bf16f(f2bf16(fmaxf(a, -1e4f) / (1.f + expf(t)))) * bf16f(u[i]));
        }
    }
}

void silu_mul_bf16(const uint16_t *x, uint16_t *out, int64_t rows, int64_t n) {
    sigmoid_gate_mul_bf16(x, out, rows, n, 1.f, 0.f);
}
