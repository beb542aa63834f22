/* RMS norm with the residual add before it, in one pass over bfloat16 rows (one call instead of seven small
   torch ops, 60 a decode step). Numerics follow the PyTorch reference (the sum of squares may add up in another
   order: about 1 output in 100,000 differs by one bfloat16 step): the sum x + residual rounded to
   bfloat16, statistics in float32, the normalized row rounded to bfloat16, then times the weight, rounded.
   Built by lmcli/kernels/native.py. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* out = rms_norm(x (+ residual)) * weight; with a residual, sum <- x + residual. Rows of dim values. */
void add_rms_norm_bf16(const uint16_t *x, const uint16_t *residual, const uint16_t *weight, uint16_t *out,
                       uint16_t *sum, int64_t rows, int64_t dim, float eps) {
    #pragma omp parallel for schedule(static) if (rows * dim >= 16384)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * dim;
        uint16_t *s = residual ? sum + r * dim : (uint16_t *)xr;
#ifdef __AVX512F__
        if (dim % 16 == 0) {  /* the same roundings 16 lanes at a time */
            __m512 acc = _mm512_setzero_ps();
            for (int64_t d = 0; d < dim; d += 16) {
                __m512 v = load16(xr + d);
                if (residual) {
                    const __m256i h = round16(_mm512_add_ps(v, load16(residual + r * dim + d)));
                    _mm256_storeu_si256((void *)(s + d), h);
                    v = widen_bf16(h);
                }
                acc = _mm512_fmadd_ps(v, v, acc);
            }
            const __m512 inv = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(acc) / (float)dim + eps));
            for (int64_t d = 0; d < dim; d += 16) {
                const __m512 normed = bf16_round(_mm512_mul_ps(load16(s + d), inv));
                store16(out + r * dim + d, _mm512_mul_ps(load16(weight + d), normed));
            }
            continue;
        }
#endif
        float ss = 0.f;
        for (int64_t d = 0; d < dim; d++) {
            float v = bf16f(xr[d]);
            if (residual) {
                const uint16_t h = f2bf16(v + bf16f(residual[r * dim + d]));
                s[d] = h;
                v = bf16f(h);
            }
            ss += v * v;
        }
        const float inv = 1.f / sqrtf(ss / (float)dim + eps);
        uint16_t *o = out + r * dim;
        for (int64_t d = 0; d < dim; d++) o[d] = f2bf16(bf16f(weight[d]) * bf16f(f2bf16(bf16f(s[d]) * inv)));
    }
}
