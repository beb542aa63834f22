/* Small per-layer ops fused into one pass each over bfloat16 rows (each replaced five to ten torch calls, 30
   layers a step). Rounding follows the PyTorch reference op by op. Built by lmcli/kernels/native.py. */
#include <math.h>
#include <stdint.h>

#include "bf16.h"

/* Rotary embedding (Hugging Face's half-split layout) of q and k in place, then k and v into the paged cache.
   qkv (tokens, (heads + 2 * kv_heads) * dim): q heads, k heads, v heads; cos, sin (tokens, dim); slots (tokens,):
   block * block_size + offset; caches (blocks, kv_heads, block_size, dim). As the reference: x * cos and
   rotate(x) * sin each rounded to bfloat16, then their sum. */
void rotary_store_bf16(uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, const int64_t *slots,
                       uint16_t *k_cache, uint16_t *v_cache, int64_t tokens, int64_t heads, int64_t kv_heads,
                       int64_t dim, int64_t block_size) {
    const int64_t half = dim / 2, width = (heads + 2 * kv_heads) * dim;
    #pragma omp parallel for schedule(static) if (tokens >= 32)
    for (int64_t t = 0; t < tokens; t++) {
        uint16_t *row = qkv + t * width;
        const uint16_t *c = cos + t * dim, *s = sin + t * dim;
        for (int64_t hd = 0; hd < heads + kv_heads; hd++) {
            uint16_t *x = row + hd * dim;
            float a[512];
            for (int64_t d = 0; d < dim; d++) a[d] = bf16f(x[d]);
            for (int64_t d = 0; d < dim; d++) {
                const float rot = d < half ? -a[d + half] : a[d - half];
                x[d] = f2bf16(bf16f(f2bf16(a[d] * bf16f(c[d]))) + bf16f(f2bf16(rot * bf16f(s[d]))));
            }
        }
        const int64_t block = slots[t] / block_size, offset = slots[t] % block_size;
        for (int64_t h = 0; h < kv_heads; h++) {
            const int64_t at = ((block * kv_heads + h) * block_size + offset) * dim;
            const uint16_t *k = row + (heads + h) * dim, *v = row + (heads + kv_heads + h) * dim;
            for (int64_t d = 0; d < dim; d++) k_cache[at + d] = k[d], v_cache[at + d] = v[d];
        }
    }
}

/* out (rows, n) = silu(x[:, :n]) * x[:, n:], x (rows, 2n): silu rounded to bfloat16, then the product. */
void silu_mul_bf16(const uint16_t *x, uint16_t *out, int64_t rows, int64_t n) {
    #pragma omp parallel for schedule(static) if (rows * n >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *g = x + r * 2 * n, *u = g + n;
        uint16_t *o = out + r * n;
        for (int64_t i = 0; i < n; i++) {
            const float a = bf16f(g[i]);
            o[i] = f2bf16(bf16f(f2bf16(a / (1.f + expf(-a)))) * bf16f(u[i]));
        }
    }
}
