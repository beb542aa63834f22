/* Gemma's own elementwise passes over bfloat16 rows: its RMS norm (the product with 1 + weight taken in float32,
   rounded once; Llama's rounds before the weight) and GeGLU (gelu's tanh form times up, on fused.c's kernel).
   Numerics follow the PyTorch reference within a bfloat16 step (the sum of squares and the exponential differ in
   the last float bits).
   Built by lmcli/kernels/native.py. */
#include <math.h>
#include <stdint.h>

#include "bf16.h"

/* out = x / rms(x) * (1 + weight), each of the rows of dim values; out may be x. */
void gemma_norm_bf16(const uint16_t *x, const uint16_t *weight, uint16_t *out, int64_t rows, int64_t dim, float eps) {
    #pragma omp parallel for schedule(static) if (rows * dim >= 16384)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * dim;
        uint16_t *o = out + r * dim;
#ifdef __AVX512F__
        if (dim % 16 == 0) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t d = 0; d < dim; d += 16) {
                const __m512 v = load16(xr + d);
                acc = _mm512_fmadd_ps(v, v, acc);
            }
            const __m512 inv = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(acc) / (float)dim + eps));
            const __m512 one = _mm512_set1_ps(1.f);
            for (int64_t d = 0; d < dim; d += 16) {
                const __m512 scaled = _mm512_add_ps(one, load16(weight + d));
                store16(o + d, _mm512_mul_ps(_mm512_mul_ps(load16(xr + d), inv), scaled));
            }
            continue;
        }
#endif
        float ss = 0.f;
        for (int64_t d = 0; d < dim; d++) ss += bf16f(xr[d]) * bf16f(xr[d]);
        const float inv = 1.f / sqrtf(ss / (float)dim + eps);
        for (int64_t d = 0; d < dim; d++) o[d] = f2bf16(bf16f(xr[d]) * inv * (1.f + bf16f(weight[d])));
    }
}

void sigmoid_gate_mul_bf16(const uint16_t *x, uint16_t *out, int64_t rows, int64_t n, float k1, float k3);

/* out (rows, n) = gelu_tanh(x[:, :n]) * x[:, n:], x (rows, 2n): the gelu rounded to bfloat16, then the product. */
void gelu_tanh_mul_bf16(const uint16_t *x, uint16_t *out, int64_t rows, int64_t n) {
    const float k1 = 2.f * 0.7978845608028654f;  /* 2 sqrt(2 / pi) */
    sigmoid_gate_mul_bf16(x, out, rows, n, k1, 0.044715f * k1);
}
